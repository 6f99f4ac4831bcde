"""Random crops along the spine with multi-label targets (paper section II-C, Fig. 7).

A training sample is a block of ``crop_size`` voxels ``(z, y, x)`` (default 104 x 80 x 80
at 2 mm) cut from a cached, canonical volume, centred on a random point of the spine plus a
random offset, with:

- ``present`` (26,) float32 in {0, 1}: class n's centroid lies inside the crop, i.e.
  ``0 <= c < size`` on every axis for its continuous crop coordinates ``c``;
- ``coords`` (26, 3) float32: the centroids in crop voxel units ``(z, y, x)``, crop voxel
  ``(0, 0, 0)`` being the crop's first voxel centre; zero where absent.

Crops may leave the volume (padded with the case's z-scored air, ``pad_value``), contain
partial vertebrae at their borders, and contain few or no centroids.

Coordinates: a canonical voxel coordinate ``p`` (z, y, x) and a crop coordinate ``q`` are
related by ``q = p - origin`` without augmentation. With augmentation (rotation about the
crop centre and isotropic scaling, matrix ``A``), output voxel ``q`` samples the canonical
point ``p = origin + h + A (q - h)`` where ``h = (size - 1) / 2`` is the crop centre, so the
targets move by the inverse ``q = h + A^-1 (p - origin - h)``.

Everything here is a pure function of its inputs and a ``numpy.random.Generator``, except
:class:`CropDataset`, which opens each case's memory map lazily in the process using it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import AugmentConfig, CropConfig
from vertstudy.data.cache import CachedCase

# Seed-stream tags so the shuffle order never shares a stream with item sampling.
_SHUFFLE_STREAM = 0x5EED
# ... nor the choice of crops placed anywhere (so ``anywhere_fraction = 0`` draws the same crops as before).
_ANYWHERE_STREAM = 0xA11


# -- where to crop ---------------------------------------------------------------------------
def spine_curve(indices: np.ndarray, zyx_vox: np.ndarray) -> np.ndarray:
    """The spine as a polyline: (M, 3) float64 canonical (z, y, x) voxel points ordered by class.

    ``indices`` (N,) class indices, ``zyx_vox`` (N, 3) their centroids. Returns the centroids
    sorted by class index (cranial to caudal); M = N (possibly 0).
    """
    zyx = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3)
    order = np.argsort(np.asarray(indices).reshape(-1), kind="stable")
    return zyx[order]


def point_on_curve(curve: np.ndarray, t: float) -> np.ndarray:
    """(3,) point at arc-length fraction ``t`` in [0, 1] along the polyline ``curve`` (M >= 1, 3)."""
    curve = np.asarray(curve, dtype=np.float64)
    if len(curve) == 1:
        return curve[0].copy()
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] <= 0:
        return curve[0].copy()
    s = float(np.clip(t, 0.0, 1.0)) * cum[-1]
    k = int(np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1))
    frac = (s - cum[k]) / seg[k] if seg[k] > 0 else 0.0
    return curve[k] + frac * (curve[k + 1] - curve[k])


def origin_for_centre(centre_zyx: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
    """(3,) int64 crop origin (canonical voxel of crop voxel 0) whose centre is nearest ``centre_zyx``.

    The centre of a crop of ``n`` voxels is crop coordinate ``(n - 1) / 2``.
    """
    half = (np.asarray(crop_size, dtype=np.float64) - 1.0) / 2.0
    return np.floor(np.asarray(centre_zyx, dtype=np.float64) - half + 0.5).astype(np.int64)


def _curve_or_centre(case: CachedCase) -> np.ndarray:
    curve = spine_curve(case.indices, case.zyx_vox)
    if len(curve) == 0:  # no centroids: crop the middle of the volume (all classes absent)
        return ((np.asarray(case.geometry.shape_zyx, dtype=np.float64) - 1.0) / 2.0)[None]
    return curve


def sample_crop_origin(
    case: CachedCase, crop_size: Sequence[int], jitter_vox: float, rng: np.random.Generator
) -> np.ndarray:
    """Random crop origin: (3,) int64 canonical (z, y, x) voxel.

    The crop centre is a point uniformly distributed along the spine polyline (centroids in
    class order; the volume centre for a case without centroids) plus an offset uniform in
    ``[-jitter_vox, jitter_vox]`` voxels on each axis.
    """
    centre = point_on_curve(_curve_or_centre(case), rng.random())
    centre = centre + rng.uniform(-jitter_vox, jitter_vox, size=3)
    return origin_for_centre(centre, crop_size)


def sample_anywhere_origin(
    shape_zyx: Sequence[int], crop_size: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Random crop origin (3,) int64 whose centre is uniform over the volume's voxel box
    ``[0, n - 1]`` on each axis of ``shape_zyx`` (z, y, x): crops away from the spine and
    beyond its ends, where most classes are absent."""
    high = np.maximum(np.asarray(shape_zyx, dtype=np.float64) - 1.0, 0.0)
    return origin_for_centre(rng.uniform(0.0, 1.0, size=3) * high, crop_size)


