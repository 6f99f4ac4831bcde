"""Small real test images with known centroids, written with SimpleITK (no phantom generator needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def blob_image(
    size_xyz=(40, 36, 48),
    spacing_xyz=(1.5, 1.2, 2.5),
    origin_xyz=(-31.0, 12.5, 240.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    points_mm=(),
    sigma_mm: float = 4.0,
    background_hu: float = -1000.0,
    blob_hu: float = 1000.0,
) -> sitk.Image:
    """An int16 HU image with a Gaussian blob of ``blob_hu`` at each LPS point ``points_mm`` (x, y, z mm)."""
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkInt16)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin_xyz])
    image.SetDirection([float(d) for d in direction])
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size_xyz], indexing="ij"), axis=-1).reshape(-1, 3)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing_xyz)[None, :]
    phys = np.asarray(origin_xyz) + idx @ d.T  # (N, 3) in x-major index order
    values = np.full(len(idx), background_hu, dtype=np.float64)
    for p in points_mm:
        r2 = ((phys - np.asarray(p)) ** 2).sum(axis=1)
        values += (blob_hu - background_hu) * np.exp(-r2 / (2 * sigma_mm**2))
    arr = values.reshape(size_xyz).transpose(2, 1, 0)  # -> (z, y, x)
    out = sitk.GetImageFromArray(np.clip(arr, -1024, 3000).astype(np.int16))
    out.CopyInformation(image)
    return out


def write_generic_case(folder: Path, case_id: str, image: sitk.Image, named_points: dict[str, tuple]) -> Path:
    """Write ``<case_id>.nii.gz`` and ``<case_id>.json`` (label, x, y, z LPS mm); returns the image path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case_id}.nii.gz"
    sitk.WriteImage(image, str(path), True)
    points = [{"label": k, "x": v[0], "y": v[1], "z": v[2]} for k, v in named_points.items()]
    (folder / f"{case_id}.json").write_text(json.dumps(points))
    return path


AXIS_PERMUTATIONS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def signed_permutation(perm, signs) -> np.ndarray:
    """(3, 3) direction matrix whose column ``axis`` is ``signs[axis]`` times world axis ``perm[axis]``."""
    direction = np.zeros((3, 3))
    for axis, (world, sign) in enumerate(zip(perm, signs)):
        direction[world, axis] = sign
    return direction


def prepared_short_phantoms(root: Path, cases: int, seed: int, spacing_mm: float = 4.0):
    """``cases`` short-view coarse phantoms without metal, prepared at ``spacing_mm``: the PrepareResult."""
    from vertstudy.config import PrepConfig
    from vertstudy.data.phantom import PhantomConfig, write_phantoms
    from vertstudy.data.prepare import prepare_dataset

    config = PhantomConfig.preset("coarse", p_fov_full=0.0, p_fov_short=1.0, p_metal=0.0)
    write_phantoms(root / "phantoms", cases=cases, seed=seed, config=config, progress=False)
    result = prepare_dataset(root / "phantoms", root / "cache", prep=PrepConfig(spacing_mm=spacing_mm), progress=False)
    assert len(result.cases) == cases
    return result
