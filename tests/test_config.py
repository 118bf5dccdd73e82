"""Experiments: registry.toml loads and validates; --set overrides; errors name the TOML key path."""

import pytest

from seg.core import config
from seg.core.errors import ConfigError

REQUIRED = ["flare22-pcrl-vnet", "flare22-contrastive-vnet", "flare22-scratch-vnet", "smoke"]


def test_registry_has_the_required_experiments_and_all_validate():
    names = config.raw_experiments()
    assert set(REQUIRED) <= set(names)
    for name in names:
        assert config.load_experiment(name).name == name


def test_paper_settings():
    exp = config.load_experiment("flare22-pcrl-vnet")
    ft = exp.finetune
    assert (ft.batch_size, ft.patch_size, ft.epochs) == (4, [80, 160, 160], 2000)
    assert (ft.optimizer.name, ft.optimizer.lr) == ("adam", 1e-4)
    assert (ft.scheduler.milestones, ft.scheduler.gamma) == ([100, 200, 500], 0.5)
    assert ft.loss.name == "gdice_ce" and exp.pretrain.ssl.name == "pcrl"
    assert exp.pretrain.batch_size == 4 and exp.pretrain.optimizer.lr == 1e-4
    steps = {c.name: c.options for c in exp.preprocess}
    assert steps["resample"]["in_plane"] == [160, 160] and steps["resample"]["z_spacing"] == 2.5
    assert (steps["clip_zscore"]["low"], steps["clip_zscore"]["high"]) == (-320.0, 320.0)
    assert exp.predict.inferer.name == "z_sliding_window"


def test_variants_differ_only_in_pretraining():
    pcrl = config.to_dict(config.load_experiment("flare22-pcrl-vnet"))
    contrastive = config.to_dict(config.load_experiment("flare22-contrastive-vnet"))
    scratch = config.to_dict(config.load_experiment("flare22-scratch-vnet"))
    assert contrastive["pretrain"]["ssl"]["name"] == "contrastive"
    assert scratch["pretrain"] is None
    for other in (contrastive, scratch):
        for key in ("preprocess", "backbone", "finetune", "predict"):
            assert other[key] == pcrl[key], key


def test_set_overrides_parse_toml_values():
    exp = config.load_experiment("smoke", ["finetune.optimizer.lr=3e-4", "finetune.patch_size=[8, 16, 16]",
                                           "backbone.options.base_channels=2", 'predict.precision="fp32"'])
    assert exp.finetune.optimizer.lr == 3e-4
    assert exp.finetune.patch_size == [8, 16, 16]
    assert exp.backbone.options["base_channels"] == 2
    assert exp.predict.precision == "fp32"


@pytest.mark.parametrize("override, message", [
    ("finetune.optimizer.lrr=1", r"smoke\.finetune\.optimizer\.lrr: unknown key"),
    ("finetune.epochs=many", r"smoke\.finetune\.epochs: expected int, got str 'many'"),
    ("finetune.loss.name=nope", r"smoke\.finetune\.loss: unknown loss 'nope'; available: .*gdice_ce"),
    ("backbone.options.widthh=3", r"smoke\.backbone\.options\.widthh: unknown option for backbone 'vnet'"),
    ("predict.precision=fp64", r"smoke\.predict: .*precision"),
    ("finetune", r"--set 'finetune': expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key_path(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load_experiment("smoke", [override])


def test_unknown_experiment_lists_names():
    with pytest.raises(ConfigError, match=r"unknown experiment 'smok'; available: .*smoke"):
        config.load_experiment("smok")


def test_malformed_registry_names_file_and_line(tmp_path):
    bad = tmp_path / "registry.toml"
    bad.write_text("[experiments.x]\nseed = = 1\n")
    with pytest.raises(ConfigError, match=r"registry\.toml: invalid TOML: .*line 2"):
        config.raw_experiments(bad)


def test_extends_cycle_and_unknown_parent(tmp_path):
    reg = tmp_path / "r.toml"
    reg.write_text('[experiments.a]\nextends = "b"\n[experiments.b]\nextends = "a"\n')
    with pytest.raises(ConfigError, match="circular"):
        config.raw_experiments(reg)
    reg.write_text('[experiments.a]\nextends = "zz"\n')
    with pytest.raises(ConfigError, match="unknown experiment 'zz'"):
        config.raw_experiments(reg)


def test_resolved_toml_round_trips(tmp_path):
    exp = config.load_experiment("flare22-pcrl-vnet", ["finetune.optimizer.lr=3e-4"])
    path = tmp_path / "config.toml"
    path.write_text(config.experiment_toml(exp))
    again = config.load_experiment(str(path))
    assert again == exp
    scratch = config.load_experiment("flare22-scratch-vnet")
    path.write_text(config.experiment_toml(scratch))
    assert config.load_experiment(str(path)) == scratch


def test_stage_differences_name_what_the_stage_reads_and_nothing_else():
    saved = config.load_experiment("smoke")
    assert config.stage_differences(saved, config.load_experiment("smoke"), "finetune") == []
    lr = config.load_experiment("smoke", ("finetune.optimizer.lr=0.5", "pretrain.epochs=7", "description=x"))
    assert config.stage_differences(saved, lr, "finetune") == [
        f"finetune.optimizer.lr ({saved.finetune.optimizer.lr!r} there, 0.5 now)"]
    assert config.stage_differences(saved, lr, "pretrain") == [f"pretrain.epochs ({saved.pretrain.epochs!r} there, 7 now)"]
    both = config.load_experiment("smoke", ("seed=3", "backbone.options.base_channels=5"))
    for stage in ("pretrain", "finetune"):
        assert [d.split(" ")[0] for d in config.stage_differences(saved, both, stage)] == [
            "backbone.options.base_channels", "seed"]
