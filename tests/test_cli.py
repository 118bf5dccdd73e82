"""The command line: help texts, plugin listing, and one-line errors with the documented exit codes."""

import json

import pytest

from seg.cli import main


@pytest.fixture
def seg_main(capsys):
    def call(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
            raise SystemExit(0)
        captured = capsys.readouterr()
        return exc.value.code or 0, captured.out, captured.err
    return call


def test_help_lists_every_command(seg_main):
    code, out, _ = seg_main("--help")
    assert code == 0
    for command in ("data", "run", "predict", "evaluate", "plugins", "experiments"):
        assert command in out


def test_plugins_json_lists_builtins(seg_main):
    code, out, _ = seg_main("plugins", "--json")
    entries = json.loads(out)
    assert code == 0
    assert {"name": "vnet", "family": "backbones", "package": "seg"}.items() <= next(
        e for e in entries if e["name"] == "vnet").items()
    assert {e["family"] for e in entries} == {"preprocessors", "backbones", "ssl_tasks", "losses", "inferers"}


def test_experiments_json(seg_main):
    code, out, _ = seg_main("experiments", "--json")
    assert code == 0 and "smoke" in {e["name"] for e in json.loads(out)}


@pytest.mark.parametrize("args, message", [
    (["run", "finetune", "--data", "nowhere", "--out", "{tmp}/r", "--experiment", "smok"], "unknown experiment 'smok'"),
    (["run", "finetune", "--data", "nowhere", "--out", "{tmp}/r", "--backbone", "vnett"], "unknown backbone 'vnett'"),
    (["run", "pretrain", "--data", "nowhere", "--out", "{tmp}/r", "--ssl", "pcrll"], "unknown SSL task 'pcrll'"),
    (["run", "finetune", "--data", "nowhere", "--out", "{tmp}/r", "--set", "finetune.lrr=1"], "finetune.lrr: unknown key"),
    (["run", "finetune", "--data", "{tmp}/missing", "--out", "{tmp}/r", "-e", "smoke"], "missing"),
    (["evaluate", "--pred", "{tmp}/nope", "--gt", "{tmp}/nope2"], "nope"),
    (["predict", "-i", "{tmp}/nope.nii.gz", "-o", "{tmp}/o", "--model", "{tmp}"], "nope.nii.gz"),
])
def test_user_errors_are_one_red_line_with_exit_code_2(seg_main, tmp_path, args, message):
    code, out, err = seg_main("-q", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_debug_shows_the_traceback(tmp_path):
    from seg.core.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "run", "finetune", "--data", "x", "--out", str(tmp_path / "r"), "-e", "smok"])


def test_usage_errors_exit_2(seg_main):
    code, _, err = seg_main("run", "finetune")
    assert code == 2 and "Missing option" in err
