"""Experiments: attrs classes loaded from TOML (``seg/registry.toml`` or a user file), validated on load.

An experiment names, by plugin name, its preprocessing steps, its backbone, and the plugins of each stage
(``pretrain``, ``finetune``, ``predict``) with their options. ``extends = "other"`` starts from another
experiment of the same file. Every error names the TOML key path.
"""

from __future__ import annotations

import copy
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path

import attrs

from seg.core import plugins
from seg.core.errors import ConfigError


@attrs.frozen
class PluginChoice:
    """A plugin picked by name, with the options passed to its factory."""

    name: str
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class Optimizer:
    """Adam (the paper's), AdamW or SGD (``momentum``; ``nesterov = false`` is plain momentum, PCRL's official)."""

    name: str = attrs.field(default="adam", validator=attrs.validators.in_(["adam", "adamw", "sgd"]))
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True


@attrs.frozen
class Scheduler:
    """The learning-rate schedule, stepped once per epoch (formulas in ``seg.core.schedules``): ``multistep``
    (the paper's: times ``gamma`` at each milestone epoch), ``poly`` (nnU-Net's: ``(1 - t) ** power``),
    ``cosine`` (down to ``min_factor``) or ``constant``; any of them after ``warmup_epochs`` of linear warm-up."""

    milestones: list[int] = attrs.field(factory=lambda: [100, 200, 500])
    gamma: float = 0.5
    name: str = attrs.field(default="multistep", validator=attrs.validators.in_(["multistep", "poly", "cosine",
                                                                                  "constant"]))
    warmup_epochs: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    power: float = 0.9
    min_factor: float = 0.0


def _pair(instance, attribute, value) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{attribute.name} must be [low, high] with low <= high, got {value!r}")


@attrs.frozen
class Augment:
    """Fine-tuning augmentations, drawn per patch on the training device (``seg.core.augment``); all off by
    default (the paper names none). Probabilities are per patch; ``flip_prob`` per axis."""

    flip_prob: float = 0.0
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0
    noise_std: float = 0.0
    rotation: list[float] = attrs.field(factory=lambda: [0.0, 0.0, 0.0],
                                        validator=attrs.validators.deep_iterable(attrs.validators.ge(0.0),
                                                                                 attrs.validators.min_len(3)))
    scale: list[float] = attrs.field(factory=lambda: [1.0, 1.0], validator=_pair)
    spatial_prob: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 8.0
    elastic_prob: float = 0.0
    gamma_range: list[float] = attrs.field(factory=lambda: [0.7, 1.5], validator=_pair)
    gamma_prob: float = 0.0
    blur_sigma: list[float] = attrs.field(factory=lambda: [0.5, 1.0], validator=_pair)
    blur_prob: float = 0.0


@attrs.frozen
class Pretrain:
    """The self-supervised stage: an SSL task trained on unlabeled patches."""

    ssl: PluginChoice = attrs.field(factory=lambda: PluginChoice("pcrl"))
    epochs: int = 100
    steps_per_epoch: int = 0
    batch_size: int = 4
    patch_size: list[int] = attrs.field(factory=lambda: [64, 128, 128])
    use_labeled_images: bool = False
    optimizer: Optimizer = attrs.field(factory=Optimizer)
    scheduler: Scheduler = attrs.field(factory=lambda: Scheduler([], 1.0))
    checkpoint_every: int = 1
    probe_every: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # seg.core.probe; 0: off
    probe_steps: int = attrs.field(default=20, validator=attrs.validators.ge(1))


