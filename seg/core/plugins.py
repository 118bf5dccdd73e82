"""The plugin manager: loads plugins from the ``seg`` entry-point group and owns the name tables.

Built-in plugins are declared in seg's own setup.cfg under ``[options.entry_points] seg =`` and load
through the same path as third-party ones. ``SEG_LOAD_PLUGINS=a,b`` restricts the third-party
distributions that load (seg's own always do).
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os

import attrs
import pluggy

from seg.core import hookspecs
from seg.core.errors import ConfigError, UnknownPluginError

#: family name -> hook name. The singular is used in error messages.
FAMILIES = {
    "preprocessors": "register_preprocessors",
    "backbones": "register_backbones",
    "ssl_tasks": "register_ssl_tasks",
    "losses": "register_losses",
    "inferers": "register_inferers",
}
SINGULAR = {
    "preprocessors": "preprocessor",
    "backbones": "backbone",
    "ssl_tasks": "SSL task",
    "losses": "loss",
    "inferers": "inferer",
}
ENTRY_POINT_GROUP = "seg"
OWN_DISTRIBUTION = "seg"


@attrs.frozen
class PluginEntry:
    """One registered name: which family, its factory, and the module and distribution behind it."""

    name: str
    family: str
    factory: object
    plugin: str
    package: str
    version: str

    def as_dict(self) -> dict:
        """The JSON form shown by ``seg plugins --json``."""
        return {
            "name": self.name,
            "family": self.family,
            "package": self.package,
            "version": self.version,
            "plugin": self.plugin,
            "doc": " ".join((inspect.getdoc(self.factory) or "").split("\n\n")[0].split()),
        }


def _load_entry_points(pm: pluggy.PluginManager) -> dict[str, tuple[str, str]]:
    """Register every allowed entry point in group ``seg``; return plugin name -> (distribution, version)."""
    allowed = os.environ.get("SEG_LOAD_PLUGINS")
    allowed_set = None if allowed is None else {a.strip() for a in allowed.split(",") if a.strip()}
    origin = {}
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"]
        if dist_name is None:
            continue
        own = dist_name.lower() == OWN_DISTRIBUTION
        if not own and allowed_set is not None and dist_name not in allowed_set:
            continue
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None:
                continue
            pm.register(ep.load(), name=ep.name)
            origin[ep.name] = (dist_name, dist.version)
    return origin


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-in and third-party plugins loaded and checked."""
    pm = pluggy.PluginManager("seg")
    pm.add_hookspecs(hookspecs)
    pm.origin = _load_entry_points(pm)
    if not any(dist == OWN_DISTRIBUTION for dist, _ in pm.origin.values()):
        raise ConfigError(
            "no built-in plugins found: seg is not installed (run `pip install -e .` in the checkout)"
        )
    pm.check_pending()
    return pm


@functools.cache
def _table(family: str) -> dict[str, PluginEntry]:
    pm = plugin_manager()
    hook = getattr(pm.hook, FAMILIES[family])
    table: dict[str, PluginEntry] = {}
    for impl in hook.get_hookimpls():  # registration order
        package, version = pm.origin.get(impl.plugin_name, ("unknown", ""))

        def register(name, factory, _plugin=impl.plugin_name, _package=package, _version=version):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"plugin {_plugin!r} registered a {SINGULAR[family]} with a bad name {name!r}")
            if not callable(factory):
                raise ConfigError(f"plugin {_plugin!r}: {SINGULAR[family]} {name!r} factory is not callable")
            if name in table:
                first = table[name]
                raise ConfigError(
                    f"duplicate {SINGULAR[family]} name {name!r}: registered by plugin {first.plugin!r} "
                    f"({first.package}) and by plugin {_plugin!r} ({_package})"
                )
            table[name] = PluginEntry(name, family, factory, _plugin, _package, _version)

        impl.function(register=register)
    return table


def names(family: str) -> list[str]:
    """The sorted names registered in ``family``."""
    return sorted(_table(family))


def entry(family: str, name: str) -> PluginEntry:
    """The entry for ``name`` in ``family``, or an error listing the names that exist."""
    table = _table(family)
    if name not in table:
        available = ", ".join(sorted(table)) or "(none)"
        raise UnknownPluginError(f"unknown {SINGULAR[family]} {name!r}; available: {available}")
    return table[name]


def get(family: str, name: str):
    """The factory registered as ``name`` in ``family``."""
    return entry(family, name).factory


def all_entries() -> list[PluginEntry]:
    """Every registered plugin name of every family, sorted by family then name."""
    return [e for family in FAMILIES for e in sorted(_table(family).values(), key=lambda e: e.name)]


def check_options(family: str, name: str, options: dict, where: str, fixed: tuple[str, ...] = ()) -> None:
    """Fail with the config key path if ``options`` holds a key the factory does not accept.

    ``fixed`` names the positional arguments the core passes itself (e.g. ``in_channels``).
    """
    factory = get(family, name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in fixed and params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in options:
        if key not in accepted:
            raise ConfigError(
                f"{where}.{key}: unknown option for {SINGULAR[family]} {name!r}; "
                f"accepted: {', '.join(accepted) or '(none)'}"
            )


def reset() -> None:
    """Forget loaded plugins (tests that change installed distributions or SEG_LOAD_PLUGINS)."""
    plugin_manager.cache_clear()
    _table.cache_clear()