def validation_origins(case: CachedCase, crop_size: Sequence[int], n: int) -> np.ndarray:
    """(n, 3) int64 deterministic crop origins centred at arc fractions (k + 0.5) / n along the spine."""
    curve = _curve_or_centre(case)
    return np.stack([origin_for_centre(point_on_curve(curve, (k + 0.5) / n), crop_size) for k in range(n)])


# -- cutting ---------------------------------------------------------------------------------
def extract_crop(
    volume: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int], pad_value: float
) -> np.ndarray:
    """Cut a (D, H, W) float32 block of ``volume`` starting at canonical voxel ``origin_zyx``.

    ``volume`` (Z, Y, X) may be a memory map; only the block's overlap with it is read. Voxels
    outside the volume are ``pad_value``. Crop voxel ``k`` is volume voxel ``origin + k``.
    """
    origin = np.asarray(origin_zyx, dtype=np.int64)
    size = np.asarray(crop_size, dtype=np.int64)
    shape = np.asarray(volume.shape, dtype=np.int64)
    lo = np.clip(origin, 0, shape)
    hi = np.clip(origin + size, 0, shape)
    if (lo == origin).all() and (hi == origin + size).all():
        return np.array(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)  # always a copy
    out = np.full(tuple(int(s) for s in size), pad_value, dtype=np.float32)
    if (hi > lo).all():
        a, b = lo - origin, hi - origin
        out[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return out


def targets_from_crop_coords(
    indices: np.ndarray, crop_zyx: np.ndarray, crop_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label targets from centroids already in crop voxel units.

    ``indices`` (N,) class indices, ``crop_zyx`` (N, 3) continuous crop (z, y, x) voxels.
    Returns ``present`` (26,) float32 in {0, 1} (inside when ``0 <= c < size`` on every axis)
    and ``coords`` (26, 3) float32 crop (z, y, x) voxels, zero where absent.
    """
    crop_zyx = np.asarray(crop_zyx, dtype=np.float64).reshape(-1, 3)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    inside = ((crop_zyx >= 0) & (crop_zyx < np.asarray(crop_size, dtype=np.float64))).all(axis=1)
    present = np.zeros(NUM_CLASSES, dtype=np.float32)
    coords = np.zeros((NUM_CLASSES, 3), dtype=np.float32)
    present[idx[inside]] = 1.0
    coords[idx[inside]] = crop_zyx[inside]
    return present, coords


def crop_targets(
    indices: np.ndarray, zyx_vox: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Targets of an unaugmented crop: centroids ``zyx_vox`` (N, 3) canonical voxels of classes
    ``indices`` (N,), crop at ``origin_zyx``. Returns ``present`` (26,) and ``coords`` (26, 3)
    float32 as :func:`targets_from_crop_coords`."""
    crop_zyx = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3) - np.asarray(origin_zyx, dtype=np.float64)
    return targets_from_crop_coords(indices, crop_zyx, crop_size)


# -- augmentation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Augment:
    """One draw of the light augmentation.

    ``matrix`` (3, 3) float64 acts on (z, y, x) voxel offsets from the crop centre: output
    voxel ``q`` samples ``centre + matrix @ (q - h)``. For a rotation ``R`` and an isotropic
    zoom ``z`` (``z > 1`` magnifies), ``matrix = R / z``. Intensities become ``x * gain + shift``.
    """

    matrix: np.ndarray
    gain: float = 1.0
    shift: float = 0.0


def rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """(3, 3) rotation acting on (z, y, x) vectors: rotate about the z axis, then y, then x.

    ``angles_rad`` = (about z, about y, about x). Rotation about z turns the (y, x) plane,
    about y the (z, x) plane, about x the (z, y) plane. Used as a crop's ``matrix``, a
    positive angle turns image content from the later axis toward the earlier one (about z
    by +90 degrees, a structure on the crop's +x side moves to its +y side).
    """
    az, ay, ax = (float(a) for a in angles_rad)

    def plane(i: int, j: int, a: float) -> np.ndarray:
        m = np.eye(3)
        c, s = math.cos(a), math.sin(a)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    return plane(0, 1, ax) @ plane(0, 2, ay) @ plane(1, 2, az)


def sample_augment(augment: AugmentConfig, rng: np.random.Generator) -> Augment:
    """Draw rotation angles uniform in +-``rotate_deg`` about each axis, a zoom uniform in
    ``1 +- scale``, a gain uniform in ``1 +- intensity_scale`` and a shift in +-``intensity_shift``."""
    angles = np.deg2rad(rng.uniform(-augment.rotate_deg, augment.rotate_deg, size=3))
    zoom = 1.0 + rng.uniform(-augment.scale, augment.scale)
    gain = 1.0 + rng.uniform(-augment.intensity_scale, augment.intensity_scale)
    shift = rng.uniform(-augment.intensity_shift, augment.intensity_shift)
    return Augment(matrix=rotation_matrix(angles) / zoom, gain=float(gain), shift=float(shift))


def source_points(crop_zyx: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int], matrix: np.ndarray):
    """Canonical (z, y, x) voxels sampled by crop voxels ``crop_zyx`` (N, 3): ``o + h + A (q - h)``."""
    h = (np.asarray(crop_size, dtype=np.float64) - 1.0) / 2.0
    q = np.asarray(crop_zyx, dtype=np.float64).reshape(-1, 3)
    return np.asarray(origin_zyx, dtype=np.float64) + h + (q - h) @ np.asarray(matrix, dtype=np.float64).T