@attrs.frozen
class Finetune:
    """The supervised stage: loss, patches, optimisation, validation."""

    loss: PluginChoice = attrs.field(factory=lambda: PluginChoice("gdice_ce"))
    epochs: int = 2000
    steps_per_epoch: int = 0
    batch_size: int = 4
    patch_size: list[int] = attrs.field(factory=lambda: [80, 160, 160])
    optimizer: Optimizer = attrs.field(factory=Optimizer)
    scheduler: Scheduler = attrs.field(factory=Scheduler)
    augment: Augment = attrs.field(factory=Augment)
    class_share: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    val_fraction: float = 0.2
    val_every: int = 10
    checkpoint_every: int = 1
    # validate and ship a moving average of the weights with this decay (seg.core.averaging); 0: the weights
    ema: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)])
    cases: list[str] = attrs.field(factory=list)  # labeled cases that take part (a label budget); []: all
    val_cases: list[str] = attrs.field(factory=list)  # validate on these, kept out of training; []: split `cases`
    # the forward pass: auto = fp16 AMP on CUDA; bf16 on CUDA; the CPU trains at fp32 (seg.core.train docstring)
    precision: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "fp16", "bf16", "fp32"]))


@attrs.frozen
class Predict:
    """Inference: the inferer, optional postprocessing, device and precision."""

    inferer: PluginChoice = attrs.field(factory=lambda: PluginChoice("z_sliding_window"))
    postprocess: list[PluginChoice] = attrs.field(factory=list)
    precision: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "fp16", "bf16", "fp32"]))
    device: str = attrs.field(default="auto", validator=attrs.validators.in_(["auto", "cpu", "cuda"]))


@attrs.frozen
class Experiment:
    """A complete, named recipe: everything a run needs besides the data."""

    name: str
    description: str = ""
    seed: int = 0
    unlabeled_dir: str = "unlabeled"
    preprocess: list[PluginChoice] = attrs.field(factory=list)
    backbone: PluginChoice = attrs.field(factory=lambda: PluginChoice("vnet"))
    pretrain: Pretrain | None = None
    finetune: Finetune = attrs.field(factory=Finetune)
    predict: Predict = attrs.field(factory=Predict)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _structure(tp, value, path: str):
    """Build a value of type ``tp`` from TOML data, or fail naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        # TOML has no null: `false` switches an optional table off (e.g. `pretrain = false`).
        return None if value is None or value is False else _structure(args[0], value, path)
    if attrs.has(tp):
        if tp is PluginChoice and isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {type(value).__name__} {value!r}")
        fields = {f.name: f for f in attrs.fields(tp)}
        hints = typing.get_type_hints(tp)
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{path}.{unknown[0]}: unknown key; expected one of {', '.join(fields)}")
        kwargs = {k: _structure(hints[k], v, f"{path}.{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_structure(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` (tables merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_extends(table: dict, name: str, source: str, seen=()) -> dict:
    raw = table[name]
    parent = raw.get("extends")
    if parent is None:
        return dict(raw)
    if parent not in table:
        raise ConfigError(f"{source}: {name}.extends: unknown experiment {parent!r}")
    if parent in seen:
        raise ConfigError(f"{source}: {name}.extends: circular extends through {parent!r}")
    merged = _merge(_resolve_extends(table, parent, source, (*seen, name)), raw)
    merged.pop("extends", None)
    return merged


def parse_value(text: str):
    """A ``--set`` value: any TOML value (``3e-4``, ``true``, ``[1, 2]``, ``"x"``), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one ``KEY=VALUE`` (dotted key) to a raw experiment table; returns a new table."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted KEY")
    parts = key.strip().split(".")
    out = copy.deepcopy(raw)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part in _CHOICE_KEYS:
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a table")
        node = child
    node[parts[-1]] = parse_value(value)
    return out


_CHOICE_KEYS = {"backbone", "ssl", "loss", "inferer"}


def _check_plugins(exp: Experiment, where: str) -> None:
    """Every plugin name exists and every option is accepted by its factory."""
    checks = [("backbones", exp.backbone, f"{where}.backbone", ("in_channels", "out_channels"))]
    checks += [("preprocessors", c, f"{where}.preprocess[{i}]", ()) for i, c in enumerate(exp.preprocess)]
    if exp.pretrain is not None:
        checks.append(("ssl_tasks", exp.pretrain.ssl, f"{where}.pretrain.ssl", ("backbone",)))
    checks.append(("losses", exp.finetune.loss, f"{where}.finetune.loss", ("num_classes",)))
    checks.append(("inferers", exp.predict.inferer, f"{where}.predict.inferer", ()))
    checks += [("inferers", c, f"{where}.predict.postprocess[{i}]", ()) for i, c in enumerate(exp.predict.postprocess)]
    for family, choice, path, fixed in checks:
        try:
            plugins.entry(family, choice.name)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        plugins.check_options(family, choice.name, choice.options, f"{path}.options", fixed)


