"""``seg export RUN -o MODEL.seg``: a fine-tuning run as one model file that ``seg predict --model`` runs
anywhere seg (and the plugins it pins) is installed, without the run folder or the training data.

The file's layout and how it is read are in ``seg.core.modelfile``. ``--format onnx`` also writes the network as
``MODEL.onnx`` (input ``image`` (batch, 1, z, y, x), output ``logits`` (batch, K, z, y, x); z and batch dynamic,
y and x fixed at the preprocessed in-plane size) and ``MODEL.onnx.json``: the labels, preprocessing steps, inferer
and postprocessing settings it needs around it.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from seg import __version__
from seg.core.errors import CheckpointError, SegError
from seg.core.io import atomic_path, check_output_file, write_text
from seg.core.model import build_with_weights
from seg.core.modelfile import CARD, FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, TrainedModel, from_run, plugin_pins
from seg.core.runs import CONFIG

ONNX_FORMAT = "seg-onnx"
_DATE = (1980, 1, 1, 0, 0, 0)  # zip member times: the same run exports to the same members


def export_model(run: Path, out: Path, *, onnx: bool = False, command: str | None = None) -> list[Path]:
    """Write the model of the fine-tuning run ``run`` to ``out`` (and, with ``onnx``, ``out`` with suffixes
    ``.onnx`` and ``.onnx.json``); ``command`` is the export command for the model card. Returns what was written.
    Every file is written atomically."""
    run, out = Path(run), Path(out)
    outputs = [out, *onnx_paths(out)] if onnx else [out]
    for path in outputs:
        check_output_file(path, "-o")
    if onnx:
        _require_onnx()
    model = from_run(run, "RUN")
    for name, tensor in model.weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{model.source}: model entry {name!r} is not a tensor; cannot export")
    pins = model.record.get("plugins") or plugin_pins(model.experiment)
    validation = validation_dice(run, model)
    training_command = (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else None
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seg_version": __version__,
        "trained_with_seg": model.record.get("seg_version"), "experiment": model.experiment.name,
        "backbone": dict(model.backbone), "labels": model.labels, "plugins": pins, "epoch": model.record.get("epoch"),
        "dataset": model.record.get("dataset", {}), "validation_dice": validation,
        "training_command": training_command, "export_command": command,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if onnx:
        export_onnx(model, *onnx_paths(out), pins)
    weights = io.BytesIO()
    torch.save(dict(model.weights), weights)
    card = model_card(manifest, model, out.name)
    members = [(MANIFEST, json.dumps(manifest, indent=1).encode(), zipfile.ZIP_DEFLATED),
               (CONFIG, (run / CONFIG).read_bytes(), zipfile.ZIP_DEFLATED),
               (WEIGHTS, weights.getvalue(), zipfile.ZIP_STORED),  # float weights barely compress
               (CARD, card.encode(), zipfile.ZIP_DEFLATED)]
    with atomic_path(out, suffix=".seg") as tmp:
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w") as archive:
                for name, data, method in members:
                    info = zipfile.ZipInfo(name, date_time=_DATE)
                    info.compress_type = method
                    archive.writestr(info, data)
            fh.flush()
            os.fsync(fh.fileno())
    return outputs


def onnx_paths(out: Path) -> tuple[Path, Path]:
    """Where ``--format onnx`` writes the network and its settings, beside ``out``."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".onnx"), out.with_name(stem + ".onnx.json")


