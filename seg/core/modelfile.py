"""Trained models as ``seg predict`` loads them: a fine-tuning run folder or an exported model file, with the
plugins they were made with pinned.

A model file (``seg export RUN -o MODEL.seg``) is a zip of exactly these members, read in memory with size limits
(never extracted):

    seg-model.json   the manifest: format version, seg's version, backbone, labels, pinned plugins, provenance
    config.toml      the run's resolved experiment (preprocessing, backbone, inferer, postprocessing)
    weights.pt       the network's state_dict: tensors only (``torch.save`` of a plain dict, loaded weights_only)
    MODEL.md         the model card

Pinning: every plugin the resolved experiment names is recorded with the distribution that provided it and its
version, in training checkpoints (``training_record``) and in model files. Loading checks them first: a missing
distribution is a one-line error naming what to ``pip install``; a different version (or distribution) warns once
per process and proceeds. The experiment's training plugins (loss, SSL task) are pinned too: loading the resolved
experiment validates every plugin it names.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import pickle
import tomllib
import zipfile
import zlib
from pathlib import Path

import attrs
import torch
from rich.markup import escape

from seg import __version__
from seg.core import plugins
from seg.core.checkpoint import load_checkpoint
from seg.core.config import Experiment, build_experiment, load_experiment
from seg.core.console import console
from seg.core.dataset import parse_labels, read_dataset_json
from seg.core.errors import CheckpointError, ConfigError, SegError
from seg.core.model import check_same_backbone, describe_backbone
from seg.core.runs import CONFIG

MANIFEST = "seg-model.json"
WEIGHTS = "weights.pt"
CARD = "MODEL.md"
MEMBERS = (MANIFEST, CONFIG, WEIGHTS, CARD)
FORMAT = "seg-model"
FORMAT_VERSION = 1
#: Refuse a model file whose weights declare more bytes than this (2 GiB: 500 M float32 parameters; the paper's
#: V-Net is 174 MB). The other members may hold 16 MiB each.
MAX_MODEL_BYTES = int(os.environ.get("SEG_MAX_MODEL_BYTES", 2 * 1024**3))
MAX_TEXT_BYTES = 16 * 1024**2
_warned: set[tuple[str, str, str]] = set()


@attrs.frozen
class TrainedModel:
    """A fine-tuned network's weights with everything needed to rebuild and run it.

    ``source`` (the checkpoint or model file) and ``config_source`` (where the experiment came from) name them in
    errors; ``record`` holds the plain-data provenance: ``epoch``, ``plugins`` (pins), ``dataset``, ``seg_version``.
    """

    experiment: Experiment
    backbone: dict
    weights: dict
    labels: dict
    source: Path
    config_source: str
    record: dict


def experiment_plugins(exp: Experiment) -> list[tuple[str, str]]:
    """(family, name) of every plugin ``exp`` names, in the order a run uses them, without repeats."""
    choices = [("preprocessors", c.name) for c in exp.preprocess] + [("backbones", exp.backbone.name)]
    if exp.pretrain is not None:
        choices.append(("ssl_tasks", exp.pretrain.ssl.name))
    choices += [("losses", exp.finetune.loss.name), ("inferers", exp.predict.inferer.name)]
    choices += [("inferers", c.name) for c in exp.predict.postprocess]
    return list(dict.fromkeys(choices))


def plugin_pins(exp: Experiment) -> list[dict]:
    """Every plugin ``exp`` names with the distribution and version installed now that provide it."""
    pins = []
    for family, name in experiment_plugins(exp):
        entry = plugins.entry(family, name)
        pins.append({"family": family, "name": name, "distribution": entry.package, "version": entry.version})
    return pins


def describe_dataset(root: Path) -> dict:
    """The descriptive fields of ``root/dataset.json`` (name, description, reference, licence, release,
    numTraining); empty when it cannot be read."""
    try:
        meta = read_dataset_json(root)
    except SegError:
        return {}
    keys = ("name", "description", "reference", "licence", "license", "release", "numTraining")
    return {k: meta[k] for k in keys if isinstance(meta.get(k), (str, int, float)) and not isinstance(meta[k], bool)}


def training_record(exp: Experiment, dataset) -> dict:
    """What a training checkpoint records for plugin pinning and ``seg export``: the pinned plugins, seg's version
    and the training dataset's description (``dataset``: a ``seg.core.dataset.Dataset``)."""
    return {"plugins": json.dumps(plugin_pins(exp)), "seg_version": __version__,
            "dataset": json.dumps(describe_dataset(dataset.root))}


