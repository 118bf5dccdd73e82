"""``seg evaluate``: DSC and NSD per case and organ, for a folder of predictions against a folder of ground truth.

Files pair by case name (``CASE.nii.gz`` in both folders, nnU-Net style). Scores follow FLARE22's evaluation
(see :mod:`seg.core.metrics`); a ground-truth case without a prediction scores 0 for every organ and is listed
in the report. Labels come from a ``dataset.json`` beside the ground truth (or one folder up), else they are
FLARE22's 13 organs; NSD tolerances are FLARE22's per organ (matched by organ name) unless one is given for all.
The rule is FLARE22's as the challenge ran it in 2022, or (``rule="2024"``) the official code's later one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk
from rich import box
from rich.table import Table

from seg.core.check import label_values
from seg.core.dataset import FLARE22_LABELS, parse_labels
from seg.core.errors import ConfigError, DataError
from seg.core.io import Geometry, atomic_path, case_name, image_suffix, read_image, write_text
from seg.core.metrics import FLARE22_SLICE_LIMITED, FLARE22_TOLERANCES, RULES, evaluate_case

#: Column headings of the paper's Tables 3-5, per FLARE22 label value.
SHORT_NAMES = {1: "Liv.", 2: "RK", 3: "Spl.", 4: "Pan.", 5: "Aor.", 6: "IVC", 7: "RAG", 8: "LAG", 9: "Gal.",
               10: "Eso.", 11: "Sto.", 12: "Duo.", 13: "LK"}
_REFERENCE_NAMES = {1: "Liver", 2: "RK", 3: "Spleen", 4: "Pancreas", 5: "Aorta", 6: "IVC", 7: "RAG", 8: "LAG",
                    9: "Gallbladder", 10: "Esophagus", 11: "Stomach", 12: "Duodenum", 13: "LK"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z]+", "_", name.lower()).strip("_")


#: Organ name (normalised: lower case, words joined by "_") -> FLARE22 label value; full, paper and reference names.
FLARE22_ORGANS = {_key(n): v for names in ({n: v for n, v in FLARE22_LABELS.items() if v},
                                           {n: v for v, n in SHORT_NAMES.items()},
                                           {n: v for v, n in _REFERENCE_NAMES.items()}) for n, v in names.items()}
FLARE22_ORGANS.update({"postcava": 6, "oesophagus": 10, "gall_bladder": 9})


def flare22_value(name: str) -> int | None:
    """The FLARE22 label value of an organ name ("inferior vena cava", "IVC", "Aor."...), or None."""
    return FLARE22_ORGANS.get(_key(name))


@attrs.frozen
class EvaluationReport:
    """Scores of one evaluation: ``rows`` of {case, label, organ, dsc, nsd, note}, one per case and organ.

    ``missing`` names the ground-truth cases without a prediction (their rows score 0), ``unmatched`` the
    predictions without ground truth (not scored); ``rule`` is the evaluation rule (``seg.core.metrics.RULES``).
    """

    rows: list[dict]
    labels: dict[int, str]
    tolerances: dict[int, float]
    missing: list[str] = attrs.field(factory=list)
    unmatched: list[str] = attrs.field(factory=list)
    rule: str = "2022"

    @property
    def organs(self) -> list[str]:
        """Organ names in label order."""
        return list(self.labels.values())

    @property
    def cases(self) -> list[str]:
        """Case names in evaluation order."""
        return list(dict.fromkeys(r["case"] for r in self.rows))

    def mean_per_organ(self) -> dict[str, dict[str, float]]:
        """Mean DSC and NSD over cases, per organ name."""
        return {organ: {m: statistics.fmean(r[m] for r in self.rows if r["label"] == value) for m in ("dsc", "nsd")}
                for value, organ in self.labels.items()}

    def overall(self) -> dict[str, float]:
        """Mean over organs of the per-organ means (the paper's "Mean" column)."""
        means = self.mean_per_organ().values()
        return {m: statistics.fmean(v[m] for v in means) for m in ("dsc", "nsd")}

    def csv_text(self) -> str:
        """One row per case and organ: case, organ, label, dsc, nsd, note."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "organ", "label", "dsc", "nsd", "note"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({"note": "", **r} for r in self.rows)
        return buffer.getvalue()

    def json_text(self) -> str:
        """Rows, per-organ means, overall mean, tolerances, rule and missing cases as JSON."""
        document = {"cases": self.rows, "mean_per_organ": self.mean_per_organ(), "mean": self.overall(),
                    "tolerance_mm": {self.labels[v]: t for v, t in self.tolerances.items()}, "rule": self.rule,
                    "missing_predictions": self.missing, "unmatched_predictions": self.unmatched}
        return json.dumps(document, indent=1) + "\n"

    def write_csv(self, path) -> None:
        """``csv_text`` to ``path`` (atomically)."""
        write_text(self.csv_text(), path)

    def write_json(self, path) -> None:
        """``json_text`` to ``path`` (atomically)."""
        write_text(self.json_text(), path)

    def write(self, csv_path) -> Path:
        """``csv_text`` to ``csv_path`` and ``json_text`` beside it (``.json``), both or neither: each is written
        to a temporary file first and both are renamed into place only when both are complete. Returns the
        JSON's path."""
        csv_path = Path(csv_path)
        json_path = csv_path.with_suffix(".json")
        with atomic_path(csv_path) as csv_tmp, atomic_path(json_path) as json_tmp:
            csv_tmp.write_text(self.csv_text())
            json_tmp.write_text(self.json_text())
        return json_path

    def _heading(self, value: int) -> str:
        flare = flare22_value(self.labels[value])
        return SHORT_NAMES[flare] if flare is not None else self.labels[value]

    def table(self, per_case: bool = False) -> Table:
        """The paper's Table 3/4 layout: organs as columns plus Mean, rows DSC(%) and NSD(%) of the means over
        cases; with ``per_case``, those two rows for every case instead (about 130 columns wide)."""
        headings = [self._heading(v) for v in self.labels]
        caption = (f"{len(self.missing)} case(s) without a prediction scored 0: {', '.join(self.missing)}"
                   if self.missing else None)
        title = "DSC and NSD (%) per case" if per_case else f"DSC and NSD (%), mean of {len(self.cases)} cases"
        if self.rule != "2022":
            title += f" ({self.rule} rule: NSD 0 where DSC < 0.2)"
        table = Table(*(["Case"] if per_case else []), "Organ", title=title, caption=caption, box=box.SIMPLE_HEAD)
        for heading in (*headings, "Mean"):
            table.add_column(heading, justify="right")
        if per_case:
            for case in self.cases:
                mine = {r["label"]: r for r in self.rows if r["case"] == case}
                for metric, name in (("dsc", "DSC(%)"), ("nsd", "NSD(%)")):
                    values = [mine[v][metric] for v in self.labels]
                    table.add_row(case if metric == "dsc" else "", name, *[f"{100 * x:.1f}" for x in values],
                                  f"{100 * statistics.fmean(values):.1f}", end_section=metric == "nsd")
            return table
        means, overall = self.mean_per_organ(), self.overall()
        for metric, name in (("dsc", "DSC(%)"), ("nsd", "NSD(%)")):
            table.add_row(name, *[f"{100 * means[o][metric]:.2f}" for o in self.organs], f"{100 * overall[metric]:.2f}")
        return table


def labels_near(gt_dir: Path) -> dict[int, str]:
    """Label value -> organ name from a ``dataset.json`` in ``gt_dir`` or its parent, else FLARE22's 13 organs."""
    for folder in (gt_dir, gt_dir.parent):
        path = folder / "dataset.json"
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: not readable JSON ({exc})") from None
            found = parse_labels(meta.get("labels") if isinstance(meta, dict) else None, str(path))
            return {v: n for n, v in sorted(found.items(), key=lambda kv: kv[1]) if v != 0}
    return {v: n for n, v in FLARE22_LABELS.items() if v != 0}


def _labels_source(gt_dir: Path) -> str:
    """Where :func:`labels_near` found the labels, for messages."""
    for folder in (gt_dir, gt_dir.parent):
        if (folder / "dataset.json").is_file():
            return f"from {folder / 'dataset.json'}"
    return "FLARE22's 13 organs; put a dataset.json beside the ground truth for others"


def resolve_tolerances(labels: dict[int, str], tolerances=None) -> dict[int, float]:
    """NSD tolerance in mm per label: one number for all, a mapping per label value, or (None) FLARE22's
    tolerance of the organ each label names."""
    if tolerances is None:
        unknown = [f"{n!r} ({v})" for v, n in labels.items() if flare22_value(n) is None]
        if unknown:
            raise ConfigError(f"--tolerance: no FLARE22 NSD tolerance for label {', '.join(unknown)}; "
                              "give one tolerance in mm for all labels")
        tolerances = {v: FLARE22_TOLERANCES[flare22_value(n)] for v, n in labels.items()}
    elif isinstance(tolerances, (int, float)):
        tolerances = {v: float(tolerances) for v in labels}
    missing = [v for v in labels if v not in tolerances]
    if missing:
        raise ConfigError(f"tolerances: no NSD tolerance for label value(s) {missing}")
    for value in labels:
        t = tolerances[value]
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"--tolerance {t}: must be a finite number of mm, 0 or more")
    return {v: float(tolerances[v]) for v in labels}