def transform_points(zyx_vox: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int], matrix: np.ndarray):
    """Canonical (z, y, x) voxels (N, 3) -> (N, 3) augmented crop voxels: ``h + A^-1 (p - o - h)``."""
    h = (np.asarray(crop_size, dtype=np.float64) - 1.0) / 2.0
    p = np.asarray(zyx_vox, dtype=np.float64).reshape(-1, 3)
    inv = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    return h + (p - np.asarray(origin_zyx, dtype=np.float64) - h) @ inv.T


def source_block(
    origin_zyx: Sequence[int], crop_size: Sequence[int], matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The canonical block (origin (3,), size (3,) int64) holding every voxel the warped crop reads,
    with one voxel of margin for trilinear interpolation."""
    size = np.asarray(crop_size, dtype=np.int64)
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in size], indexing="ij")).reshape(3, -1).T
    pts = source_points(corners, origin_zyx, crop_size, matrix)
    lo = np.floor(pts.min(axis=0)).astype(np.int64) - 1
    hi = np.ceil(pts.max(axis=0)).astype(np.int64) + 2
    return lo, hi - lo


def grid_theta(
    origin_zyx: Sequence[int], crop_size: Sequence[int], matrix: np.ndarray, block_origin: np.ndarray, block_size
) -> np.ndarray:
    """(3, 4) float64 ``theta`` for ``F.affine_grid(..., align_corners=True)`` sampling the block.

    affine_grid maps output normalised coordinates ``u_out`` to input normalised ``u_in``
    in (x, y, z) order, with ``u = 2 i / (n - 1) - 1`` for voxel index ``i`` of ``n``. In (z, y, x):
    ``q = D u_out + h`` (``D = diag(h)``), ``b = o + h + A (q - h) - o_b`` and ``u_in = S b - 1``
    (``S = diag(2 / (n_b - 1))``), hence ``u_in = S A D u_out + S (o + h - o_b) - 1``.
    The axes are then reversed to affine_grid's (x, y, z).
    """
    h = (np.asarray(crop_size, dtype=np.float64) - 1.0) / 2.0
    s = 2.0 / (np.asarray(block_size, dtype=np.float64) - 1.0)
    lin = (s[:, None] * np.asarray(matrix, dtype=np.float64)) * h[None, :]
    trans = s * (np.asarray(origin_zyx, dtype=np.float64) + h - np.asarray(block_origin, dtype=np.float64)) - 1.0
    return np.concatenate([lin[::-1, ::-1], trans[::-1, None]], axis=1)


def warp_crop_reference(
    volume: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int], pad_value: float, matrix: np.ndarray
) -> np.ndarray:
    """(D, H, W) float32 crop whose voxel ``q`` is ``volume`` at ``o + h + A (q - h)`` (trilinear).

    The plain version: ``F.affine_grid`` (:func:`grid_theta`) + 3-D ``F.grid_sample`` on the
    block the warped crop covers (pad subtracted, zero padding, pad added back). About 3x
    slower than :func:`warp_crop`, which must agree with it; kept as the reference.
    """
    block_origin, block_size = source_block(origin_zyx, crop_size, matrix)
    block = extract_crop(volume, block_origin, block_size, pad_value)
    block -= pad_value  # zero padding of grid_sample then means pad_value
    theta = grid_theta(origin_zyx, crop_size, matrix, block_origin, block_size)
    size = [1, 1, *(int(v) for v in crop_size)]
    grid = F.affine_grid(torch.from_numpy(theta[None]).float(), size, align_corners=True)
    out = F.grid_sample(
        torch.from_numpy(block)[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0].numpy()
    out += pad_value
    return out


def warp_crop(
    volume: np.ndarray, origin_zyx: Sequence[int], crop_size: Sequence[int], pad_value: float, matrix: np.ndarray
) -> np.ndarray:
    """(D, H, W) float32 crop whose voxel ``q`` is ``volume`` at ``o + h + A (q - h)`` (trilinear).

    Same result as :func:`warp_crop_reference` (to float32 rounding of the sample positions,
    ~1e-3 voxel) in about a third of the time, because CPU ``grid_sample`` is vectorised for
    2-D only: the block's slices are stacked into one tall 2-D image, bilinear samples are
    taken in slices ``floor(z)`` and ``floor(z) + 1`` (a batch of two views of that image,
    one slice apart) and blended linearly in z. The block (:func:`source_block`, from
    :func:`extract_crop`, so ``pad_value`` outside the volume) has a one-voxel margin, so
    every sample and its neighbours lie inside it and rows never mix across slices.
    """
    block_origin, block_size = source_block(origin_zyx, crop_size, matrix)
    block = torch.from_numpy(extract_crop(volume, block_origin, block_size, pad_value))
    nz, ny, nx = (int(v) for v in block_size)
    size = [int(v) for v in crop_size]
    matrix = np.asarray(matrix, dtype=np.float64)
    h = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    centre = np.asarray(origin_zyx, dtype=np.float64) + h - block_origin  # crop centre, block voxels
    offsets = [np.arange(n) - c for n, c in zip(size, h)]

    def along(k: int, a: int, scale: float = 1.0) -> torch.Tensor:
        """Contribution of output axis ``a`` to block coordinate ``k`` (times ``scale``), (size[a],)."""
        return torch.from_numpy((scale * matrix[k, a] * offsets[a]).astype(np.float32))

    # Block z of every output voxel, (D, H, W): its integer slice and the blend weight.
    pz = (along(0, 0) + float(centre[0]))[:, None, None] + along(0, 1)[None, :, None] + along(0, 2)[None, None, :]
    z0 = torch.floor(pz)
    fz = pz - z0
    # 2-D grid (x, y) normalised for align_corners=True over an image of (nz - 1) * ny rows, nx columns:
    # column = block x, row = z0 * ny + block y; built by broadcasting so it is contiguous.
    sx, sy = 2.0 / (nx - 1), 2.0 / ((nz - 1) * ny - 1)
    terms = [torch.stack([along(2, a, sx), along(1, a, sy)], dim=-1) for a in range(3)]
    terms[0] = terms[0] + torch.tensor([centre[2] * sx - 1.0, centre[1] * sy - 1.0], dtype=torch.float32)
    grid = terms[0][:, None, None] + terms[1][None, :, None] + terms[2][None, None, :]
    grid[..., 1].add_(z0, alpha=ny * sy)
    # Two views of the stacked slices, the second one slice further: samples in z0 and z0 + 1.
    pair = torch.as_strided(block.reshape(-1), (2, 1, (nz - 1) * ny, nx), (ny * nx, 0, nx, 1))
    grid = grid.reshape(1, size[0] * size[1], size[2], 2).expand(2, -1, -1, -1)
    both = F.grid_sample(pair, grid, mode="bilinear", padding_mode="border", align_corners=True)
    both = both.reshape(2, *size)
    return torch.lerp(both[0], both[1], fz).numpy()


def make_crop(
    volume: np.ndarray,
    indices: np.ndarray,
    zyx_vox: np.ndarray,
    origin_zyx: Sequence[int],
    crop_size: Sequence[int],
    pad_value: float,
    augment: Augment | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and targets of one crop: ``(image (D, H, W) float32, present (26,), coords (26, 3))``.

    Without ``augment`` it is :func:`extract_crop` + :func:`crop_targets`; with it, the image is
    warped (:func:`warp_crop`), the centroids moved by the same transform and ``present``
    recomputed, and the intensities scaled and shifted.
    """
    if augment is None:
        image = extract_crop(volume, origin_zyx, crop_size, pad_value)
        present, coords = crop_targets(indices, zyx_vox, origin_zyx, crop_size)
        return image, present, coords
    if np.allclose(augment.matrix, np.eye(3)):
        image = extract_crop(volume, origin_zyx, crop_size, pad_value)
        present, coords = crop_targets(indices, zyx_vox, origin_zyx, crop_size)
    else:
        image = warp_crop(volume, origin_zyx, crop_size, pad_value, augment.matrix)
        crop_zyx = transform_points(zyx_vox, origin_zyx, crop_size, augment.matrix)
        present, coords = targets_from_crop_coords(indices, crop_zyx, crop_size)
    if augment.gain != 1.0 or augment.shift != 0.0:
        image *= np.float32(augment.gain)
        image += np.float32(augment.shift)
    return image, present, coords


# -- dataset and loader ----------------------------------------------------------------------
class CropDataset(Dataset):
    """Crops along the spine of cached cases, ``len(cases) * crop.crops_per_case`` items per epoch.

    Item ``i`` is crop ``i % crops_per_case`` of case ``i // crops_per_case``. In training mode
    it is drawn from ``np.random.default_rng([seed, epoch, i])``, so it depends only on
    ``(seed, epoch, i)``, not on worker count or order; the index may also be an
    ``(epoch, i)`` pair (see :class:`EpochSampler`). A fraction ``crop.anywhere_fraction`` of
    the training crops (chosen from a stream of their own) is centred uniformly anywhere in
    the volume instead (:func:`sample_anywhere_origin`). Validation mode (``train=False``) has no
    augmentation and fixed crops centred at evenly spaced points along the spine.

    Each item is a dict: ``image`` (1, D, H, W) float32 tensor, ``present`` (26,) float32,
    ``coords`` (26, 3) float32 crop (z, y, x) voxels, ``case`` (str case id), ``origin`` (3,)
    int64 canonical (z, y, x) voxel of crop voxel 0 (before augmentation, which turns about
    the crop centre). Volumes are memory-mapped lazily in each process and never pickled.
    """

    def __init__(
        self, cases: list[CachedCase], crop: CropConfig, augment: AugmentConfig, seed: int, train: bool = True
    ):
        self.cases = list(cases)
        self.crop = crop
        self.augment = augment
        self.seed = int(seed)
        self.train = bool(train)
        self.epoch = 0
        self._volumes: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cases) * self.crop.crops_per_case

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops plain integer indices draw."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_volumes"] = {}  # memory maps are reopened in each worker
        return state

    def volume(self, case_number: int) -> np.ndarray:
        """(Z, Y, X) float16 memory map of case ``case_number``, opened once per process."""
        vol = self._volumes.get(case_number)
        if vol is None:
            vol = self._volumes[case_number] = self.cases[case_number].volume(mmap=True)
        return vol

    def origin_and_augment(self, epoch: int, i: int) -> tuple[np.ndarray, Augment | None]:
        """Crop origin (3,) int64 and augmentation (or None) of item ``i`` in ``epoch``."""
        case_number, k = divmod(i, self.crop.crops_per_case)
        case = self.cases[case_number]
        if not self.train:
            return validation_origins(case, self.crop.crop_size, self.crop.crops_per_case)[k], None
        rng = np.random.default_rng([self.seed, epoch, i])
        jitter_vox = self.crop.jitter_mm / case.geometry.spacing_mm
        origin = sample_crop_origin(case, self.crop.crop_size, jitter_vox, rng)
        if self.crop.anywhere_fraction > 0:
            other = np.random.default_rng([self.seed, epoch, i, _ANYWHERE_STREAM])
            if other.random() < self.crop.anywhere_fraction:
                origin = sample_anywhere_origin(case.geometry.shape_zyx, self.crop.crop_size, other)
        aug = sample_augment(self.augment, rng) if self.augment.enabled else None
        return origin, aug

    def __getitem__(self, index) -> dict:
        epoch, i = (int(index[0]), int(index[1])) if isinstance(index, tuple | list) else (self.epoch, int(index))
        if not 0 <= i < len(self):
            raise IndexError(f"crop index {i} out of range for {len(self)} crops")
        case_number = i // self.crop.crops_per_case
        case = self.cases[case_number]
        origin, aug = self.origin_and_augment(epoch, i)
        image, present, coords = make_crop(
            self.volume(case_number), case.indices, case.zyx_vox, origin, self.crop.crop_size, case.pad_value, aug
        )
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],
            "present": torch.from_numpy(present),
            "coords": torch.from_numpy(coords),
            "case": case.case_id,
            "origin": torch.from_numpy(np.asarray(origin, dtype=np.int64)),
        }


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for every item of ``dataset`` in the dataset's current epoch.

    The epoch is read in the main process when iteration starts, so ``dataset.set_epoch``
    reaches persistent workers (which hold their own copy of the dataset). With ``shuffle``
    the order is a permutation drawn from ``(seed, epoch)``, so it is reproducible too.
    """

    def __init__(self, dataset: CropDataset, shuffle: bool, seed: int):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, n = self.dataset.epoch, len(self.dataset)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, _SHUFFLE_STREAM]).permutation(n)
        return iter([(epoch, int(i)) for i in order])


def _worker_init(worker_id: int) -> None:
    """One intra-op thread per worker (workers are the parallelism); seed numpy's legacy RNG."""
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: CropDataset,
    batch_size: int = 2,
    workers: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A deterministic DataLoader over ``dataset`` (shuffled by default in training mode).

    Batches: ``image`` (B, 1, D, H, W) float32, ``present`` (B, 26) float32, ``coords``
    (B, 26, 3) float32, ``case`` list of B str, ``origin`` (B, 3) int64. Order and content
    depend only on the dataset's seed and epoch (call ``dataset.set_epoch`` before each
    epoch), whatever ``workers`` is. Workers are persistent when ``workers > 0``.
    """
    shuffle = dataset.train if shuffle is None else shuffle
    generator = torch.Generator()
    generator.manual_seed(dataset.seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset, shuffle=shuffle, seed=dataset.seed),
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=drop_last,
    )
