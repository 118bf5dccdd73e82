"""A real third-party package (tests/plugin_example) installed into a temporary site directory is listed by
`seg plugins --json` and usable by name in a short run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "plugin_example"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin, pip-installed (no deps) into a fresh target folder."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(EXAMPLE, work / "src")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def seg_cli(*args, site=None, env=None, cwd=None):
    environ = {**os.environ, **(env or {})}
    if site is not None:
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "seg", *args], capture_output=True, text=True, env=environ,
                          cwd=cwd)


def test_installed_plugin_is_listed_with_its_package(site):
    result = seg_cli("plugins", "--json", site=site)
    assert result.returncode == 0, result.stderr
    entries = {(e["family"], e["name"]): e for e in json.loads(result.stdout)}
    assert entries[("backbones", "example_tiny")]["package"] == "seg-example-plugin"
    assert entries[("backbones", "example_tiny")]["version"] == "0.2.0"
    assert entries[("losses", "example_l1")]["package"] == "seg-example-plugin"
    assert entries[("backbones", "vnet")]["package"] == "seg"


def test_seg_load_plugins_can_exclude_it(site):
    result = seg_cli("plugins", "--json", site=site, env={"SEG_LOAD_PLUGINS": "some-other-plugin"})
    names = {e["name"] for e in json.loads(result.stdout)}
    assert "example_tiny" not in names and "vnet" in names


def test_plugin_is_usable_by_name_in_a_short_run(site, synth_data, tmp_path):
    run = tmp_path / "run"
    result = seg_cli("-q", "run", "finetune", "--experiment", "smoke", "--backbone", "example_tiny",
                     "--set", "finetune.loss.name=example_l1", "--data", str(synth_data), "--out", str(run),
                     "--epochs", "1", "--device", "cpu", site=site)
    assert result.returncode == 0, result.stderr
    config = (run / "config.toml").read_text()
    assert 'name = "example_tiny"' in config and 'name = "example_l1"' in config
    assert (run / "checkpoint_latest.pt").exists()
