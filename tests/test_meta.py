"""Meta-tests (datasette's model): every hook is tested and documented, every CLI command is documented,
every public thing has a docstring, and the core never imports a plugin."""

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import seg
from seg.cli import cli
from seg.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLUGIN_GUIDE = (ROOT / "docs" / "plugins.md").read_text()
COMMAND_REFERENCE = (ROOT / "docs" / "commands.md").read_text()
HOOKS = [name for name in dir(hookspecs) if name.startswith("register_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    assert re.search(rf"^#+ `?{hook}\(register\)`?", PLUGIN_GUIDE, re.M), f"docs/plugins.md lacks a section for {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_meta.py"]
    assert any(hook in p.read_text() for p in tests), f"no test mentions {hook}"


def _commands(group, prefix="seg"):
    for name, command in group.commands.items():
        yield f"{prefix} {name}"
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix} {name}")


@pytest.mark.parametrize("command", list(_commands(cli)))
def test_every_command_is_documented(command):
    assert f"`{command}" in COMMAND_REFERENCE, f"docs/commands.md does not document `{command}`"
    assert f"`{command}" in README or command.count(" ") > 1, f"the README's tour does not name `{command}`"


def _public_members():
    for info in pkgutil.walk_packages(seg.__path__, "seg."):
        module = importlib.import_module(info.name)
        yield info.name, module
        for name, member in vars(module).items():
            if name.startswith("_") or getattr(member, "__module__", None) != info.name:
                continue
            if inspect.isclass(member) or inspect.isfunction(member):
                yield f"{info.name}.{name}", member
                if inspect.isclass(member):
                    for attr, value in vars(member).items():
                        if inspect.isfunction(value) and not attr.startswith("_"):
                            yield f"{info.name}.{name}.{attr}", value


def test_every_public_thing_has_a_docstring():
    missing = [name for name, member in _public_members() if not inspect.getdoc(member)]
    assert not missing, f"no docstring: {missing}"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
    return names


def test_core_never_imports_a_plugin():
    for path in (ROOT / "seg" / "core").glob("*.py"):
        names = _imports(path)
        assert not any(n.startswith("seg.plugins") for n in names), f"{path.name} imports {names}"


def test_no_import_runs_back_up_the_layers():
    """cli -> core -> plugins: neither the core nor a plugin imports the command line or its script."""
    for path in [*(ROOT / "seg" / "core").glob("*.py"), *(ROOT / "seg" / "plugins").glob("*.py")]:
        names = _imports(path)
        assert not any(n in ("seg.cli", "seg.entry") for n in names), f"{path.parent.name}/{path.name} imports {names}"


def test_the_readme_architecture_names_every_module():
    tree = README.split("## Architecture", 1)[1].split("```", 2)[1]
    for folder in (ROOT / "seg", ROOT / "seg" / "core"):
        for path in folder.glob("*.py"):
            if path.stem not in ("__main__",) and not (folder.name == "core" and path.stem == "__init__"):
                assert re.search(rf"\b{re.escape(path.name)}\b", tree), f"README's architecture misses {path.name}"


def test_every_builtin_plugin_module_is_an_entry_point():
    setup = (ROOT / "setup.cfg").read_text()
    for path in (ROOT / "seg" / "plugins").glob("*.py"):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"seg.plugins.{path.stem}")
        registers = any(hasattr(module, hook) for hook in HOOKS)
        assert registers == (f"seg.plugins.{path.stem}\n" in setup), path.name