def build_experiment(raw: dict, name: str, source: str, overrides=()) -> Experiment:
    """Validate a raw experiment table (after ``--set`` overrides) into an ``Experiment``."""
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    raw = {**raw, "name": name}
    exp = _structure(Experiment, raw, f"{source}: {name}")
    _check_plugins(exp, f"{source}: {name}")
    return exp


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a syntax error names the file and line."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def registry_path() -> Path:
    """The built-in ``seg/registry.toml``."""
    return Path(str(resources.files("seg").joinpath("registry.toml")))


def raw_experiments(path: Path | None = None) -> dict[str, dict]:
    """Every experiment of a registry file, ``extends`` resolved, not yet validated."""
    path = Path(path) if path else registry_path()
    data = read_toml(path)
    table = data.get("experiments")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: no [experiments.NAME] tables")
    return {name: _resolve_extends(table, name, path.name) for name in table}


def load_experiment(name_or_file: str, overrides=(), registry: Path | None = None) -> Experiment:
    """An experiment by registry name, or from a TOML file holding one resolved experiment (``config.toml``
    written into every run folder)."""
    candidate = Path(name_or_file)
    if name_or_file.endswith(".toml"):
        raw = read_toml(candidate)
        exp_name = raw.pop("name", candidate.stem)
        return build_experiment(raw, exp_name, str(candidate), overrides)
    experiments = raw_experiments(registry)
    if name_or_file not in experiments:
        known = ", ".join(sorted(experiments))
        raise ConfigError(f"unknown experiment {name_or_file!r}; available: {known}")
    source = (registry or registry_path()).name
    return build_experiment(experiments[name_or_file], name_or_file, source, overrides)


def to_dict(exp: Experiment) -> dict:
    """The experiment as plain data (what ``config.toml`` holds)."""
    return attrs.asdict(exp, recurse=True)


#: what each training stage's weights do not depend on: pretraining never reads ``finetune`` or ``predict``
#: (its probe does, with the run's own saved values), fine-tuning never reads ``pretrain`` (it starts from a
#: checkpoint), and no stage reads ``name`` or ``description``
_NOT_READ = {"pretrain": ("name", "description", "finetune", "predict"), "finetune": ("name", "description", "pretrain")}


def _differences(saved, wanted, key: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(saved) | set(wanted))
                for d in _differences(saved.get(k), wanted.get(k), f"{key}.{k}" if key else k)]
    return [] if saved == wanted else [f"{key} ({saved!r} there, {wanted!r} now)"]


def stage_differences(saved: Experiment, wanted: Experiment, stage: str) -> list[str]:
    """The settings training stage ``stage`` ("pretrain" or "finetune") reads where ``wanted`` differs from
    ``saved`` (a run's ``config.toml``), each as ``"dotted.key (saved there, wanted now)"``; empty: the run
    is the one ``wanted`` asks for."""
    plain = [{k: v for k, v in to_dict(e).items() if k not in _NOT_READ[stage]} for e in (saved, wanted)]
    return _differences(*plain, "")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dumps_toml(data: dict, prefix: str = "") -> str:
    """Write nested tables of plain values as TOML (tables of scalars first, then sub-tables)."""
    scalars = {k: v for k, v in data.items() if v is not None and not (isinstance(v, dict) and k != "options")}
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and k != "options"}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, table in tables.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        lines += ["", f"[{name}]", dumps_toml(table, name).strip("\n")]
    return "\n".join(lines) + "\n"


def experiment_toml(exp: Experiment) -> str:
    """The fully resolved experiment as a TOML file that ``--experiment FILE.toml`` loads back."""
    return "# Resolved experiment: rerun with --experiment <this file>\n" + dumps_toml(to_dict(exp))
