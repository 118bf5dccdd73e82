"""The prediction driver: read -> preprocess -> inferer -> postprocess -> inverse -> write.

Every label map lands on exactly its input's grid (size, spacing, origin, direction). Folders are processed
case by case: outputs are written atomically, finished cases are skipped on a rerun, and one unreadable case
is reported without stopping the others.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk
import torch

from seg.core import plugins
from seg.core.check import image_problems
from seg.core.config import Experiment
from seg.core.console import info, progress_bar
from seg.core.dataset import list_images
from seg.core.errors import ConfigError, DataError
from seg.core.inference import class_argmax, infer_labels, resolve_device, resolve_precision
from seg.core.io import atomic_path, case_name, image_suffix, read_image, remove_stale_temporaries, write_image
from seg.core.lock import folder_lock
from seg.core.model import build_with_weights
from seg.core.modelfile import load_model
from seg.core.preprocessing import Sample, build_pipeline, invert_labels, run_pipeline, to_array
from seg.core.statistics import (STATISTICS_CSV, organ_statistics, read_case_statistics, write_case_statistics,
                                 write_statistics_csv)


@attrs.frozen
class Predictor:
    """A trained model ready to segment images: network, preprocessing, inferer and postprocessing."""

    experiment: Experiment
    network: torch.nn.Module
    labels: dict
    pipeline: list
    inferer: object
    postprocessors: list
    device: torch.device
    precision: str

    def preprocess(self, image: sitk.Image) -> tuple[torch.Tensor, list]:
        """The network's input (1, 1, z, y, x) and the records that invert the preprocessing."""
        sample, records = run_pipeline(self.pipeline, Sample(image))
        return torch.from_numpy(to_array(sample.image))[None, None], records

    def scores(self, image: sitk.Image):
        """Class scores (K, z, y, x) on the preprocessed grid, and the records that invert the preprocessing."""
        tensor, records = self.preprocess(image)
        return self.inferer(self.network, tensor, device=self.device, precision=self.precision), records

    def labels_for(self, image: sitk.Image, scores=None, records=None) -> sitk.Image:
        """The uint8 label map of ``image`` on exactly its grid (from ``scores`` and ``records`` if given)."""
        if scores is None:
            return self.segment(*self.preprocess(image))[0]
        return self.finish(class_argmax(scores).numpy(), records)

    def segment(self, tensor: torch.Tensor, records: list, with_scores: bool = False):
        """The label map on the original grid of a preprocessed input, and its class scores if ``with_scores``
        (else None: the labels then come from the inferer without a classes x volume array)."""
        if not with_scores:
            labels = infer_labels(self.inferer, self.network, tensor, device=self.device, precision=self.precision)
            return self.finish(labels, records), None
        scores = self.inferer(self.network, tensor, device=self.device, precision=self.precision)
        return self.finish(class_argmax(scores).numpy(), records), scores

    def finish(self, labels: np.ndarray, records: list) -> sitk.Image:
        """Postprocess a label array on the preprocessed grid and map it onto the original grid."""
        for post in self.postprocessors:
            labels = post(labels)
        return invert_labels(self.pipeline, labels, records)


def load_predictor(run: Path, device: str = "auto", precision: str | None = None,
                   overlap: float | None = None) -> Predictor:
    """Load a model: a fine-tuning run folder (its ``config.toml`` and best, else latest, checkpoint) or a model
    file written by ``seg export`` (``seg.core.modelfile``); both give the same network and settings."""
    model = load_model(Path(run))
    exp, saved = model.experiment, model.backbone
    network = build_with_weights(exp.backbone, 1, saved["out_channels"], model.weights, model.source)
    dev = resolve_device(device)
    network.to(dev).eval()
    if hasattr(network, "for_inference"):
        network = network.for_inference()
    options = dict(exp.predict.inferer.options)
    if overlap is not None:
        if not 0 <= overlap < 1:
            raise ConfigError(f"--overlap {overlap}: must be in [0, 1)")
        options["overlap"] = overlap
    try:
        inferer = plugins.get("inferers", exp.predict.inferer.name)(**options)
        posts = [plugins.get("inferers", c.name)(**c.options) for c in exp.predict.postprocess]
    except ConfigError as exc:
        raise ConfigError(f"{model.config_source}: {exc}") from None
    prec = resolve_precision(precision or exp.predict.precision, dev)
    return Predictor(exp, network, model.labels, build_pipeline(
        [(c.name, dict(c.options)) for c in exp.preprocess]), inferer, posts, dev, prec)