def _axial_first(image: sitk.Image) -> tuple[np.ndarray, tuple[float, ...]]:
    """The label array with the axis closest to the body (head-feet) axis first, and its spacing (mm).

    For a scan stored axially (every FLARE22 case) that is the array as read, slice axis first, as the
    reference evaluation sees it; axes are only reordered, never flipped.
    """
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        array = array.astype(np.int64)  # the reference casts to integers by truncation
    direction = np.reshape(image.GetDirection(), (3, 3))
    index_axis = max((2, 1, 0), key=lambda j: abs(direction[2, j]))
    order = (2 - index_axis, *[a for a in range(3) if a != 2 - index_axis])
    spacing = image.GetSpacing()[::-1]
    return array.transpose(order), tuple(float(spacing[a]) for a in order)


def _images_by_case(folder: Path, option: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not image_suffix(path) or not path.is_file():
            continue
        case = case_name(path)
        if case in found:
            raise DataError(f"{option} {path}: a second file for case {case!r} (also {found[case].name})")
        found[case] = path
    return found


def evaluate_folders(pred_dir, gt_dir, labels: dict[int, str] | None = None,
                     tolerances: dict[int, float] | float | None = None, progress=None,
                     rule: str = "2022") -> EvaluationReport:
    """Score every ground-truth case of ``gt_dir`` against the same-named file of ``pred_dir`` under ``rule``
    (``seg.core.metrics.RULES``); ``progress(0, total=cases)`` is called first, ``progress(1)`` after each case."""
    if rule not in RULES:
        raise ConfigError(f"--rule {rule}: expected one of {', '.join(RULES)}")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, option in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not folder.is_dir():
            raise DataError(f"{option} {folder}: " + ("not a folder" if folder.exists() else "no such folder"))
    complete = not labels  # labels read from dataset.json (or FLARE22's) list every value a label map may hold
    labels = dict(labels) if labels else labels_near(gt_dir)
    if 0 in labels:
        raise ConfigError("labels: value 0 is the background and cannot be scored")
    tolerances = resolve_tolerances(labels, tolerances)
    slice_limited = {v for v, n in labels.items() if flare22_value(n) in FLARE22_SLICE_LIMITED}
    gts, preds = _images_by_case(gt_dir, "--gt"), _images_by_case(pred_dir, "--pred")
    if not gts:
        raise DataError(f"--gt {gt_dir}: no label maps in this folder")
    if not preds:
        raise DataError(f"--pred {pred_dir}: no label maps in this folder (expected CASE.nii.gz files named like "
                        f"the ground truth's, e.g. {next(iter(gts.values())).name})")
    rows, missing = [], []
    if progress is not None:
        progress(0, total=len(gts))
    for case, gt_path in gts.items():
        pred_path = preds.get(case)
        if pred_path is None:
            missing.append(case)
            rows += [{"case": case, "organ": n, "label": v, "dsc": 0.0, "nsd": 0.0, "note": "missing prediction"}
                     for v, n in labels.items()]
        else:
            gt_image, pred_image = read_image(gt_path), read_image(pred_path)
            if not Geometry.of(pred_image).matches(Geometry.of(gt_image)):
                raise DataError(f"{pred_path}: its grid (size, spacing, origin, direction) differs from its ground "
                                f"truth {gt_path}")
            gt, spacing = _axial_first(gt_image)
            pred, _ = _axial_first(pred_image)
            for name, array, path in (("prediction", pred, pred_path), ("ground truth", gt, gt_path)):
                if array.dtype.kind not in "iub" or array.min() < 0:
                    raise DataError(f"{path}: a {name} label map must hold non-negative integer labels")
                if complete:
                    extra = sorted(label_values(array)[0] - {0, *labels})
                    if extra:
                        raise DataError(f"{path}: {name} label values {extra[:10]} are not among the labels "
                                        f"{sorted(labels)} ({_labels_source(gt_dir)})")
            scores = evaluate_case(pred, gt, spacing, labels, tolerances, slice_limited=slice_limited, rule=rule)
            rows += [{"case": case, "organ": labels[v], "label": v, "dsc": d, "nsd": n} for v, (d, n) in scores.items()]
        if progress is not None:
            progress(1)
    unmatched = sorted(set(preds) - set(gts))
    return EvaluationReport(rows, labels, tolerances, missing, unmatched, rule)
