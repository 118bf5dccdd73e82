"""Hostile model files (``seg predict --model MODEL.seg``) are refused with one line and exit code 2, before
anything is extracted or unpickled: path-escaping member names, zip bombs (a declared size over the limit, and
a real one: 64 MiB of zeros deflated to 64 KiB), a member larger than it declares, a pickle payload in the weights,
a manifest naming an unknown plugin, an unexpected member, a missing member, and files that are no zip or a
truncated one."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seg.cli import main
from seg.core.export import export_model
from tests.reliability.conftest import assert_one_line_error, seg_cli


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def model(smoke_run, tmp_path_factory) -> Path:
    """The smoke run, exported."""
    path = tmp_path_factory.mktemp("hostile-models") / "model.seg"
    export_model(smoke_run, path)
    return path


def members(model: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(model) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size that the central directory declares for ``member``."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    count, _, start = struct.unpack("<HII", data[end + 10:end + 20])
    entry = start
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack("<HHH", data[entry + 28:entry + 34])
        if data[entry + 46:entry + 46 + name_length] == member.encode():
            data[entry + 24:entry + 28] = struct.pack("<I", size)
            path.write_bytes(bytes(data))
            return
        entry += 46 + name_length + extra_length + comment_length
    raise AssertionError(f"{member} not found")


def hostile(model: Path, tmp_path: Path, kind: str) -> Path:
    """A model file made hostile in the way ``kind`` names."""
    entries = members(model)
    path = tmp_path / f"{kind}.seg"
    if kind == "escaping name":
        return write_zip(path, {**entries, "../../evil.txt": b"x"})
    if kind == "absolute name":
        return write_zip(path, {"/tmp/evil.txt": b"x", **entries})
    if kind == "declared size over the limit":
        write_zip(path, entries)
        declare_size(path, "weights.pt", 0xF000_0000)  # 3.75 GiB, over the 2 GiB limit
        return path
    if kind == "zip bomb":
        return write_zip(path, {**entries, "MODEL.md": b"\0" * (64 << 20)})
    if kind == "larger than declared":
        write_zip(path, entries)
        declare_size(path, "MODEL.md", 10)
        return path
    if kind == "pickle payload":
        buffer = io.BytesIO()
        torch.save({"head.weight": Payload()}, buffer)
        return write_zip(path, {**entries, "weights.pt": buffer.getvalue()})
    if kind == "unknown plugin":
        manifest = json.loads(entries["seg-model.json"])
        manifest["plugins"].append({"family": "backbones", "name": "evil", "distribution": "seg",
                                    "version": manifest["seg_version"]})
        return write_zip(path, {**entries, "seg-model.json": json.dumps(manifest).encode()})
    if kind == "unexpected member":
        return write_zip(path, {**entries, "run.py": b"import os"})
    if kind == "missing member":
        return write_zip(path, {k: v for k, v in entries.items() if k != "config.toml"})
    if kind == "not a zip":
        path.write_bytes(b"\x89PNG\r\n" + bytes(range(256)) * 8)
        return path
    if kind == "truncated":
        path.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        return path
    raise AssertionError(kind)


CASES = {
    "escaping name": "would escape",
    "absolute name": "would escape",
    "declared size over the limit": "above the limit",
    "zip bomb": "above the limit",
    "larger than declared": "Bad CRC-32 for file 'MODEL.md'",
    "pickle payload": "refused to load",
    "unknown plugin": "provides no backbone 'evil'",
    "unexpected member": "unexpected member 'run.py'",
    "missing member": "'config.toml' is missing",
    "not a zip": "not a run folder or a seg model file",
    "truncated": "truncated",
}


def test_hostile_model_files_are_refused_with_one_line(model, synth_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the payload would write PWNED
    image = next((synth_data / "imagesTr").glob("*.nii.gz"))
    for kind, fragment in CASES.items():
        path = hostile(model, tmp_path, kind)
        try:
            main(["-q", "predict", "-i", str(image), "-o", str(tmp_path / "out"), "--model", str(path)])
            code = 0
        except SystemExit as exc:
            code = exc.code
        result = SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
        assert_one_line_error(result, fragment, path.name, codes=(2,))
    assert not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_a_pickle_payload_is_refused_by_a_separate_process_too(model, synth_data, tmp_path):
    image = next((synth_data / "imagesTr").glob("*.nii.gz"))
    result = seg_cli("predict", "-i", image, "-o", tmp_path / "out", "--model", hostile(model, tmp_path,
                     "pickle payload"), cwd=tmp_path)
    assert_one_line_error(result, "refused to load", codes=(2,))
    assert not (tmp_path / "PWNED").exists()
