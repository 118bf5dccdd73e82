"""seg export: one model file that predicts byte for byte like its run folder (without the run or the training
data), its manifest and model card, plugin pinning (training checkpoints and model files), and the ONNX export
run through onnxruntime with seg's own preprocessing and inverse."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import seg
from seg.cli import main
from seg.core.checkpoint import load_checkpoint
from seg.core.config import load_experiment
from seg.core.console import set_quiet
from seg.core.export import export_model
from seg.core.predict import load_predictor, predict_paths

SMOKE_PLUGINS = {("preprocessors", "crop_body"), ("preprocessors", "resample"), ("preprocessors", "reorient"),
                 ("preprocessors", "clip_zscore"), ("backbones", "vnet"), ("ssl_tasks", "pcrl"),
                 ("losses", "gdice_ce"), ("inferers", "z_sliding_window")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A private dataset, a 1-epoch smoke run on it, its export, and its run-folder predictions of two images."""
    from seg.core.finetune import finetune
    from seg.core.synth import write_synthetic_dataset

    set_quiet(True)
    root = tmp_path_factory.mktemp("export")
    data = write_synthetic_dataset(root / "data", labeled=3, unlabeled=0, seed=5)
    run = root / "run"
    finetune(data, run, load_experiment("smoke"), device="cpu", epochs=1)
    images = root / "images"
    images.mkdir()
    for path in sorted((data / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(path, images / path.name)
    reference = root / "reference"
    predict_paths(images, reference, run, device="cpu")
    model = root / "model.seg"
    export_model(run, model, command="seg export run -o model.seg")
    return {"data": data, "run": run, "images": images, "reference": reference, "model": model, "root": root}


def seg_main(capsys, *args) -> tuple[int, str]:
    """``seg ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(["-q", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def rewrite(source: Path, target: Path, **members) -> Path:
    """A copy of the model file ``source`` with some members replaced (``name=bytes``, dots as ``_``)."""
    replace = {name.replace("_", ".").replace("seg.model", "seg-model"): data for name, data in members.items()}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            out.writestr(info, replace.get(info.filename, src.read(info)))
    return target


def test_exported_model_predicts_byte_identically_without_run_or_data(trained, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(trained["model"], fresh / "model.seg")
    shutil.copytree(trained["images"], fresh / "in")
    hidden = {key: trained[key].rename(trained["root"] / f"hidden-{key}") for key in ("run", "data")}
    try:
        result = subprocess.run([sys.executable, "-m", "seg", "-q", "predict", "-i", "in", "-o", "out", "--model",
                                 "model.seg", "--device", "cpu"], cwd=fresh, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        labels = seg.predict_image(sitk.ReadImage(str(next((fresh / "in").iterdir()))), fresh / "model.seg",
                                   device="cpu")
    finally:
        for key, path in hidden.items():
            path.rename(trained[key])
    expected = sorted(trained["reference"].glob("*.nii.gz"))
    assert [p.name for p in expected] == sorted(p.name for p in (fresh / "out").iterdir())
    for path in expected:
        assert (fresh / "out" / path.name).read_bytes() == path.read_bytes(), path.name
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(expected[0])))
    assert np.array_equal(sitk.GetArrayFromImage(labels), first)


def test_manifest_weights_and_model_card(trained):
    run = trained["run"]
    with zipfile.ZipFile(trained["model"]) as archive:
        assert sorted(archive.namelist()) == ["MODEL.md", "config.toml", "seg-model.json", "weights.pt"]
        manifest = json.loads(archive.read("seg-model.json"))
        card = archive.read("MODEL.md").decode()
        assert archive.read("config.toml") == (run / "config.toml").read_bytes()
        weights = archive.read("weights.pt")
    version = importlib.metadata.version("seg")
    assert manifest["seg_version"] == seg.__version__ == version
    assert {(p["family"], p["name"]) for p in manifest["plugins"]} == SMOKE_PLUGINS
    assert all(p["distribution"] == "seg" and p["version"] == version for p in manifest["plugins"])
    state = load_checkpoint(run / "checkpoint_best.pt")
    import io

    loaded = torch.load(io.BytesIO(weights), weights_only=True)
    assert loaded.keys() == state["model"].keys()
    assert all(torch.equal(loaded[k], state["model"][k]) for k in loaded)
    dataset = json.loads((trained["data"] / "dataset.json").read_text())
    assert dataset["description"] in card and f"{dataset['numTraining']} labeled cases" in card
    row = next(r for r in json.loads((run / "metrics.json").read_text()) if r["epoch"] == state["epoch"])
    for name, value in dataset["labels"].items():
        if value:
            assert f"| {name} | {row[f'val_dice_{value}']:.4f} |" in card
            assert f"| {value} | {name} |" in card
    assert f"| **mean** | **{row['val_mean_dice']:.4f}** |" in card
    assert (run / "command.txt").read_text().strip() in card and "seg export run -o model.seg" in card


def test_training_checkpoints_record_their_plugins(trained, synth_data, tmp_path):
    from seg.core.pretrain import pretrain

    version = importlib.metadata.version("seg")
    finetuned = load_checkpoint(trained["run"] / "checkpoint_best.pt")
    pretrained_run = tmp_path / "pre"
    pretrain(synth_data, pretrained_run, load_experiment("smoke"), device="cpu", epochs=0)
    pretrained = load_checkpoint(pretrained_run / "checkpoint_latest.pt")
    for state in (finetuned, pretrained):
        pins = json.loads(state["plugins"])
        assert {(p["family"], p["name"]) for p in pins} == SMOKE_PLUGINS
        assert all((p["distribution"], p["version"]) == ("seg", version) for p in pins)
        assert state["seg_version"] == version
    assert json.loads(finetuned["dataset"])["name"] == "SyntheticAbdomenCT"


def _manifest(model: Path) -> dict:
    with zipfile.ZipFile(model) as archive:
        return json.loads(archive.read("seg-model.json"))


def test_missing_plugin_distribution_names_what_to_install(trained, tmp_path, capsys):
    manifest = _manifest(trained["model"])
    for pin in manifest["plugins"]:
        if pin["family"] == "backbones":
            pin.update(name="pro_net", distribution="seg-organs-pro", version="1.4.2")
    config = (trained["run"] / "config.toml").read_text().replace('name = "vnet"', 'name = "pro_net"')
    model = rewrite(trained["model"], tmp_path / "pro.seg", seg_model_json=json.dumps(manifest).encode(),
                    config_toml=config.encode())
    code, err = seg_main(capsys, "predict", "-i", trained["images"], "-o", tmp_path / "o", "--model", model)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "seg-organs-pro" in err and "1.4.2" in err and "pip install" in err and "Traceback" not in err
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):  # a run folder's pins are checked the same way
        state = torch.load(trained["run"] / name, weights_only=True)
        state["plugins"] = json.dumps(manifest["plugins"])
        torch.save(state, tmp_path / name)
    run = shutil.copytree(trained["run"], tmp_path / "run", ignore=shutil.ignore_patterns("*.pt"))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        (tmp_path / name).rename(run / name)
    code, err = seg_main(capsys, "predict", "-i", trained["images"], "-o", tmp_path / "o", "--model", run)
    assert code == 2 and "seg-organs-pro" in err and "1.4.2" in err, err
    assert not (tmp_path / "o").exists()


def test_other_plugin_version_warns_once_and_predicts_the_same(trained, tmp_path, capsys):
    manifest = _manifest(trained["model"])
    for pin in manifest["plugins"]:
        pin["version"] = "0.0.7"
    model = rewrite(trained["model"], tmp_path / "old.seg", seg_model_json=json.dumps(manifest).encode())
    code, err = seg_main(capsys, "predict", "-i", trained["images"], "-o", tmp_path / "o", "--model", model,
                         "--device", "cpu")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "seg 0.0.7" in warnings[0] and f"seg {seg.__version__}" in warnings[0], err
    for path in trained["reference"].glob("*.nii.gz"):
        assert (tmp_path / "o" / path.name).read_bytes() == path.read_bytes()


def test_export_refuses_a_missing_run_and_a_folder_that_is_not_a_run(trained, tmp_path, capsys):
    code, err = seg_main(capsys, "export", tmp_path / "nope", "-o", tmp_path / "m.seg")
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1, err
    code, err = seg_main(capsys, "export", trained["data"], "-o", tmp_path / "m.seg")
    assert code == 2 and "not a run folder" in err, err
    assert not (tmp_path / "m.seg").exists()


class _OnnxNetwork:
    """An onnxruntime session called like the torch network the inferers expect."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.numpy()})[0])


def test_onnx_export_agrees_with_seg_predict(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[test]')")
    from seg.core import plugins
    from seg.core.inference import class_argmax
    from seg.core.model import build_with_weights
    from seg.core.preprocessing import Sample, build_pipeline, invert_labels, run_pipeline, to_array

    written = export_model(trained["run"], tmp_path / "m.seg", onnx=True)
    assert [p.name for p in written] == ["m.seg", "m.onnx", "m.onnx.json"]
    settings = json.loads((tmp_path / "m.onnx.json").read_text())
    session = ort.InferenceSession(str(tmp_path / settings["onnx"]), providers=["CPUExecutionProvider"])
    assert settings["input"]["shape"] == ["batch", 1, "z", 32, 32]  # the smoke experiment resamples to 32 x 32
    network = _OnnxNetwork(session)
    pipeline = build_pipeline([(s["name"], s["options"]) for s in settings["preprocess"]])
    inferer = plugins.get("inferers", settings["inferer"]["name"])(**settings["inferer"]["options"])
    predictor = load_predictor(trained["run"], device="cpu")
    agreement = []
    for path in sorted(trained["images"].iterdir()):
        image = sitk.ReadImage(str(path))
        sample, records = run_pipeline(pipeline, Sample(image))
        tensor = torch.from_numpy(to_array(sample.image))[None, None]
        labels = class_argmax(inferer(network, tensor, device=torch.device("cpu"), precision="fp32")).numpy()
        onnx_labels = sitk.GetArrayFromImage(invert_labels(pipeline, labels, records))
        seg_labels = sitk.GetArrayFromImage(predictor.labels_for(image))
        assert onnx_labels.shape == seg_labels.shape
        agreement.append(float((onnx_labels == seg_labels).mean()))
    assert min(agreement) >= 0.999, agreement
    state = load_checkpoint(trained["run"] / "checkpoint_best.pt")
    torch_net = build_with_weights(predictor.experiment.backbone, 1, 14, state["model"], "x").eval()
    x = torch.randn(2, 1, 48, 32, 32, generator=torch.Generator().manual_seed(1))  # dynamic batch and z
    with torch.no_grad():
        expected = torch_net(x)
    assert torch.allclose(network(x), expected, atol=1e-4 * float(expected.abs().max()))
