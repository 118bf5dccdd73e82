"""Hostile files let nothing in: code-carrying checkpoints, gigantic headers, escaping output names."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from seg.core.io import read_image
from seg.core.predict import output_path
from tests.reliability.conftest import assert_one_line_error, gigantic_nifti, seg_cli


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_code_carrying_checkpoint_is_refused_by_predict_and_init(smoke_run, synth_data, tmp_path):
    evil = Path(shutil.copytree(smoke_run, tmp_path / "evil"))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        torch.save({"kind": "finetune", "model": Payload()}, evil / name)
    image = next((synth_data / "imagesTr").glob("*.nii.gz"))
    result = seg_cli("predict", "-i", image, "-o", tmp_path / "o", "--model", evil, cwd=tmp_path)
    assert_one_line_error(result, "refused to load", codes=(2,))
    result = seg_cli("run", "finetune", "-e", "smoke", "--data", synth_data, "--out", tmp_path / "r",
                     "--init", evil / "checkpoint_latest.pt", cwd=tmp_path)
    assert_one_line_error(result, "refused to load", codes=(2,))
    assert not (tmp_path / "PWNED").exists()


def test_gigantic_header_is_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.nii.gz"
    gigantic_nifti(path)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_image(path)
    except Exception as exc:  # noqa: the type is checked below
        assert "above the limit" in str(exc) and "huge.nii.gz" in str(exc)
    else:
        raise AssertionError("a 27e12-voxel header was accepted")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big allocated


def test_output_names_cannot_escape_the_output_folder(tmp_path):
    out = tmp_path / "out"
    for name in ["../../evil_0000.nii.gz", "/abs/evil.nii.gz", "..", "a/../../b.nii.gz"]:
        try:
            target = output_path(Path(name), out, single=False)
        except Exception as exc:  # noqa: a refusal is fine
            assert "safe output name" in str(exc)
            continue
        assert target.parent == out, (name, target)
