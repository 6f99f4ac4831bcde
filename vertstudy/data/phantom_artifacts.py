"""Image artifacts of the spine phantom: metal streaks and correlated noise.

Arrays are (z, y, x) float32 HU over an identity-direction :class:`~.phantom_draw.Grid`;
streaks live in the axial planes, as in a real CT reconstruction.
"""

from __future__ import annotations

import numpy as np

from vertstudy.data.phantom_draw import Box, Grid

_BINS = 1440  # angular resolution of the streak profile over pi


def _angular_profile(rng: np.random.Generator, lines: int) -> np.ndarray:
    """(_BINS,) streak intensity over angle in [0, pi): narrow peaks of alternating sign + ripple."""
    phi = np.arange(_BINS) * np.pi / _BINS
    prof = np.zeros(_BINS)
    for k, theta in enumerate(rng.uniform(0, np.pi, lines)):
        width = np.deg2rad(rng.uniform(0.5, 1.6))
        delta = (phi - theta + np.pi / 2) % np.pi - np.pi / 2
        prof += (1.0 if k % 2 == 0 else -1.2) * rng.uniform(0.4, 1.0) * np.exp(-0.5 * (delta / width) ** 2)
    ripple = np.convolve(rng.standard_normal(_BINS + 8), np.ones(9) / 3.0, mode="valid")[:_BINS]
    return (prof + 0.25 * ripple).astype(np.float32)


def add_metal_streaks(vol: np.ndarray, grid: Grid, metal_box: Box, metal_sdf: np.ndarray, midline_x: float,
                      rng: np.random.Generator, strength: float) -> None:
    """Add streak artifacts in every axial slice that contains metal (in place).

    Per slice, the metal is split into a left and a right blob (about ``midline_x``, mm); each
    blob radiates bright and dark rays (a fixed angular profile per case, jittered per slice,
    decaying with distance) scaled by the blob's area, and a dark band (photon starvation)
    joins the two blobs. ``strength`` scales all amplitudes (HU, ~300-600).
    """
    profiles = {side: _angular_profile(rng, 12) for side in (-1, 1)}
    xa, ya, _ = grid.axes((slice(0, 1), slice(0, grid.shape_zyx[1]), slice(0, grid.shape_zyx[2])))
    xm, ym, _ = grid.axes(metal_box)
    area_px = grid.spacing_xyz[0] * grid.spacing_xyz[1]
    for kk in range(metal_sdf.shape[0]):
        mask = metal_sdf[kk] < 0
        if not mask.any():
            continue
        jj, ii = np.nonzero(mask)
        mx, my = xm[0, 0, ii], ym[0, jj, 0]
        blobs = []
        for side in (-1, 1):
            sel = (mx - midline_x) * side >= 0
            if sel.any():
                blobs.append((side, float(mx[sel].mean()), float(my[sel].mean()), sel.sum() * area_px))
        k = metal_box[0].start + kk
        out = np.zeros((grid.shape_zyx[1], grid.shape_zyx[2]), dtype=np.float32)
        jitter = int(rng.integers(-4, 5))
        for side, cx, cy, area in blobs:
            dx, dy = xa[0] - np.float32(cx), ya[0] - np.float32(cy)
            r = np.sqrt(dx * dx + dy * dy)
            phi = np.mod(np.arctan2(dy, dx), np.pi)
            idx = (phi * (_BINS / np.pi)).astype(np.int32) + jitter
            amp = strength * float(np.clip(area / 80.0, 0.3, 2.0))
            out += amp * profiles[side][idx % _BINS] / (1.0 + r / 60.0)
        if len(blobs) == 2:
            (_, x0, y0, a0), (_, x1, y1, a1) = blobs
            length = max(np.hypot(x1 - x0, y1 - y0), 1e-3)
            nx, ny = -(y1 - y0) / length, (x1 - x0) / length
            dist = (xa[0] - np.float32(x0)) * np.float32(nx) + (ya[0] - np.float32(y0)) * np.float32(ny)
            amp = strength * 1.2 * float(np.clip(min(a0, a1) / 60.0, 0.3, 1.5))
            out -= amp * np.exp(-0.5 * (dist / 3.5) ** 2)
        vol[k] += out


def add_noise(vol: np.ndarray, rng: np.random.Generator, sigma: float, bank_slices: int = 12, pad: int = 32) -> None:
    """Add lightly correlated Gaussian noise of std ``sigma`` HU to ``vol`` (in place).

    A small bank of noise images (each the mean of 2x2 neighbouring white-noise pixels, times 2,
    so unit variance with correlation ~0.5 between neighbours) is cut at a random offset for every
    slice: cheap, and no two slices share the same noise.
    """
    nz, ny, nx = vol.shape
    nb = min(bank_slices, nz)
    white = rng.standard_normal((nb, ny + pad + 1, nx + pad + 1), dtype=np.float32)
    bank = (white[:, 1:, 1:] + white[:, :-1, 1:] + white[:, 1:, :-1] + white[:, :-1, :-1]) * np.float32(0.5 * sigma)
    which = rng.integers(0, nb, nz)
    oy = rng.integers(0, pad + 1, nz)
    ox = rng.integers(0, pad + 1, nz)
    for k in range(nz):
        vol[k] += bank[which[k], oy[k]:oy[k] + ny, ox[k]:ox[k] + nx]