def _normal(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def check_pins(pins, where: Path | str) -> None:
    """Check that every pinned plugin is installed: fail with one line naming the distribution and version to
    install when it is not; warn once (per process) when another version or distribution provides it."""
    if not isinstance(pins, list):
        raise CheckpointError(f"{where}: malformed plugin list (expected a list of pins)")
    for pin in pins:
        if not (isinstance(pin, dict) and all(isinstance(pin.get(k), str) and pin.get(k)
                                              for k in ("family", "name", "distribution"))
                and isinstance(pin.get("version"), str)):
            raise CheckpointError(f"{where}: malformed plugin pin {str(pin)[:120]} (needs family, name, distribution, "
                                  "version)")
        family, name, dist, version = pin["family"], pin["name"], pin["distribution"], pin["version"]
        if family not in plugins.FAMILIES:
            raise CheckpointError(f"{where}: pins a plugin of unknown family {family!r}")
        what = f"{plugins.SINGULAR[family]} {name!r}"
        try:
            entry = plugins.entry(family, name)
        except ConfigError:
            installed = _installed_version(dist)
            if installed is None:
                raise ConfigError(f"{where}: needs the {what} from {dist} {version}, which is not installed: "
                                  f"pip install '{dist}=={version}'") from None
            allowed = os.environ.get("SEG_LOAD_PLUGINS")
            if allowed is not None and _normal(dist) not in {_normal(a) for a in allowed.split(",")} \
                    and _normal(dist) != plugins.OWN_DISTRIBUTION:
                raise ConfigError(f"{where}: needs the {what} from {dist}, installed but not loaded "
                                  "(SEG_LOAD_PLUGINS leaves it out)") from None
            raise ConfigError(f"{where}: needs the {what} from {dist} {version}, but {dist} {installed} is installed "
                              f"and provides no {what}") from None
        if _normal(entry.package) != _normal(dist) or entry.version != version:
            key = (_normal(dist), version, f"{entry.package} {entry.version}")
            if key not in _warned:
                _warned.add(key)
                console.print(f"[yellow]warning: {escape(str(where))}: made with {escape(dist)} {escape(version)}; "
                              f"{escape(entry.package)} {escape(entry.version)} is installed here", highlight=False,
                              soft_wrap=True)


def _check_pins_cover(exp: Experiment, pins: list, where: Path) -> None:
    pinned = {(p["family"], p["name"]) for p in pins}
    for family, name in experiment_plugins(exp):
        if (family, name) not in pinned:
            raise CheckpointError(f"{where}: its experiment uses the {plugins.SINGULAR[family]} {name!r}, which "
                                  "its manifest does not pin")


def load_model(path: Path, what: str = "--model") -> TrainedModel:
    """The model at ``path``: a run folder (``from_run``) or an exported model file (``from_file``)."""
    path = Path(path)
    if path.is_dir():
        return from_run(path, what)
    if not path.exists():
        raise SegError(f"{what} {path}: no such run folder or model file")
    return from_file(path, what)


def from_run(run: Path, what: str = "--model") -> TrainedModel:
    """A fine-tuning run folder's model: its ``config.toml`` and its best (else latest) checkpoint, memory-mapped
    (the optimizer state is never read)."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise SegError(f"{what} {run}: not a run folder (no {CONFIG})")
    path = run / "checkpoint_best.pt"
    if not path.exists():
        path = run / "checkpoint_latest.pt"
    state = load_checkpoint(path, mmap=True)
    if state.get("kind") != "finetune":
        raise CheckpointError(f"{path}: a {state.get('kind')} checkpoint; prediction needs a fine-tuning run")
    record = {k: state[k] for k in ("epoch", "seg_version") if k in state}
    for key in ("plugins", "dataset"):
        if key in state:
            try:
                record[key] = json.loads(state[key])
            except (TypeError, json.JSONDecodeError):
                raise CheckpointError(f"{path}: malformed {key!r} record") from None
    if "plugins" in record:
        check_pins(record["plugins"], path)
    exp = load_experiment(str(run / CONFIG))
    saved = state["backbone"]
    check_same_backbone(path, saved, describe_backbone(exp.backbone, 1, saved["out_channels"]))
    return TrainedModel(exp, saved, state["model"], json.loads(state["labels"]), path, str(run / CONFIG), record)


def _escapes(name: str) -> bool:
    """Whether a member name could land outside a folder it were extracted to."""
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name \
        or "\\" in name


def read_members(path: Path) -> dict[str, bytes]:
    """The members of a model file, in memory: refused with one line when a name could escape, a member is
    missing, unexpected or repeated, or declares more bytes than its limit (a zip bomb), before anything is
    decompressed."""
    limit = MAX_MODEL_BYTES + 3 * MAX_TEXT_BYTES
    if path.stat().st_size > limit:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, above the model file limit of {limit} "
                              "(SEG_MAX_MODEL_BYTES)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            for name in names:
                if _escapes(name):
                    raise CheckpointError(f"{path}: refused: member name {name!r} would escape the model file")
            if MANIFEST not in names:
                raise CheckpointError(f"{path}: not a seg model file (no {MANIFEST}); give a run folder or a file "
                                      "written by `seg export`")
            for name in names:
                if name not in MEMBERS:
                    raise CheckpointError(f"{path}: refused: unexpected member {name!r} (a model file holds "
                                          f"{', '.join(MEMBERS)})")
            if len(set(names)) != len(names):
                raise CheckpointError(f"{path}: refused: a member appears twice")
            missing = [name for name in MEMBERS if name not in names]
            if missing:
                raise CheckpointError(f"{path}: refused: member {missing[0]!r} is missing")
            members = {}
            for info in infos:
                cap = MAX_MODEL_BYTES if info.filename == WEIGHTS else MAX_TEXT_BYTES
                if info.file_size > cap:
                    raise CheckpointError(f"{path}: refused: member {info.filename!r} declares {info.file_size} "
                                          f"bytes uncompressed, above the limit of {cap}"
                                          + (" (SEG_MAX_MODEL_BYTES)" if info.filename == WEIGHTS else ""))
                with archive.open(info) as member:
                    data = member.read(cap + 1)
                if len(data) != info.file_size:
                    raise CheckpointError(f"{path}: member {info.filename!r} holds other than the "
                                          f"{info.file_size} bytes it declares")
                members[info.filename] = data
            return members
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a seg model file, or truncated or corrupt ({reason})") from None


def _text(members: dict, name: str, path: Path) -> str:
    try:
        return members[name].decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {name} is not UTF-8 text") from None


def _manifest(members: dict, path: Path) -> dict:
    try:
        manifest = json.loads(_text(members, MANIFEST, path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {MANIFEST} is not a seg model manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: {MANIFEST}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer seg (model format {version}, this seg reads "
                              f"{FORMAT_VERSION}); upgrade seg")
    backbone = manifest.get("backbone")
    if not (isinstance(backbone, dict) and isinstance(backbone.get("name"), str)
            and isinstance(backbone.get("options"), str)
            and all(type(backbone.get(k)) is int and backbone[k] > 0 for k in ("in_channels", "out_channels"))):
        raise CheckpointError(f"{path}: {MANIFEST}: malformed backbone description")
    manifest["labels"] = parse_labels(manifest.get("labels"), f"{path}: {MANIFEST}")
    return manifest


def _weights(data: bytes, path: Path) -> dict:
    """The state_dict in ``weights.pt``: loaded with ``weights_only=True``, and tensors only."""
    try:
        weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(f"{path}: {WEIGHTS}: refused to load (not plain weights: {reason[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {WEIGHTS}: truncated or not a weights file ({str(exc).splitlines()[0][:160]})"
                              ) from None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"{path}: {WEIGHTS}: not a plain dict of tensors")
    return weights


def from_file(path: Path, what: str = "--model") -> TrainedModel:
    """An exported model file's model; every check runs before its weights are unpickled (safely)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what} {path}: not a run folder or a seg model file (not a zip archive, or truncated)")
    members = read_members(path)
    manifest = _manifest(members, path)
    pins = manifest.get("plugins")
    check_pins(pins, path)
    try:
        raw = tomllib.loads(_text(members, CONFIG, path))
    except tomllib.TOMLDecodeError as exc:
        raise CheckpointError(f"{path}: {CONFIG}: invalid TOML: {exc}") from None
    name = raw.pop("name", path.stem)
    exp = build_experiment(raw, str(name), f"{path}:{CONFIG}")
    _check_pins_cover(exp, pins, path)
    saved = manifest["backbone"]
    check_same_backbone(path, saved, describe_backbone(exp.backbone, 1, saved["out_channels"]))
    record = {k: manifest[k] for k in ("epoch", "seg_version", "plugins", "dataset") if k in manifest}
    return TrainedModel(exp, saved, _weights(members[WEIGHTS], path), manifest["labels"], path,
                        f"{path}:{CONFIG}", record)
