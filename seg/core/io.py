"""Reading images (NIfTI, NRRD, MHA, a DICOM series folder) and writing any output atomically.

Every reader checks the header before it allocates: a file that claims more than ``MAX_VOXELS`` voxels,
or that is not 3D, is refused with one line naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path

import attrs
import numpy as np
import SimpleITK as sitk

from seg.core.errors import DataError, SegError

#: Refuse images larger than this many voxels (2 giga-voxels, about a 1024 x 1024 x 2000 scan).
MAX_VOXELS = int(os.environ.get("SEG_MAX_VOXELS", 2 * 1024**3))
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def image_suffix(path: Path) -> str | None:
    """The known image suffix of ``path`` (``.nii.gz``...), or None."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def case_name(path: Path) -> str:
    """The file name without its image suffix (a DICOM folder keeps its name)."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


@attrs.frozen
class Geometry:
    """Where a 3D image lies in space: size (x, y, z), spacing (mm), origin (mm), direction (row-major 3x3)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        """The geometry of a SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """Same size, and spacing, origin and direction equal within ``tol`` (relative for spacing)."""
        return (
            self.size == other.size
            and all(abs(a - b) <= tol * max(1.0, abs(a)) for a, b in zip(self.spacing, other.spacing))
            and all(abs(a - b) <= tol * max(1.0, abs(a)) for a, b in zip(self.origin, other.origin))
            and all(abs(a - b) <= tol for a, b in zip(self.direction, other.direction))
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry's spacing, origin and direction onto ``image`` (same size required)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _dicom_files(folder: Path) -> list[str]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: folder holds no image file and no DICOM series")
    if len(series) > 1:
        raise DataError(f"{folder}: folder holds {len(series)} DICOM series; give one series per folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], int]:
    """The size and number of components an image file claims, read without loading its pixels."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    reader = sitk.ImageFileReader()
    reader.SetFileName(_dicom_files(path)[0] if path.is_dir() else str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable image ({_first_line(exc)})") from None
    size = reader.GetSize()
    if path.is_dir():
        size = (*size[:2], len(_dicom_files(path)))
    return size, reader.GetNumberOfComponents()


def _first_line(exc: Exception) -> str:
    """The informative part of a SimpleITK exception (its ``sitk::ERROR:`` line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else "unknown error"


def _nifti_data_end(header: bytes) -> int | None:
    """Where the voxel data of a NIfTI-1/2 file must end (vox_offset + voxel bytes), from its header."""
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348 and len(header) >= 348:
            dims, (bitpix,) = struct.unpack(endian + "8h", header[40:56]), struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
        elif sizeof_hdr == 540 and len(header) >= 540:
            dims, (bitpix,) = struct.unpack(endian + "8q", header[16:80]), struct.unpack(endian + "h", header[14:16])
            (offset,) = struct.unpack(endian + "q", header[168:176])
        else:
            continue
        voxels = int(np.prod([max(1, d) for d in dims[1:1 + max(0, min(dims[0], 7))]]))
        return int(offset) + voxels * max(bitpix, 8) // 8
    return None


def nifti_truncation(path: Path) -> str | None:
    """Why a NIfTI file holds less voxel data than its header announces, or None.

    ITK reads such files without complaint (the missing part comes back as zeros), so this is checked
    separately: for ``.nii.gz`` the gzip trailer's length is compared first, and only on a mismatch is the
    stream decompressed to be sure.
    """
    name = path.name.lower()
    if path.is_dir() or not name.endswith((".nii", ".nii.gz")):
        return None
    compressed = name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            end = _nifti_data_end(fh.read(544))
        if end is None:
            return None
        if not compressed:
            size = path.stat().st_size
        else:
            with open(path, "rb") as fh:
                fh.seek(-4, 2)
                if struct.unpack("<I", fh.read(4))[0] == end % 2**32:
                    return None
            size = 0
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    size += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return f"truncated or corrupt compressed data ({exc})"
    if size < end:
        return f"truncated: holds {size} of the {end} bytes its header announces"
    return None


def gzip_corruption(path: Path, image: sitk.Image) -> str | None:
    """Why the voxels ITK read from a ``.nii.gz`` file are not the ones it stored, or None.

    ITK decodes a gzip stream with a corrupted byte without complaint (the voxels come back wrong); the gzip
    trailer's CRC-32 of the whole uncompressed stream tells. When ITK returned the stored bytes unchanged (no
    intensity rescaling, little-endian, same width) the CRC is computed over the header and ITK's own buffer
    (about 1 GB/s); otherwise the file is decompressed once more, which checks it.
    """
    if path.is_dir() or not path.name.lower().endswith(".nii.gz"):
        return None
    try:
        with open(path, "rb") as fh:
            fh.seek(-8, 2)
            crc, length = struct.unpack("<II", fh.read(8))
        with gzip.open(path, "rb") as fh:
            header = fh.read(348)
            if len(header) == 348 and struct.unpack("<i", header[:4])[0] == 348:
                (offset,), (bitpix,) = struct.unpack("<f", header[108:112]), struct.unpack("<h", header[72:74])
                slope, inter = struct.unpack("<ff", header[112:120])
                voxels = sitk.GetArrayViewFromImage(image)
                if (slope in (0.0, 1.0) and inter == 0.0 and bitpix == 8 * voxels.dtype.itemsize
                        and voxels.dtype.byteorder in "=<|" and (int(offset) + voxels.nbytes) % 2**32 == length):
                    header += fh.read(int(offset) - 348)
                    found = zlib.crc32(np.ascontiguousarray(voxels).view(np.uint8), zlib.crc32(header))
                    return None if found == crc else "corrupt compressed data (CRC-32 mismatch)"
            while fh.read(1 << 24):  # the gzip module checks the CRC at the end of the stream
                pass
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        return f"corrupt compressed data ({exc})"
    return None


def read_image(path: str | os.PathLike, pixel_type=None) -> sitk.Image:
    """Read a 3D scalar image file or DICOM series folder; refuse 2D, 4D, vector and oversized images."""
    path = Path(path)
    size, components = read_header(path)
    if len(size) != 3 or (len(size) == 4 and size[3] == 1):
        raise DataError(f"{path}: a {len(size)}D image; expected a 3D volume")
    if min(size) < 1:
        raise DataError(f"{path}: empty image of size {size}")
    if components != 1:
        raise DataError(f"{path}: {components} components per voxel; expected a scalar image")
    voxels = size[0] * size[1] * size[2]
    if voxels > MAX_VOXELS:
        raise DataError(f"{path}: header claims {voxels} voxels {size}, above the limit of {MAX_VOXELS} (SEG_MAX_VOXELS)")
    if truncated := nifti_truncation(path):
        raise DataError(f"{path}: {truncated}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_files(path))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: could not read the image ({_first_line(exc)})") from None
    if corrupt := gzip_corruption(path, image):
        raise DataError(f"{path}: {corrupt}")
    if image.GetDimension() != 3:
        raise DataError(f"{path}: a {image.GetDimension()}D image; expected a 3D volume")
    spacing = image.GetSpacing()
    if not all(1e-3 <= s <= 1e3 for s in spacing):
        raise DataError(f"{path}: implausible voxel spacing {tuple(round(s, 6) for s in spacing)} mm")
    if pixel_type is not None:
        image = sitk.Cast(image, pixel_type)
    return image


class OutputError(SegError, OSError):
    """An output that cannot be written: still an ``OSError`` for callers that catch those, and a one-line
    user error (exit 2) naming the path for the CLI."""


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (a folder, or a file blocking the way)."""
    return next(p for p in (path, *path.parents) if p.exists() or p == p.parent)


