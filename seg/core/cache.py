"""The preprocessing cache: each case preprocessed once, then memory-mapped by training (resumable, crash-safe).

Layout of a cache folder (by default ``DATA/.seg_cache/<hash of the steps>/``)::

    CASE.json                  commit marker, written last: records, sources, steps, original geometry, files
    CASE.<key>.image.npy       float16 (z, y, x): the preprocessed image
    CASE.<key>.label.npy       uint8 (z, y, x): its label map (labeled cases only)

``key`` hashes the steps and the source files' size and modification time, so a changed source or setting
writes new files under a new key; the JSON, renamed into place last, switches to them in one step. A crash
or Ctrl-C at any point leaves either the old entry or the new one, never a mix, and concurrent ``prepare``
calls on the same folder (e.g. one per training rank) write identical files and cannot corrupt each other.

Images are stored as float16: after clipping to [-320, 320] HU and z-scoring they lie within a few units of 0,
where float16 resolves about 0.002 (under 1 HU, far below CT noise of 10-20 HU); half the disk and page cache
of float32 matters with FLARE22's 2000 unlabeled scans. Patch samplers read them back as float32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk

from seg.core.errors import DataError
from seg.core.io import Geometry, atomic_path, read_image
from seg.core.preprocessing import Sample, build_pipeline, geometry_dict, run_pipeline

FORMAT = 1
IMAGE_DTYPE = np.float16
#: Temporary files older than this are left over from a killed process and are deleted.
STALE_TEMPORARY_S = 3600


@attrs.frozen
class CachedCase:
    """A preprocessed case: memory-mapped image (z, y, x), label map or None, and its cache record (the JSON)."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    record: dict


