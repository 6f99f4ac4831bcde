"""Preprocessing (paper section III-A): canonical orientation, isotropic resampling, HU clamp, z-score.

The canonical grid has an identity direction matrix, so array axis 0 is the body's long
axis (LPS +z, superior, index increasing toward the head), axis 1 is LPS +y (posterior)
and axis 2 is LPS +x (patient left). It covers the physical bounding box of the original
image at isotropic ``spacing_mm``. Because reorientation and resampling happen in physical
space, a physical point is the same before and after; :class:`Geometry` keeps both grids so
a canonical voxel maps back to the original image's physical space and voxel indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from vertstudy.config import PrepConfig
from vertstudy.data.case import Case


@dataclass(frozen=True)
class Geometry:
    """Canonical and original grids of one case.

    Canonical voxel ``(z, y, x)`` -> LPS mm: ``origin_xyz_mm + spacing_mm * (x, y, z)``.
    Original continuous index ``(x, y, z)`` (SimpleITK order) -> LPS mm:
    ``orig_origin + orig_direction @ (orig_spacing * index)``.
    """

    spacing_mm: float
    origin_xyz_mm: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    orig_origin_xyz_mm: tuple[float, float, float]
    orig_spacing_xyz_mm: tuple[float, float, float]
    orig_direction: tuple[float, ...]  # 9 values, row-major, columns are the index axes
    orig_size_xyz: tuple[int, int, int]

    # -- canonical voxel <-> physical ------------------------------------------------------
    def canonical_to_physical(self, zyx_vox: np.ndarray) -> np.ndarray:
        """(N, 3) canonical (z, y, x) voxel -> (N, 3) LPS (x, y, z) mm."""
        zyx = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3)
        return np.asarray(self.origin_xyz_mm) + self.spacing_mm * zyx[:, ::-1]

    def physical_to_canonical(self, xyz_mm: np.ndarray) -> np.ndarray:
        """(N, 3) LPS (x, y, z) mm -> (N, 3) canonical (z, y, x) continuous voxel."""
        xyz = np.asarray(xyz_mm, dtype=np.float64).reshape(-1, 3)
        return ((xyz - np.asarray(self.origin_xyz_mm)) / self.spacing_mm)[:, ::-1]

    # -- original voxel <-> physical -------------------------------------------------------
    def _orig_matrix(self) -> np.ndarray:
        direction = np.asarray(self.orig_direction, dtype=np.float64).reshape(3, 3)
        return direction * np.asarray(self.orig_spacing_xyz_mm)[None, :]

    def original_index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """(N, 3) original continuous index (x, y, z) -> (N, 3) LPS (x, y, z) mm."""
        idx = np.asarray(index_xyz, dtype=np.float64).reshape(-1, 3)
        return np.asarray(self.orig_origin_xyz_mm) + idx @ self._orig_matrix().T

    def physical_to_original_index(self, xyz_mm: np.ndarray) -> np.ndarray:
        """(N, 3) LPS (x, y, z) mm -> (N, 3) original continuous index (x, y, z)."""
        xyz = np.asarray(xyz_mm, dtype=np.float64).reshape(-1, 3)
        return np.linalg.solve(self._orig_matrix(), (xyz - np.asarray(self.orig_origin_xyz_mm)).T).T

    def canonical_to_original_index(self, zyx_vox: np.ndarray) -> np.ndarray:
        """(N, 3) canonical (z, y, x) voxel -> (N, 3) original continuous index (x, y, z)."""
        return self.physical_to_original_index(self.canonical_to_physical(zyx_vox))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            spacing_mm=float(d["spacing_mm"]),
            origin_xyz_mm=tuple(d["origin_xyz_mm"]),
            shape_zyx=tuple(int(v) for v in d["shape_zyx"]),
            orig_origin_xyz_mm=tuple(d["orig_origin_xyz_mm"]),
            orig_spacing_xyz_mm=tuple(d["orig_spacing_xyz_mm"]),
            orig_direction=tuple(d["orig_direction"]),
            orig_size_xyz=tuple(int(v) for v in d["orig_size_xyz"]),
        )


@dataclass
class Prepared:
    """A preprocessed case in memory.

    Attributes:
        volume: (D, H, W) float32 z-scored intensities on the canonical grid, (z, y, x).
        geometry: canonical and original grids.
        indices: (N,) int class indices of the landmarks.
        zyx_vox: (N, 3) float64 canonical (z, y, x) voxel coordinates of the landmarks.
        hu_mean, hu_std: statistics used for the z-score (HU, after clamping).
        pad_value: the z-scored value of air (``hu_min``), for padding crops.
    """

    volume: np.ndarray
    geometry: Geometry
    indices: np.ndarray
    zyx_vox: np.ndarray
    hu_mean: float
    hu_std: float
    pad_value: float


def canonical_geometry(image: sitk.Image, spacing_mm: float) -> Geometry:
    """The identity-direction isotropic grid covering ``image``'s physical bounding box."""
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1).T
    orig = Geometry(
        spacing_mm=spacing_mm,
        origin_xyz_mm=(0.0, 0.0, 0.0),
        shape_zyx=(1, 1, 1),
        orig_origin_xyz_mm=tuple(float(v) for v in image.GetOrigin()),
        orig_spacing_xyz_mm=tuple(float(v) for v in image.GetSpacing()),
        orig_direction=tuple(float(v) for v in image.GetDirection()),
        orig_size_xyz=tuple(int(v) for v in image.GetSize()),
    )
    phys = orig.original_index_to_physical(corners)
    lo, hi = phys.min(axis=0), phys.max(axis=0)
    # Round the extent up to whole voxels; the 1e-3 voxel tolerance absorbs float32 spacings
    # in NIfTI headers (50 x 1.2 mm reads back as 60.0000024 mm) that would add a row of air.
    shape_xyz = np.maximum(1, np.ceil((hi - lo) / spacing_mm - 1e-3)).astype(int)
    origin = lo + 0.5 * spacing_mm
    return Geometry(
        spacing_mm=float(spacing_mm),
        origin_xyz_mm=tuple(float(v) for v in origin),
        shape_zyx=tuple(int(v) for v in shape_xyz[::-1]),
        orig_origin_xyz_mm=orig.orig_origin_xyz_mm,
        orig_spacing_xyz_mm=orig.orig_spacing_xyz_mm,
        orig_direction=orig.orig_direction,
        orig_size_xyz=orig.orig_size_xyz,
    )


