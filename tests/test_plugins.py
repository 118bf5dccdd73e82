"""The plugin manager: built-ins load through entry points, name tables, errors, SEG_LOAD_PLUGINS."""

import pytest

from seg.core import plugins
from seg.core.errors import ConfigError, UnknownPluginError
from tests.conftest import extra_plugin

BUILTINS = {
    "backbones": {"vnet", "unet3d"},
    "losses": {"gdice_ce", "dice_ce", "ce"},
    "ssl_tasks": {"pcrl", "contrastive"},
    "inferers": {"z_sliding_window", "whole_volume", "largest_component"},
    "preprocessors": {"reorient", "crop_body", "resample", "clip_zscore"},
}


def test_builtins_are_registered_by_the_seg_distribution():
    for family, expected in BUILTINS.items():
        assert expected <= set(plugins.names(family)), family
        for name in expected:
            assert plugins.entry(family, name).package == "seg"


def test_unknown_name_lists_available_names():
    with pytest.raises(UnknownPluginError, match=r"unknown backbone 'vnett'; available: .*unet3d, vnet"):
        plugins.get("backbones", "vnett")


def test_duplicate_name_names_both_plugins():
    with extra_plugin("dupe_plugin", register_backbones=lambda register: register("vnet", object)):
        with pytest.raises(ConfigError, match=r"duplicate backbone name 'vnet'.*'vnet'.*'dupe_plugin'"):
            plugins.names("backbones")


def test_each_hook_registers_into_its_own_family():
    seen = {}

    def make(family):
        return lambda register: register(f"probe_{family}", lambda *a, **k: seen.setdefault(family, True))

    hooks = {hook: make(family) for family, hook in plugins.FAMILIES.items()}
    with extra_plugin("probe_plugin", **hooks):
        for family in plugins.FAMILIES:
            entry = plugins.entry(family, f"probe_{family}")
            assert entry.family == family and entry.plugin == "probe_plugin"
            entry.factory()
    assert set(seen) == set(plugins.FAMILIES)


def test_bad_factory_is_rejected():
    with extra_plugin("bad_plugin", register_losses=lambda register: register("broken", 42)):
        with pytest.raises(ConfigError, match="not callable"):
            plugins.names("losses")


def test_check_options_names_the_key_path():
    with pytest.raises(ConfigError, match=r"x\.options\.bogus: unknown option for backbone 'vnet'"):
        plugins.check_options("backbones", "vnet", {"bogus": 1}, "x.options", ("in_channels", "out_channels"))


def test_unmatched_hook_implementation_is_rejected():
    import types

    import pluggy

    import seg

    module = types.ModuleType("typo_plugin")
    module.register_backbone = seg.hookimpl(lambda register: None)  # missing "s"
    pm = pluggy.PluginManager("seg")
    pm.add_hookspecs(plugins.hookspecs)
    pm.register(module)
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_seg_load_plugins_restricts_third_party_but_keeps_builtins(monkeypatch):
    monkeypatch.setenv("SEG_LOAD_PLUGINS", "no-such-distribution")
    plugins.reset()
    try:
        assert "vnet" in plugins.names("backbones")
        assert all(e.package == "seg" for e in plugins.all_entries())
    finally:
        monkeypatch.delenv("SEG_LOAD_PLUGINS")
        plugins.reset()


@pytest.mark.parametrize("hook, family", [
    ("register_preprocessors", "preprocessors"),
    ("register_backbones", "backbones"),
    ("register_ssl_tasks", "ssl_tasks"),
    ("register_losses", "losses"),
    ("register_inferers", "inferers"),
])
def test_each_hook_feeds_its_family_from_the_builtins(hook, family):
    pm = plugins.plugin_manager()
    implementers = {impl.plugin_name for impl in getattr(pm.hook, hook).get_hookimpls()}
    assert plugins.FAMILIES[family] == hook
    assert {plugins.entry(family, name).plugin for name in BUILTINS[family]} <= implementers
