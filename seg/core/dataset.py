"""The dataset layout: nnU-Net v2 raw folders (FLARE22 is distributed this way) and ``dataset.json``.

    DATA/dataset.json              channel_names, labels (name -> value), numTraining, file_ending
    DATA/imagesTr/CASE_0000.nii.gz labeled images (one CT channel, suffix ``_0000``)
    DATA/labelsTr/CASE.nii.gz      their label maps
    DATA/imagesTs/, DATA/labelsTs/ test images, with labels where given
    DATA/unlabeled/                unlabeled scans for pretraining (``_0000`` optional; name configurable)

Images may be ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``/``.mhd`` files or sub-folders that each hold one DICOM
series; a sub-folder holding image files or further folders only groups images and is searched in turn.
``scan_dataset`` lists every layout problem it meets; ``open_dataset`` refuses the first fatal one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs

from seg.core.errors import DataError
from seg.core.io import IMAGE_SUFFIXES, case_name, image_suffix, write_text

#: The 13 FLARE22 organs (snake_case names) and background, as in the challenge's label maps.
FLARE22_LABELS: dict[str, int] = {
    "background": 0, "liver": 1, "right_kidney": 2, "spleen": 3, "pancreas": 4, "aorta": 5,
    "inferior_vena_cava": 6, "right_adrenal_gland": 7, "left_adrenal_gland": 8, "gallbladder": 9,
    "esophagus": 10, "stomach": 11, "duodenum": 12, "left_kidney": 13,
}

_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")


@attrs.frozen
class Case:
    """One scan: its name (file name without suffix and ``_0000``), image path, and label path if labeled."""

    name: str
    image: Path
    label: Path | None = None


@attrs.frozen
class Problem:
    """Something wrong with a dataset file; ``fatal`` problems stop training, others are listed and skipped."""

    file: str
    problem: str
    fatal: bool


@attrs.frozen
class Dataset:
    """A dataset folder: its label names (background included) and its cases."""

    root: Path
    labels: dict[str, int]
    training: list[Case]
    unlabeled: list[Case]
    test: list[Case]

    @property
    def num_classes(self) -> int:
        """Output channels a network needs: the largest label value plus one."""
        return max(self.labels.values(), default=-1) + 1

    @property
    def organ_names(self) -> dict[int, str]:
        """Label value -> name, background left out."""
        return {value: name for name, value in sorted(self.labels.items(), key=lambda kv: kv[1]) if value != 0}


def parse_labels(labels, where: str = "dataset.json") -> dict[str, int]:
    """Validate a ``labels`` mapping (name -> value; the nnU-Net v1 form value -> name is accepted too)."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty mapping of name to value")
    if all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in labels.items()):
        labels = {v: int(k) for k, v in labels.items()}  # nnU-Net v1: {"0": "background", ...}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{where}: label {name!r} is a region (list of values); region-based labels are "
                            "not supported")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
            raise DataError(f"{where}: label {name!r} has value {value!r}; expected an integer in 0..255")
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise DataError(f"{where}: two labels share a value ({sorted(values)})")
    if 0 not in values:
        raise DataError(f"{where}: no label has value 0 (background)")
    return dict(labels)


def read_dataset_json(root: Path) -> dict:
    """The parsed ``dataset.json`` of ``root`` (a JSON object), or DataError."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{root}: not a dataset (no dataset.json)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def write_dataset_json(root, labels: dict[str, int], num_training: int, file_ending: str = ".nii.gz",
                       extra: dict | None = None) -> Path:
    """Write ``root/dataset.json`` atomically (one CT channel); returns its path."""
    labels = parse_labels(labels, "labels")
    if file_ending not in IMAGE_SUFFIXES:
        raise DataError(f"file_ending {file_ending!r}: expected one of {', '.join(IMAGE_SUFFIXES)}")
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": int(num_training),
            "file_ending": file_ending, **(extra or {})}
    path = Path(root) / "dataset.json"
    write_text(json.dumps(meta, indent=2) + "\n", path)
    return path


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_group_folder(folder: Path) -> bool:
    """A folder of image files or of further folders (not itself one DICOM series)."""
    return any(_is_visible(p) and (p.is_dir() or image_suffix(p)) for p in folder.iterdir())


def find_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files and DICOM series folders under ``folder`` (sorted), and the other files found there."""
    images, others = [], []
    for path in sorted(Path(folder).iterdir()):
        if not _is_visible(path):
            continue
        if path.is_dir():
            if _is_group_folder(path):
                found, skipped = find_images(path)
                images += found
                others += skipped
            else:
                images.append(path)
        elif image_suffix(path):
            images.append(path)
        else:
            others.append(path)
    return images, others


def _name(path: Path) -> str:
    """The case name: file name without image suffix and without the ``_0000`` channel suffix."""
    stem = case_name(path)
    return stem[:-5] if stem.endswith("_0000") else stem


