"""``seg evaluate``: DSC and NSD per case and organ for a folder of predictions against ground truth."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk
from rich.table import Table

from seg.core.dataset import FLARE22_LABELS
from seg.core.errors import DataError
from seg.core.io import Geometry, case_name, image_suffix, read_image, write_text
from seg.core.metrics import FLARE22_TOLERANCES, evaluate_case

SHORT_NAMES = {"liver": "Liv.", "right_kidney": "RK", "spleen": "Spl.", "pancreas": "Pan.", "aorta": "Aor.",
               "inferior_vena_cava": "IVC", "right_adrenal_gland": "RAG", "left_adrenal_gland": "LAG",
               "gallbladder": "Gal.", "esophagus": "Eso.", "stomach": "Sto.", "duodenum": "Duo.",
               "left_kidney": "LK"}


@attrs.frozen
class EvaluationReport:
    """Per case and organ scores: ``rows`` of dicts with case, organ, label, dsc, nsd (and note)."""

    rows: list[dict]
    organs: list[str]

    def mean_per_organ(self) -> dict[str, dict[str, float]]:
        """Mean DSC and NSD over cases, per organ name."""
        return {o: {m: statistics.fmean(r[m] for r in self.rows if r["organ"] == o) for m in ("dsc", "nsd")}
                for o in self.organs}

    def overall(self) -> dict[str, float]:
        """Mean over organs of the per-organ means."""
        means = self.mean_per_organ()
        return {m: statistics.fmean(v[m] for v in means.values()) for m in ("dsc", "nsd")}

    def write_csv(self, path) -> None:
        """Per case and organ rows as CSV (atomic)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "organ", "label", "dsc", "nsd", "note"])
        writer.writeheader()
        writer.writerows({"note": "", **r} for r in self.rows)
        write_text(buffer.getvalue(), path)

    def write_json(self, path) -> None:
        """Rows, per-organ means and the overall mean as JSON (atomic)."""
        write_text(json.dumps({"cases": self.rows, "mean_per_organ": self.mean_per_organ(),
                               "mean": self.overall()}, indent=1), path)

    def table(self, per_case: bool = False) -> Table:
        """The paper's Table 3 layout: organs as columns, DSC(%) and NSD(%) rows (or one row per case)."""
        heads = [SHORT_NAMES.get(o, o) for o in self.organs]
        table = Table("", *heads, "Mean", title="per-case DSC(%) / NSD(%)" if per_case else "DSC / NSD (%)")
        if per_case:
            for case in dict.fromkeys(r["case"] for r in self.rows):
                mine = {r["organ"]: r for r in self.rows if r["case"] == case}
                cells = [f"{100 * mine[o]['dsc']:.1f}/{100 * mine[o]['nsd']:.1f}" for o in self.organs]
                mean_d = statistics.fmean(mine[o]["dsc"] for o in self.organs)
                mean_n = statistics.fmean(mine[o]["nsd"] for o in self.organs)
                table.add_row(case, *cells, f"{100 * mean_d:.1f}/{100 * mean_n:.1f}")
            return table
        means, overall = self.mean_per_organ(), self.overall()
        for metric, name in (("dsc", "DSC(%)"), ("nsd", "NSD(%)")):
            table.add_row(name, *[f"{100 * means[o][metric]:.2f}" for o in self.organs],
                          f"{100 * overall[metric]:.2f}")
        return table


def _labels_near(gt_dir: Path) -> dict[int, str]:
    for folder in (gt_dir, gt_dir.parent):
        path = folder / "dataset.json"
        if path.is_file():
            labels = json.loads(path.read_text()).get("labels", {})
            found = {int(v): k for k, v in labels.items() if int(v) != 0}
            if found:
                return dict(sorted(found.items()))
    return {v: k for k, v in FLARE22_LABELS.items() if v != 0}


def _oriented(image: sitk.Image) -> tuple[np.ndarray, tuple]:
    """Labels as (z, y, x) with z the body axis (LPS), and the matching spacing."""
    image = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]


def evaluate_folders(pred_dir, gt_dir, labels: dict[int, str] | None = None,
                     tolerances: dict[int, float] | float | None = None, progress=None) -> EvaluationReport:
    """Score every ground-truth case of ``gt_dir`` against the same-named file of ``pred_dir``."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, option in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not folder.is_dir():
            raise DataError(f"{option} {folder}: no such folder")
    labels = labels or _labels_near(gt_dir)
    if tolerances is None:
        tolerances = {v: FLARE22_TOLERANCES.get(v, 2.0) for v in labels}
    elif isinstance(tolerances, (int, float)):
        tolerances = {v: float(tolerances) for v in labels}
    preds = {case_name(p): p for p in pred_dir.iterdir() if image_suffix(p)}
    gts = sorted(p for p in gt_dir.iterdir() if image_suffix(p))
    if not gts:
        raise DataError(f"--gt {gt_dir}: no label maps in this folder")
    rows = []
    for gt_path in gts:
        case = case_name(gt_path)
        gt_image = read_image(gt_path)
        pred_path = preds.get(case)
        if pred_path is None:
            rows += [{"case": case, "organ": n, "label": v, "dsc": 0.0, "nsd": 0.0, "note": "missing prediction"}
                     for v, n in labels.items()]
        else:
            pred_image = read_image(pred_path)
            if not Geometry.of(pred_image).matches(Geometry.of(gt_image)):
                raise DataError(f"{pred_path}: geometry differs from its ground truth {gt_path.name} "
                                f"(size/spacing/origin/direction)")
            gt, spacing = _oriented(gt_image)
            pred, _ = _oriented(pred_image)
            scores = evaluate_case(pred, gt, spacing, labels, tolerances)
            rows += [{"case": case, "organ": labels[v], "label": v, "dsc": d, "nsd": n} for v, (d, n) in scores.items()]
        if progress is not None:
            progress(1)
    return EvaluationReport(rows, list(labels.values()))