def _antialias(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Low-pass ``image`` before downsampling to ``spacing_mm``; returns a float32 image.

    Along each axis whose spacing fits k >= 2 times into ``spacing_mm``, voxels are first
    averaged in bins of k (``BinShrink``, after padding the end by edge replication so no
    voxel is dropped): a box filter that also cuts the work of what follows by k. What is
    left of the band limit is a Gaussian with sigma = (s_out - s_in) / 2 mm along each axis
    still finer than ``spacing_mm`` by more than half a voxel.
    """
    factors = [max(1, int(spacing_mm / s + 1e-6)) for s in image.GetSpacing()]
    if max(factors) > 1:
        pad = [(-n) % k for n, k in zip(image.GetSize(), factors)]
        if any(pad):
            image = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], pad)
        image = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    image = sitk.Cast(image, sitk.sitkFloat32)
    for axis, s_in in enumerate(image.GetSpacing()):
        sigma = 0.5 * (spacing_mm - s_in)
        if sigma > 0.25 * s_in:
            image = sitk.RecursiveGaussian(image, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return image


def resample_canonical(image: sitk.Image, geometry: Geometry, prep: PrepConfig) -> np.ndarray:
    """Resample ``image`` (HU) onto the canonical grid; returns (D, H, W) float32 HU, (z, y, x)."""
    image = _antialias(image, geometry.spacing_mm) if prep.antialias else sitk.Cast(image, sitk.sitkFloat32)
    reference = sitk.Image([int(v) for v in geometry.shape_zyx[::-1]], sitk.sitkFloat32)
    reference.SetSpacing([geometry.spacing_mm] * 3)
    reference.SetOrigin(geometry.origin_xyz_mm)
    reference.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(prep.hu_min))
    return sitk.GetArrayFromImage(resampled)


def normalize(volume_hu: np.ndarray, hu_min: float) -> tuple[np.ndarray, float, float]:
    """Clamp HU below ``hu_min`` and z-score in place; returns (volume, mean HU, std HU)."""
    np.maximum(volume_hu, hu_min, out=volume_hu)
    mean = float(volume_hu.mean())  # numpy's pairwise float32 sums: ~1e-6 relative error
    std = float(volume_hu.std())
    std = std if std > 1e-6 else 1.0
    volume_hu -= mean
    volume_hu /= std
    return volume_hu, mean, std


#: Direction cosines smaller than this in magnitude are taken as 0. ITK inverts a direction
#: matrix by SVD, and on one with entries around 1e-290 (an axis aligned but for rounding) the SVD
#: fails ("suspicious return value (3) from SVDC"): its physical-to-index transform gives NaN and
#: resampling returns nothing but padding (found by the random-orientation test).
DIRECTION_EPS = 1e-12


def snap_direction(image: sitk.Image) -> sitk.Image:
    """``image`` with direction cosines below :data:`DIRECTION_EPS` set to 0 (a copy; ``image``
    itself when none is), so ITK can invert its direction."""
    d = np.asarray(image.GetDirection(), dtype=np.float64)
    snapped = np.where(np.abs(d) < DIRECTION_EPS, 0.0, d)
    if np.array_equal(snapped, d):
        return image
    image = sitk.Image(image)
    image.SetDirection(tuple(float(v) for v in snapped))
    return image


def preprocess(case: Case, prep: PrepConfig) -> Prepared:
    """Canonical orientation, isotropic ``prep.spacing_mm`` resampling, HU clamp and z-score."""
    image = snap_direction(case.image)
    geometry = canonical_geometry(image, prep.spacing_mm)
    volume = resample_canonical(image, geometry, prep)
    volume, mean, std = normalize(volume, prep.hu_min)
    indices = np.array([lm.index for lm in case.landmarks], dtype=np.int64)
    zyx = geometry.physical_to_canonical(case.points_mm())
    return Prepared(
        volume=volume,
        geometry=geometry,
        indices=indices,
        zyx_vox=zyx,
        hu_mean=mean,
        hu_std=std,
        pad_value=(prep.hu_min - mean) / std,
    )