def list_images(folder) -> list[Case]:
    """The images of a folder for prediction (nnU-Net ``CASE_0000`` names or plain names), unlabeled."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    return [Case(_name(p), p) for p in find_images(folder)[0]]


class _Scan:
    """Collects cases and problems while walking a dataset folder."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[Problem] = []
        self.seen: dict[str, str] = {}

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def problem(self, path, text: str, fatal: bool = True) -> None:
        self.problems.append(Problem(path if isinstance(path, str) else self.rel(path), text, fatal))

    def images(self, folder: Path, channel_suffix: bool) -> list[Case]:
        """The cases of an image folder; with ``channel_suffix``, names must end in ``_0000`` (nnU-Net)."""
        if not folder.is_dir():
            return []
        paths, others = find_images(folder)
        for other in others:
            self.problem(other, "not an image file (ignored)", fatal=False)
        stems = {case_name(p) for p in paths}
        cases = []
        for path in paths:
            match = _CHANNEL.match(case_name(path))
            if channel_suffix and match and match["channel"] != "0000" and f"{match['base']}_0000" in stems:
                self.problem(path, f"a second image channel (_{match['channel']}); seg reads one CT channel "
                             "(_0000)")
                continue
            if channel_suffix and not (match and match["channel"] == "0000"):
                self.problem(path, "missing the _0000 channel suffix (nnU-Net names images CASE_0000.nii.gz)")
            case = Case(_name(path), path)
            if case.name in self.seen:
                self.problem(path, f"case name {case.name!r} also used by {self.seen[case.name]}; names must be "
                             "unique across the dataset")
                continue
            self.seen[case.name] = self.rel(path)
            cases.append(case)
        return cases

    def pair(self, cases: list[Case], label_folder: Path, required: bool) -> list[Case]:
        """Attach label maps from ``label_folder`` to ``cases``; report images and labels without a partner."""
        labels: dict[str, Path] = {}
        if label_folder.is_dir():
            paths, others = find_images(label_folder)
            for other in others:
                self.problem(other, "not an image file (ignored)", fatal=False)
            for path in paths:
                name = case_name(path)
                if name in labels:
                    self.problem(path, f"second label map for case {name!r} (also {self.rel(labels[name])})")
                else:
                    labels[name] = path
        paired = []
        for case in cases:
            label = labels.pop(case.name, None)
            if label is None and required:
                self.problem(case.image, f"no label map {self.rel(label_folder)}/{case.name}.* for this image")
            paired.append(attrs.evolve(case, label=label))
        for name, path in labels.items():
            self.problem(path, f"label map without an image (no {name}_0000.* beside it)")
        return paired


def scan_dataset(root, unlabeled_dir: str = "unlabeled") -> tuple[Dataset, list[Problem]]:
    """The dataset at ``root`` and every layout problem found (nothing is read but folder listings and JSON).

    Raises DataError only when ``root`` is not a folder. Cases with a layout problem are left out of the
    dataset; a case whose ``dataset.json`` or label is broken still appears (with ``labels`` empty if unusable).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    scan = _Scan(root)
    labels: dict[str, int] = {}
    meta: dict = {}
    try:
        meta = read_dataset_json(root)
        labels = parse_labels(meta.get("labels"))
    except DataError as exc:
        scan.problem("dataset.json", str(exc).split(": ", 1)[-1])
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if isinstance(channels, dict) and len(channels) > 1:
        scan.problem("dataset.json", f"{len(channels)} channels in channel_names; seg segments one CT channel")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in IMAGE_SUFFIXES:
        scan.problem("dataset.json", f"file_ending {ending!r} is not one of {', '.join(IMAGE_SUFFIXES)}")

    training = [c for c in scan.pair(scan.images(root / "imagesTr", True), root / "labelsTr", True) if c.label]
    test = scan.pair(scan.images(root / "imagesTs", True), root / "labelsTs", False)
    unlabeled_folder = root / unlabeled_dir
    if unlabeled_dir and unlabeled_folder != root and unlabeled_folder.exists() and not unlabeled_folder.is_dir():
        scan.problem(unlabeled_folder, "not a folder")
    unlabeled = scan.images(unlabeled_folder, False) if unlabeled_folder != root else []

    if meta and "numTraining" in meta and meta["numTraining"] != len(training):
        scan.problem("dataset.json", f"numTraining is {meta['numTraining']} but imagesTr/labelsTr hold "
                     f"{len(training)} labeled case(s)")
    if not training and not unlabeled and not test:
        scan.problem(root, f"no images in imagesTr/, imagesTs/ or {unlabeled_dir}/")
    dataset = Dataset(root=root, labels=labels, training=training, unlabeled=unlabeled, test=test)
    return dataset, scan.problems


def open_dataset(root, unlabeled_dir: str = "unlabeled") -> Dataset:
    """Open a dataset folder; DataError naming the first fatal layout problem (run ``seg data check``)."""
    dataset, problems = scan_dataset(root, unlabeled_dir)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        extra = f" (and {len(fatal) - 1} more; run `seg data check {root}`)" if len(fatal) > 1 else ""
        raise DataError(f"{Path(root) / fatal[0].file}: {fatal[0].problem}{extra}")
    return dataset