def validation_dice(run: Path, model: TrainedModel) -> dict | None:
    """Validation Dice per organ name (and ``mean``) of the exported checkpoint's epoch, from the run's
    ``metrics.json``; None when that epoch was not validated (``--epochs 0``) or the file is absent."""
    try:
        history = json.loads((run / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    row = next((r for r in history if isinstance(r, dict) and r.get("epoch") == model.record.get("epoch")
                and "val_mean_dice" in r), None)
    if row is None:
        return None
    names = {value: name for name, value in model.labels.items()}
    scores = {names[value]: row[f"val_dice_{value}"] for value in sorted(names) if f"val_dice_{value}" in row}
    return {**scores, "mean": row["val_mean_dice"]}


def _choice(choice) -> str:
    options = ", ".join(f"{k} = {json.dumps(v)}" for k, v in choice.options.items())
    return f"`{choice.name}`" + (f" ({options})" if options else "")


def model_card(manifest: dict, model: TrainedModel, file_name: str) -> str:
    """The model card ``MODEL.md``: what the model segments, its training data, validation Dice per organ, and
    how it was made."""
    exp, labels = model.experiment, manifest["labels"]
    organs = sorted(((v, n) for n, v in labels.items() if v != 0))
    lines = [f"# {exp.name}: {len(organs)} structures in 3D CT", "",
             f"A `seg` model file. `seg predict -i IMAGES -o LABELS --model {file_name}` writes one uint8 label map "
             "per image, on exactly the image's grid.", "", "## What it segments", "", "| value | structure |",
             "|---:|---|", *[f"| {v} | {n} |" for v, n in organs], "", "0 is background.", "", "## Training data", ""]
    data = manifest["dataset"]
    if data:
        described = ": ".join(str(data[k]) for k in ("name", "description") if k in data) or "(unnamed dataset)"
        count = f" {data['numTraining']} labeled cases." if "numTraining" in data else ""
        extra = [f" {k.capitalize()}: {data[k]}." for k in ("reference", "licence", "license", "release") if k in data]
        lines.append(f"From its `dataset.json`: {described}.{count}{''.join(extra)}")
    else:
        lines.append("Not recorded (the run was trained before seg recorded its dataset).")
    lines += ["", "## Validation", ""]
    scores = manifest["validation_dice"]
    if scores:
        lines += [f"Dice on the run's held-out validation cases at epoch {manifest['epoch']} (the exported "
                  "checkpoint), from its `metrics.json`:", "", "| structure | Dice |", "|---|---:|"]
        lines += [f"| {n} | {d:.4f} |" for n, d in scores.items() if n != "mean"]
        lines.append(f"| **mean** | **{scores['mean']:.4f}** |")
    else:
        lines.append("No validation score for the exported checkpoint (trained for 0 epochs, or no metrics.json).")
    plugins_by_dist: dict[str, list[str]] = {}
    for pin in manifest["plugins"]:
        plugins_by_dist.setdefault(f"{pin['distribution']} {pin['version']}", []).append(pin["name"])
    lines += ["", "## How it was made", "",
              f"- Trained with: `{manifest['training_command'] or 'not recorded'}`",
              f"- Exported with: `{manifest['export_command'] or 'seg export'}` (seg {__version__}, "
              f"{manifest['exported']})",
              f"- Experiment `{exp.name}`: backbone {_choice(exp.backbone)}; preprocessing "
              f"{', '.join(_choice(c) for c in exp.preprocess) or 'none'}; inferer {_choice(exp.predict.inferer)}; "
              f"postprocessing {', '.join(_choice(c) for c in exp.predict.postprocess) or 'none'}",
              "- Plugins (predicting needs these installed): "
              + "; ".join(f"{dist} ({', '.join(names)})" for dist, names in plugins_by_dist.items()), ""]
    return "\n".join(lines)


def _require_onnx() -> None:
    if importlib.util.find_spec("onnx") is None:  # torch.onnx.export writes through it
        raise SegError("--format onnx needs the onnx package: pip install onnx (or seg[onnx])")


def plain_torch_layers(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` with every leaf layer that subclasses a ``torch.nn`` layer only to compute it faster (``vnet``'s
    in-place PReLU, matrix-product convolutions) turned back into that torch layer, in place: same parameters, a
    forward the ONNX exporter can trace. The caller checks that the function is unchanged."""
    for module in network.modules():
        kind = type(module)
        if kind.__module__.startswith("torch.") or "forward" not in vars(kind) or next(module.children(), None):
            continue
        base = next((b for b in kind.__mro__[1:] if b.__module__.startswith("torch.nn.modules.")), None)
        if base is not None and base is not torch.nn.Module:
            module.__class__ = base
    return network


def _preprocessed_in_plane(model: TrainedModel) -> tuple[int, int, bool]:
    """The (y, x) size the preprocessing gives, and whether it is fixed: two different synthetic phantoms
    (field of view, slice count) are run through the experiment's preprocessing."""
    from seg.core.preprocessing import Sample, build_pipeline, run_pipeline, to_array
    from seg.core.synth import synthetic_case

    pipeline = build_pipeline([(c.name, dict(c.options)) for c in model.experiment.preprocess])
    shapes = [to_array(run_pipeline(pipeline, Sample(synthetic_case(0, i)[0]))[0].image).shape for i in (0, 1)]
    return shapes[0][1], shapes[0][2], shapes[0][1:] == shapes[1][1:]


def export_onnx(model: TrainedModel, path: Path, settings_path: Path, pins: list) -> None:
    """Write the network as ONNX to ``path`` and its preprocessing and inferer settings to ``settings_path``."""
    _require_onnx()
    exp = model.experiment
    classes = model.backbone["out_channels"]
    network = build_with_weights(exp.backbone, 1, classes, model.weights, model.source).eval()
    if hasattr(network, "for_inference"):
        network = network.for_inference()
    plain = plain_torch_layers(copy.deepcopy(network))
    height, width, fixed = _preprocessed_in_plane(model)
    depth = int(exp.predict.inferer.options.get("divisor", 16))  # the least z the network takes; z is dynamic
    example = torch.randn((1, 1, depth, height, width), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = network(example.clone()), plain(example.clone())
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-4 * max(1.0, scale):
        raise SegError(f"backbone {exp.backbone.name!r}: cannot export to ONNX (its torch-layer subclasses compute "
                       "something other than the torch layers they extend)")
    axes = {0: "batch", 2: "z"} if fixed else {0: "batch", 2: "z", 3: "y", 4: "x"}
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plain, (example,), str(tmp), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, opset_version=17)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SegError(f"-o {path}: backbone {exp.backbone.name!r} could not be exported to ONNX "
                       f"({str(exc).strip().splitlines()[0][:160]})") from None
    y, x = (height, width) if fixed else ("y", "x")
    settings = {
        "format": ONNX_FORMAT, "format_version": 1, "seg_version": __version__, "onnx": path.name,
        "input": {"name": "image", "shape": ["batch", 1, "z", y, x], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", classes, "z", y, x], "dtype": "float32"},
        "labels": model.labels,
        "preprocess": [{"name": c.name, "options": c.options} for c in exp.preprocess],
        "inferer": {"name": exp.predict.inferer.name, "options": exp.predict.inferer.options},
        "postprocess": [{"name": c.name, "options": c.options} for c in exp.predict.postprocess],
        "precision": exp.predict.precision, "plugins": pins,
    }
    write_text(json.dumps(settings, indent=1) + "\n", settings_path)
