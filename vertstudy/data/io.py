"""Reading and writing images with the checks every reader shares.

Every failure is an :class:`~vertstudy.errors.InputError` naming the file; nothing here
leaves a half-written file behind (writes go to a temporary name, then rename).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.atomic import atomic_path
from vertstudy.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def has_image_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def validate_image(image: sitk.Image, path: str | Path) -> sitk.Image:
    """Check that ``image`` is a usable 3-D scalar CT; return it unchanged.

    Raises ``InputError`` for 2-D (or 4-D) images, vector pixels, zero or negative
    spacing, a degenerate direction matrix, empty extent and NaN/inf voxels.
    """
    dim = image.GetDimension()
    size = image.GetSize()
    if dim != 3:
        raise InputError(path, f"image is {dim}-D with size {size}; a 3-D CT volume is required")
    if min(size) < 2:
        raise InputError(path, f"image size {size} has an axis with fewer than 2 voxels; a 3-D volume is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path, f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar CT is required"
        )
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(path, f"voxel spacing {_fmt(spacing)} mm is not positive; every spacing must be > 0")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.isfinite(direction).all() or abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(path, f"direction matrix {tuple(np.round(direction.ravel(), 4))} is not orthonormal")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise InputError(path, f"origin {image.GetOrigin()} is not finite")
    pixel_id = image.GetPixelID()
    if pixel_id in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"image has {bad} NaN or infinite voxels; all voxels must be finite HU")
    return image


def read_image(path: str | Path) -> sitk.Image:
    """Read one 3-D image file (NIfTI, NRRD, MHA...) with SimpleITK and validate it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        return read_dicom_series(path)
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty; expected a 3-D image (NIfTI, NRRD, MHA or a DICOM series folder)")
    _check_header_spacing(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)
        bad = nifti_nonfinite_voxels(path)
        if bad:
            raise InputError(path, f"image has {bad} NaN or infinite voxels in the file (SimpleITK's NIfTI reader "
                             "would read them as 0 HU); all voxels must be finite HU")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an image ({_first_line(exc)}); "
                         "expected NIfTI, NRRD, MHA or a DICOM series folder, complete and uncorrupted") from None
    return validate_image(image, path)


def _check_header_spacing(path: Path) -> None:
    """Refuse a non-positive spacing in the file's header.

    ITK silently turns a negative header spacing into a flipped direction (and refuses zero
    spacing with a low-level message); other tools read such headers differently, so both
    are an ``InputError`` here, naming the file.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # read_image reports unreadable files
    spacing = reader.GetSpacing()
    if not all(s > 0 for s in spacing):
        raise InputError(
            path, f"voxel spacing {_fmt(spacing)} mm in the header is not positive; every spacing must be > 0"
        )


#: NIfTI float datatypes (the codes of nifti1.h) and their numpy types, whose voxels can be NaN/inf
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> tuple[str, int, int, int, int] | None:
    """``(byte order, datatype, bitpix, voxels, data offset)`` of a NIfTI-1/2 header, or ``None``
    if the header is not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for d in dims[1 : ndim + 1]:
        voxels *= max(int(d), 1)
    return endian, int(datatype), int(bitpix), voxels, max(int(offset), 348)


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1/2 file must hold, or ``None`` if the header is not NIfTI."""
    layout = _nifti_layout(header)
    if layout is None:
        return None
    _, _, bitpix, voxels, offset = layout
    return offset + voxels * bitpix // 8


def nifti_nonfinite_voxels(path: Path) -> int:
    """The number of NaN or infinite voxels stored in a float NIfTI file (0 for other types).

    SimpleITK's NIfTI reader turns such voxels into 0 without a word (0 HU: water where the
    data had holes), so they are counted from the file's own bytes, streamed in chunks."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as f:
            layout = _nifti_layout(f.read(540))
            if layout is None or layout[1] not in _NIFTI_FLOATS:
                return 0
            endian, datatype, _, voxels, offset = layout
            dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
            f.seek(offset)
            bad, left, chunk = 0, voxels, (1 << 22) // dtype.itemsize
            while left > 0:
                data = f.read(min(left, chunk) * dtype.itemsize)
                if not data:
                    break
                values = np.frombuffer(data[: len(data) - len(data) % dtype.itemsize], dtype=dtype)
                bad += int(np.count_nonzero(~np.isfinite(values)))
                left -= values.size
            return bad
    except (OSError, EOFError, zlib.error):
        return 0  # unreadable: check_nifti_complete and read_image report it


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file; ``EOFError``/``OSError``/``zlib.error`` if damaged."""
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            total += len(chunk)
    return total


def check_nifti_complete(path: Path) -> None:
    """Raise ``InputError`` when a NIfTI file holds fewer voxel bytes than its header promises.

    ITK reads a truncated NIfTI without error (the missing voxels become 0), so this is checked
    here. For ``.nii.gz`` the gzip trailer's length is compared first (cheap); only a mismatch
    decompresses the file to tell a truncated file from a damaged one.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error):
        return  # not gzip / unreadable: read_image reports it
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return
    if compressed:
        with path.open("rb") as f:
            f.seek(-4, 2)
            trailer = struct.unpack("<I", f.read(4))[0]
        if trailer == expected % (1 << 32):
            return
        try:
            actual = _gzip_length(path)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(
                path,
                f"compressed NIfTI is truncated or damaged ({exc}); expected {expected} bytes of header and voxels",
            ) from None
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(
            path,
            f"NIfTI file is truncated: holds {actual} of the {expected} bytes its header promises "
            f"({100 * actual / expected:.0f}%)",
        )


