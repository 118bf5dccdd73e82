"""The preprocessing cache: contents, resumability, crash safety, invalidation, parallel == serial, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from seg.core import cache
from seg.core.dataset import Case
from seg.core.errors import DataError
from seg.core.preprocessing import Sample, build_pipeline, run_pipeline

STEPS = [("reorient", {}), ("crop_body", {"margin_mm": 2.0}), ("resample", {"in_plane": [16, 14], "z_spacing": 3.0}),
         ("clip_zscore", {})]


def write_case(folder: Path, name: str, seed: int, labeled: bool) -> Case:
    """A tiny RAS CT (air, a body box, a labelled blob) written as .nii.gz, with its label map if ``labeled``."""
    rng = np.random.default_rng(seed)
    hu = np.full((12, 20, 22), -1000, np.int16)
    hu[2:10, 3:17, 4:19] = rng.integers(-100, 100, (8, 14, 15))
    label = np.zeros(hu.shape, np.uint8)
    label[4:8, 6:12, 7:14] = 1 + seed % 3
    hu[label > 0] += 200
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.4, 2.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    image.SetOrigin((10.0, 5.0, -3.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}_0000.nii.gz"))
    label_path = None
    if labeled:
        label_image = sitk.GetImageFromArray(label)
        label_image.CopyInformation(image)
        label_path = folder / f"{name}.nii.gz"
        sitk.WriteImage(label_image, str(label_path))
    return Case(name, folder / f"{name}_0000.nii.gz", label_path)


@pytest.fixture
def cases(tmp_path) -> list[Case]:
    """Two labeled and two unlabeled cases; names chosen so one is a prefix of another."""
    return [write_case(tmp_path / "src", "a", 0, True), write_case(tmp_path / "src", "a.b", 1, True),
            write_case(tmp_path / "src", "u1", 2, False), write_case(tmp_path / "src", "u2", 3, False)]


class CountingPipeline:
    """Counts the cases ``prepare`` actually preprocesses."""

    def __init__(self, monkeypatch):
        self.names = []
        monkeypatch.setattr(cache, "run_pipeline", self)

    def __call__(self, pipeline, sample):
        self.names.append(sample.image.GetSize())
        return run_pipeline(pipeline, sample)


def test_entries_hold_the_preprocessed_case(cases, tmp_path):
    ticks = []
    assert cache.prepare(cases, tmp_path / "c", STEPS, progress=ticks.append) == []
    assert ticks == [1] * len(cases)
    case = cases[0]
    entry = cache.load(tmp_path / "c", "a")
    image = sitk.ReadImage(str(case.image))
    label = sitk.ReadImage(str(case.label))
    sample, records = run_pipeline(build_pipeline(STEPS), Sample(image, label))
    assert isinstance(entry.image, np.memmap) and entry.image.dtype == np.float16
    assert entry.label.dtype == np.uint8 and entry.image.shape == entry.label.shape == sample.image.GetSize()[::-1]
    assert np.allclose(entry.image, sitk.GetArrayViewFromImage(sample.image), atol=2e-3)
    assert np.array_equal(entry.label, sitk.GetArrayViewFromImage(sample.label))
    assert entry.record["records"] == json.loads(json.dumps(records))
    assert entry.record["geometry"]["size"] == [22, 20, 12]
    assert entry.record["sources"]["image"]["size"] == case.image.stat().st_size
    assert cache.load(tmp_path / "c", "u1").label is None


def test_second_run_does_nothing_and_touching_a_source_redoes_only_that_case(cases, tmp_path, monkeypatch):
    cache.prepare(cases, tmp_path / "c", STEPS)
    counter = CountingPipeline(monkeypatch)
    ticks = []
    cache.prepare(cases, tmp_path / "c", STEPS, progress=ticks.append)
    assert counter.names == [] and ticks == [1] * len(cases)
    old_files = sorted(p.name for p in (tmp_path / "c").glob("a.*.npy"))
    stat = cases[0].label.stat()
    os.utime(cases[0].label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cache.prepare(cases, tmp_path / "c", STEPS)
    assert len(counter.names) == 1
    new_files = sorted(p.name for p in (tmp_path / "c").glob("a.*.npy"))
    assert {f for f in old_files if f.startswith("a.b.")} <= set(new_files)  # "a.b" untouched
    assert len(new_files) == len(old_files) and new_files != old_files  # "a" rewritten under a new key
    cache.load(tmp_path / "c", "a")
    cache.load(tmp_path / "c", "a.b")


def test_crash_while_committing_leaves_no_visible_entry(cases, tmp_path, monkeypatch):
    def crash(path, meta):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(cases[:1], tmp_path / "c", STEPS)
    with pytest.raises(DataError, match="not in the preprocessing cache"):
        cache.load(tmp_path / "c", "a")
    assert not list((tmp_path / "c").glob(".*"))  # no temporary file left behind
    monkeypatch.undo()
    cache.prepare(cases[:1], tmp_path / "c", STEPS)
    cache.load(tmp_path / "c", "a")


def test_crash_mid_array_write_then_redo_keeps_the_old_entry_whole(cases, tmp_path, monkeypatch):
    cache.prepare(cases[:1], tmp_path / "c", STEPS)
    before = cache.load(tmp_path / "c", "a")
    old_image = np.array(before.image)
    stat = cases[0].image.stat()
    os.utime(cases[0].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    real_save = np.save

    def half_write(fh, array):
        real_save(fh, array)
        fh.truncate(fh.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(cases[:1], tmp_path / "c", STEPS)
    monkeypatch.undo()
    assert not list((tmp_path / "c").glob(".*"))
    after = cache.load(tmp_path / "c", "a")  # still the old, whole entry
    assert np.array_equal(after.image, old_image) and after.record["key"] == before.record["key"]
    assert not cache.is_prepared(cases[0], tmp_path / "c", STEPS)
    cache.prepare(cases[:1], tmp_path / "c", STEPS)
    assert cache.load(tmp_path / "c", "a").record["key"] != before.record["key"]
    assert len(list((tmp_path / "c").glob("a.*.npy"))) == 2  # the superseded files are gone


def test_changed_settings_invalidate(cases, tmp_path, monkeypatch):
    cache.prepare(cases, tmp_path / "c", STEPS)
    changed = [*STEPS[:2], ("resample", {"in_plane": [16, 14], "z_spacing": 4.0}), STEPS[3]]
    counter = CountingPipeline(monkeypatch)
    cache.prepare(cases, tmp_path / "c", changed)
    assert len(counter.names) == len(cases)
    body_mm = 10 * 2.0  # 8 body slices and a 1-slice margin each side, 2 mm apart
    assert cache.load(tmp_path / "c", "a").image.shape[0] == round(body_mm / 4.0) != round(body_mm / 3.0)
    assert cache.default_cache_dir(tmp_path, STEPS) != cache.default_cache_dir(tmp_path, changed)
    reordered = [(name, dict(reversed(list(options.items())))) for name, options in STEPS]
    assert cache.default_cache_dir(tmp_path, STEPS) == cache.default_cache_dir(tmp_path, reordered)
    assert cache.default_cache_dir(tmp_path, STEPS).parent == tmp_path / ".seg_cache"


@pytest.mark.slow  # two worker processes start (spawn), a few seconds
def test_parallel_equals_serial_and_skips_an_unreadable_unlabeled_scan(cases, tmp_path):
    broken = Case("broken", tmp_path / "src" / "broken_0000.nii.gz")
    broken.image.write_bytes(b"not an image at all")
    everything = [*cases, broken]
    serial = cache.prepare(everything, tmp_path / "serial", STEPS, workers=1)
    ticks = []
    parallel = cache.prepare(everything, tmp_path / "parallel", STEPS, workers=2, progress=ticks.append)
    assert [c.name for c, _ in serial] == [c.name for c, _ in parallel] == ["broken"]
    assert isinstance(parallel[0][1], DataError) and "broken_0000.nii.gz" in str(parallel[0][1])
    assert len(ticks) == len(everything)
    for case in cases:
        a, b = cache.load(tmp_path / "serial", case.name), cache.load(tmp_path / "parallel", case.name)
        assert np.array_equal(a.image, b.image) and a.record["records"] == b.record["records"]
        assert (a.label is None and b.label is None) or np.array_equal(a.label, b.label)


def test_bad_labeled_cases_raise_one_line_errors(cases, tmp_path):
    bad = Case("a", cases[0].image, tmp_path / "src" / "u1_0000.nii.gz")  # a CT as its own label: values < 0
    with pytest.raises(DataError, match=r"u1_0000\.nii\.gz: label values must be integers in 0\.\.255"):
        cache.prepare([bad], tmp_path / "c", STEPS)
    label = sitk.ReadImage(str(cases[0].label))
    label.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(label, str(tmp_path / "moved.nii.gz"))
    moved = Case("a", cases[0].image, tmp_path / "moved.nii.gz")
    with pytest.raises(DataError, match=r"moved\.nii\.gz: not on the grid of its image"):
        cache.prepare([moved], tmp_path / "c", STEPS)
    unreadable = Case("a", tmp_path / "missing_0000.nii.gz", cases[0].label)
    with pytest.raises(DataError, match="missing_0000.nii.gz"):
        cache.prepare([unreadable], tmp_path / "c", STEPS)
    with pytest.raises(DataError, match="seg data prepare"):
        cache.load(tmp_path / "c", "nothing")