def predict_image(image: sitk.Image, run: Path, **options) -> sitk.Image:
    """Segment an in-memory SimpleITK image with the model of a run folder or ``seg export`` file (the notebook
    API)."""
    return load_predictor(Path(run), **options).labels_for(image)


def output_path(input_path: Path, output: Path, single: bool) -> Path:
    """Where the label map of ``input_path`` goes: ``output`` itself for a single input named like an image,
    else ``output/CASE.nii.gz`` (nnU-Net's ``_0000`` channel suffix dropped). Names cannot leave ``output``."""
    if single and image_suffix(output):
        return output
    name = case_name(input_path)
    if name.endswith("_0000"):
        name = name[:-5]
    name = Path(name).name
    if name in ("", ".", ".."):
        raise DataError(f"{input_path}: cannot derive a safe output name")
    return output / f"{name}.nii.gz"


def _inputs(input_path: Path) -> tuple[list[Path], bool]:
    """The images under ``input_path`` and whether it is a single image (a file or one DICOM series folder)."""
    if not input_path.exists():
        raise DataError(f"-i {input_path}: no such file or folder")
    if input_path.is_file():
        return [input_path], True
    if not any(image_suffix(p) or p.is_dir() for p in input_path.iterdir()):
        return [input_path], True
    cases = list_images(input_path)
    if not cases:
        raise DataError(f"-i {input_path}: no images in this folder")
    return [c.image for c in cases], False


def predict_paths(input_path: Path, output: Path, run: Path, **options) -> dict:
    """Segment a file, a DICOM series folder or a folder of images (``_predict_unlocked`` says how and what it
    returns). A folder of label maps is locked for the run (``seg.core.lock``): a second ``seg predict`` into it
    at once is refused with one line, never interleaved."""
    output = Path(output)
    _, single = _inputs(Path(input_path))
    if single or (output.exists() and not output.is_dir()):
        return _predict_unlocked(input_path, output, run, **options)
    with folder_lock(output, "-o"):
        remove_stale_temporaries(output)  # a killed predict may have died mid-write
        return _predict_unlocked(input_path, output, run, **options)


def _predict_unlocked(input_path: Path, output: Path, run: Path, *, overwrite: bool = False,
                      save_probabilities: bool = False, preview: bool = False, statistics: bool = False,
                      **options) -> dict:
    """Segment a file, a DICOM series folder or a folder of images.

    Returns counts ``done`` / ``skipped`` and the ``failed`` cases' errors, each written case's ``seconds``
    (from waiting for its image to its outputs written) and ``total_seconds`` (model loading included); each
    case's time is printed as it finishes. The next image is read in a background thread while the model loads
    or segments the current one. ``statistics`` writes ``CASE.json`` beside each label map (``seg.core.statistics``;
    a skipped case gets one from its existing label map) and, for a folder, ``statistics.csv`` of every case.
    """
    started = time.perf_counter()
    inputs, single = _inputs(Path(input_path))
    output = Path(output)
    if output.exists() and output.is_file() and not (single and image_suffix(output)):
        raise DataError(f"-o {output}: is a file; give a folder for the label maps")
    targets = [(path, output_path(path, output, single)) for path in inputs]
    todo = [(path, target) for path, target in targets if overwrite or not target.exists()]
    summary = {"done": 0, "skipped": len(targets) - len(todo), "failed": [], "seconds": [], "total_seconds": 0.0}
    with ThreadPoolExecutor(max_workers=1) as reader:
        reads = [reader.submit(_read_checked, path) for path, _ in todo[:1]]
        predictor = load_predictor(run, **options)  # a bad --model fails before any progress bar shows
        organs = {v: name for name, v in predictor.labels.items() if v != 0} if statistics else None
        with progress_bar("predicting", len(inputs)) as advance:
            advance(summary["skipped"])
            for i, (path, target) in enumerate(todo):
                case_started = time.perf_counter()
                reads += [reader.submit(_read_checked, next_path) for next_path, _ in todo[i + 1:i + 2]]
                try:
                    labels, scores, records = _segment(predictor, reads.pop(0).result(), save_probabilities)
                except DataError as exc:
                    if single:
                        raise
                    summary["failed"].append(str(exc))
                    info(f"{case_name(target)}: failed after {time.perf_counter() - case_started:.1f} s")
                else:
                    _write_outputs(path, target, labels, scores, records, preview, organs)
                    summary["done"] += 1
                    summary["seconds"].append(time.perf_counter() - case_started)
                    info(f"{case_name(target)}: {summary['seconds'][-1]:.1f} s")
                advance(1)
    if statistics:
        _gather_statistics(targets, organs, None if single else output / STATISTICS_CSV)
    summary["total_seconds"] = time.perf_counter() - started
    return summary