def steps_hash(steps: list[tuple[str, dict]]) -> str:
    """A short hash of the preprocessing steps, their options and the cache format."""
    text = json.dumps({"format": FORMAT, "steps": [[name, options] for name, options in steps]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir(data_root, steps: list[tuple[str, dict]]) -> Path:
    """``DATA/.seg_cache/<steps hash>``, or ``$SEG_CACHE_DIR/<data hash>/<steps hash>`` where that is set."""
    root = os.environ.get("SEG_CACHE_DIR")
    if root:
        data_key = hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
        return Path(root) / f"{Path(data_root).resolve().name}-{data_key}" / steps_hash(steps)
    return Path(data_root) / ".seg_cache" / steps_hash(steps)


def source_fingerprint(path: Path) -> dict:
    """Size and modification time of an image file, or summed / latest over a DICOM folder's files."""
    path = Path(path)
    try:
        if path.is_dir():
            stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
            return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
                    "files": len(stats)}
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _entry_key(case, steps: list[tuple[str, dict]]) -> tuple[str, dict]:
    sources = {"image": source_fingerprint(case.image),
               "label": None if case.label is None else source_fingerprint(case.label)}
    text = json.dumps({"steps": steps_hash(steps), "sources": sources}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], sources


def _meta_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / f"{name}.json"


def _read_meta(cache_dir: Path, name: str) -> dict | None:
    try:
        meta = json.loads(_meta_path(cache_dir, name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_current(cache_dir: Path, name: str, key: str) -> bool:
    meta = _read_meta(cache_dir, name)
    return (meta is not None and meta.get("format") == FORMAT and meta.get("key") == key
            and all((Path(cache_dir) / f).is_file() for f in (meta.get("image_file"), meta.get("label_file")) if f))


def _write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        try:
            np.save(fh, array)
        except OSError as exc:
            if exc.errno is None:  # numpy reports a short write (a full disk) without its errno: one more write
                fh.write(bytes(1 << 16))  # to the file raises the real error (ENOSPC), naming the cause
                fh.flush()
            raise


def _write_meta(path: Path, meta: dict) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def _read_label(case, image: sitk.Image) -> sitk.Image:
    """The case's label map as uint8 on the image grid, or DataError naming the label file."""
    label = read_image(case.label)
    if not Geometry.of(label).matches(Geometry.of(image)):
        raise DataError(f"{case.label}: not on the grid of its image {case.image} (size {label.GetSize()} vs "
                        f"{image.GetSize()}, or spacing, origin or direction differ)")
    values = sitk.GetArrayViewFromImage(label)
    low, high = values.min(), values.max()
    if low < 0 or high > 255 or (values.dtype.kind == "f" and not np.array_equal(values, np.round(values))):
        raise DataError(f"{case.label}: label values must be integers in 0..255 (found {low}..{high})")
    return sitk.Cast(label, sitk.sitkUInt8)


def _remove_superseded(cache_dir: Path, name: str, key: str) -> None:
    """Delete this case's array files of other keys (an older source or a crashed run)."""
    pattern = re.compile(re.escape(name) + r"\.([0-9a-f]{16})\.(image|label)\.npy")
    for path in Path(cache_dir).glob(f"{_glob_escape(name)}.*.npy"):
        match = pattern.fullmatch(path.name)
        if match and match.group(1) != key:
            path.unlink(missing_ok=True)


def _glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def prepare_case(case, cache_dir, steps: list[tuple[str, dict]]) -> None:
    """Preprocess one case into ``cache_dir`` unless its entry is current (raises DataError for bad inputs)."""
    cache_dir = Path(cache_dir)
    key, sources = _entry_key(case, steps)
    if _is_current(cache_dir, case.name, key):
        return
    image = read_image(case.image)
    label = None if case.label is None else _read_label(case, image)
    sample, records = run_pipeline(build_pipeline(steps), Sample(image, label))
    image_file = f"{case.name}.{key}.image.npy"
    label_file = None if sample.label is None else f"{case.name}.{key}.label.npy"
    try:
        _write_array(cache_dir / image_file, sitk.GetArrayViewFromImage(sample.image).astype(IMAGE_DTYPE))
        if label_file is not None:
            _write_array(cache_dir / label_file, sitk.GetArrayViewFromImage(sample.label).astype(np.uint8))
        meta = {"format": FORMAT, "name": case.name, "key": key, "steps": [[n, o] for n, o in steps],
                "steps_hash": steps_hash(steps), "sources": sources, "source_image": str(case.image),
                "source_label": None if case.label is None else str(case.label),
                "geometry": geometry_dict(image), "preprocessed_geometry": geometry_dict(sample.image),
                "shape": list(sitk.GetArrayViewFromImage(sample.image).shape),
                "image_dtype": np.dtype(IMAGE_DTYPE).name, "image_file": image_file, "label_file": label_file,
                "records": records}
        _write_meta(_meta_path(cache_dir, case.name), meta)  # the commit
    except BaseException:  # a full disk, Ctrl-C: no array file outlives its uncommitted entry
        committed = (_read_meta(cache_dir, case.name) or {}).get("key") == key  # by a concurrent prepare
        for name in (image_file, label_file):
            if name is not None and not committed:
                (cache_dir / name).unlink(missing_ok=True)
        raise
    _remove_superseded(cache_dir, case.name, key)


def is_prepared(case, cache_dir, steps: list[tuple[str, dict]]) -> bool:
    """Whether ``cache_dir`` holds a current entry for ``case`` (same steps, unchanged source files)."""
    try:
        key, _ = _entry_key(case, steps)
    except DataError:
        return False
    return _is_current(Path(cache_dir), case.name, key)


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """While the pool spawns its workers: SIGINT ignored, a disposition the new processes keep from their first
    instruction (a Ctrl-C while one is still importing would otherwise print its traceback); restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_setup() -> None:
    """One thread per worker process: the processes are the parallelism. Ctrl-C reaches the whole process
    group: workers ignore it (from their start: ``_workers_ignore_ctrl_c``) and finish their case, the main
    process stops the pool and reports it once."""
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_one(case, cache_dir: Path, steps) -> DataError | None:
    try:
        prepare_case(case, cache_dir, steps)
    except DataError as exc:
        return exc
    return None


def _remove_stale_temporaries(cache_dir: Path) -> None:
    now = time.time()
    for path in Path(cache_dir).glob(".*.tmp*"):
        try:
            if now - path.stat().st_mtime > STALE_TEMPORARY_S:
                path.unlink()
        except OSError:
            pass


def prepare(cases, cache_dir, steps: list[tuple[str, dict]], workers: int = 1, progress=None) -> list:
    """Preprocess every case into ``cache_dir`` once; returns the skipped unlabeled cases as (case, DataError).

    Cases whose entry is current are skipped; ``workers`` > 1 runs cases in that many processes. A bad labeled
    case raises DataError (training needs it); a bad unlabeled scan is skipped and returned. ``progress``, if
    given, is called with 1 after each case.
    """
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{cache_dir}: cannot create the preprocessing cache ({exc.strerror}); "
                        "set SEG_CACHE_DIR to a writable folder") from None
    _remove_stale_temporaries(cache_dir)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise DataError(f"{cache_dir}: two cases share a name; case names must be unique")
    skipped = []

    def finish(case, error):
        if error is not None:
            if case.label is not None:
                raise error
            skipped.append((case, error))
        if progress is not None:
            progress(1)

    pending = []
    for case in cases:
        if is_prepared(case, cache_dir, steps):
            finish(case, None)
        else:
            pending.append(case)
    if workers <= 1 or len(pending) <= 1:
        for case in pending:
            finish(case, _run_one(case, cache_dir, steps))
        return skipped
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch or ITK threads have started
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(pending)), mp_context=context,
                                                  initializer=_worker_setup)
    try:
        with _workers_ignore_ctrl_c():
            futures = {pool.submit(_run_one, case, cache_dir, steps): case for case in pending}
        for future in concurrent.futures.as_completed(futures):
            finish(futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    order = {name: i for i, name in enumerate(names)}
    return sorted(skipped, key=lambda item: order[item[0].name])


def load(cache_dir, name: str) -> CachedCase:
    """The cached case ``name``, its arrays memory-mapped read-only."""
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir, name)
    if meta is None or meta.get("format") != FORMAT:
        raise DataError(f"{_meta_path(cache_dir, name)}: case {name!r} is not in the preprocessing cache "
                        "(run `seg data prepare`)")
    arrays = []
    for field in ("image_file", "label_file"):
        if meta.get(field) is None:
            arrays.append(None)
            continue
        path = cache_dir / meta[field]
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: unreadable cache file ({exc}); delete {cache_dir} and prepare again") from None
        if list(array.shape) != meta["shape"]:
            raise DataError(f"{path}: shape {array.shape} differs from its record {meta['shape']}; "
                            f"delete {cache_dir} and prepare again")
        arrays.append(array)
    return CachedCase(name, arrays[0], arrays[1], meta)