def read_dicom_series(folder: str | Path) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` (files sorted by SimpleITK/GDCM)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder; expected a DICOM series folder")
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputError(folder, f"cannot list DICOM series ({_first_line(exc)})") from None
    if not series_ids:
        raise InputError(folder, "contains no DICOM series; expected a folder of DICOM slices")
    best: list[str] = []
    for sid in series_ids:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
        if len(files) > len(best):
            best = list(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(best)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(folder, f"DICOM series cannot be read ({_first_line(exc)})") from None
    return validate_image(image, folder)


def write_image(image: sitk.Image, path: str | Path, compression_level: int = 1) -> Path:
    """Write ``image`` atomically: to a temporary name in the same folder, then rename."""
    path = Path(path)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_path(path, suffix=suffix) as tmp:  # the writer picks the format by the suffix
        sitk.WriteImage(image, str(tmp), True, compression_level)
    return path


def check_points_inside(image: sitk.Image, points_mm: np.ndarray, names: list[str], path: str | Path) -> None:
    """Raise ``InputError`` naming ``path`` if a physical point lies outside the image.

    ``points_mm``: (N, 3) LPS (x, y, z) mm. A point is inside when its continuous index is
    within half a voxel of the voxel grid on every axis.
    """
    size = np.array(image.GetSize(), dtype=np.float64)
    for name, p in zip(names, points_mm):
        idx = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p)))
        if (idx < -0.5).any() or (idx > size - 0.5).any():
            raise InputError(
                path,
                f"landmark {name} at LPS {_fmt(p)} mm (voxel {_fmt(idx)}) lies outside "
                f"the image of size {tuple(int(s) for s in size)}",
            )


def _fmt(values) -> str:
    """Numbers as a plain tuple with one decimal, e.g. ``(-14.7, 3.0, 120.5)``."""
    return "(" + ", ".join(f"{float(v):.1f}" for v in values) + ")"


def _first_line(exc: BaseException) -> str:
    """The informative line of a SimpleITK error (they start with a source location)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR" in ln or "not read completely" in ln or "Could not" in ln:
            return ln.split(":", 1)[-1].strip()[:200] if ln.startswith("ITK ERROR") else ln[:200]
    return lines[-1][:200] if lines else type(exc).__name__