def describe_summary(summary: dict) -> str:
    """One line for a ``predict_paths`` summary: cases written, total and per-case time, skipped, failed."""
    done, seconds = summary["done"], summary["seconds"]
    per_case = f" ({sum(seconds) / len(seconds):.1f} s per case)" if seconds else ""
    return (f"predicted {done} case(s) in {summary['total_seconds']:.1f} s{per_case}, skipped "
            f"{summary['skipped']} (already done), failed {len(summary['failed'])}")


def _beside(target: Path, suffix: str) -> Path:
    """A file next to the label map ``target``, named like it with ``suffix`` instead of its image suffix."""
    return target.with_name(case_name(target) + suffix)


def _write_outputs(path: Path, target: Path, labels: sitk.Image, scores, records: list, preview: bool,
                   organs: dict[int, str] | None = None) -> None:
    """The label map at ``target``, and beside it the probabilities (when ``scores``), the preview PNG and the
    organ statistics (when ``organs``: label value -> name), the latter two from the input read again."""
    write_image(sitk.Cast(labels, sitk.sitkUInt8), target)
    if scores is not None:
        save_scores(scores, records, _beside(target, ".npz"))
    image = read_image(path) if preview or organs else None
    if preview:
        from seg.core.preview import write_preview

        write_preview(image, labels, _beside(target, ".png"))
    if organs:
        write_case_statistics(organ_statistics(image, labels, organs), _beside(target, ".json"))


def _gather_statistics(targets: list[tuple[Path, Path]], organs: dict[int, str], csv_path: Path | None) -> None:
    """Every written case's ``CASE.json`` (made from its label map where a skipped case lacks one), and their
    ``statistics.csv`` at ``csv_path`` (None: a single input, no CSV)."""
    cases = {}
    for path, target in targets:
        json_path = _beside(target, ".json")
        if not target.exists():
            continue  # failed
        if not json_path.exists():
            stats = organ_statistics(read_image(path), read_image(target), organs)
            write_case_statistics(stats, json_path)
        cases[case_name(target)] = read_case_statistics(json_path)
    if csv_path is not None:
        write_statistics_csv(cases, csv_path)


def _read_checked(path: Path) -> list[sitk.Image]:
    """[the image at ``path``], refused (``DataError``) when it cannot be segmented. In a list, so that taking
    the image out leaves the future that read it without a reference to its voxels."""
    image = read_image(path)
    problems = image_problems(image)
    if problems:
        raise DataError(f"{path}: {problems[0]}")
    return [image]


def _segment(predictor: Predictor, read: list[sitk.Image], with_scores: bool):
    """Segment the image in ``read`` (taken out: its voxels are freed before inference, so they do not grow
    the peak memory with scan length): (label map, scores or None, records)."""
    tensor, records = predictor.preprocess(read.pop())
    return (*predictor.segment(tensor, records, with_scores), records)


def save_scores(scores: torch.Tensor, records: list, path: Path) -> None:
    """Class probabilities on the preprocessed grid (float16, compressed) with the records that invert them."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, probabilities=scores.to(torch.float16).numpy(), records=json.dumps(records))