def _unwritable(target: Path, exc: OSError) -> OutputError:
    """The one-line error for an output that cannot be written (a file where a folder is needed, no space...)."""
    if isinstance(exc, OutputError):
        return exc
    if isinstance(exc, IsADirectoryError) and target.is_dir():
        return OutputError(f"{target}: is a folder; expected a file path")
    blocker = _nearest_existing(target.parent)
    if blocker.exists() and not blocker.is_dir():
        return OutputError(f"{target}: cannot write ({blocker} is a file, not a folder)")
    return OutputError(f"{target}: cannot write ({exc.strerror or exc})")


def check_output_file(target: str | os.PathLike, option: str) -> None:
    """Refuse, before any work is done, an output file path that cannot be written: an existing folder, a path
    under a file, or a folder where no file can be created (tried for real: permission bits mean nothing to
    root). Nothing is left behind; failures that only show when writing raise OutputError then."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{option} {target}: is a folder; give a file path")
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputError(f"{option} {target}: cannot write there ({parent} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{option} {target}: cannot write there ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``target``; on success rename it onto ``target``, else delete it.

    Readers never see a half-written ``target``: it either keeps its old content or gets the new one whole.
    A target that cannot be written (its folder cannot be made, no space, a folder in its place) raises
    ``OutputError`` naming it.
    """
    target = Path(target)
    suffix = suffix if suffix is not None else (image_suffix(target) or target.suffix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _unwritable(target, exc) from None
        raise


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` to ``path`` atomically (format from the suffix)."""
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write the image ({_first_line(exc)})") from None
        if incomplete := nifti_truncation(tmp):  # ITK does not report a failed write (a full disk)
            raise _why_incomplete(tmp, incomplete)


def _why_incomplete(tmp: Path, what: str) -> OSError:
    """The error behind a file that came out incomplete: one more write to it reports the full disk's errno."""
    try:
        with open(tmp, "ab") as fh:
            fh.write(bytes(1 << 16))
            fh.flush()
    except OSError as exc:
        return exc
    return OSError(f"the file written is incomplete: {what}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_path`` left in ``folder`` when its process was killed mid-write (kill -9
    or a power cut between creating one and renaming it into place); returns what was removed. Call it only while
    holding the folder's lock (``seg.core.lock``), when no other writer can be mid-write there."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith(".") and ".tmp" in path.name and path.name != ".seg.lock":
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
