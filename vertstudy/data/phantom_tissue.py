"""Soft tissues of the spine phantom, rendered slice-block by slice-block.

The body outline is an ellipse per axial slice whose size follows the spine level at that
height (head, neck, shoulders/thorax, abdomen, pelvis), with subcutaneous fat (~-100 HU)
around soft tissue (~40 HU, low-frequency texture, fat patches in the abdomen), lungs
(~-850 HU) inside the rib cage at thoracic levels (diaphragm domes at the base, apices above
T1), the trachea, liver, kidneys, and the scanner table; air (-1000 HU) outside.

Arrays are (z, y, x) float32 HU over an identity-direction :class:`~.phantom_draw.Grid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vertstudy.anatomy import INDEX
from vertstudy.data.phantom_anatomy import _RIBS, RIB_POSTERIOR_MM, T1, Spine
from vertstudy.data.phantom_draw import Grid

# Body outline by fractional level (0 = C1 .. 25 = S2; < 0 above C1, > 25 below S2):
# half width, half depth, distance from the body centroid to the back skin, fat thickness (mm).
_OUTLINE_F = (-4.0, -1.0, 0.0, 3.0, 6.0, 7.5, 9.0, 13.0, 18.0, 21.0, 23.0, 24.5, 28.0)
_OUTLINE = {
    "half_w": (68, 70, 58, 52, 62, 150, 158, 150, 145, 140, 150, 170, 178),
    "half_d": (88, 88, 60, 55, 60, 85, 100, 110, 115, 110, 105, 110, 110),
    "back": (70, 70, 62, 56, 66, 76, 82, 82, 80, 80, 85, 62, 50),
    "fat": (4, 4, 6, 8, 10, 14, 14, 15, 20, 22, 22, 25, 28),
}
AIR, FAT, SOFT, LUNG = -1000.0, -100.0, 40.0, -850.0
INDEX_T10 = INDEX["T10"]


@dataclass(frozen=True)
class Habitus:
    """Patient build: outline width/depth scale, fat scale, lateral offset of the outline (mm)."""

    girth: float
    fat: float
    offset_x: float


class SmoothField:
    """Low-frequency random texture, unit variance, evaluated block by block.

    Random values on a coarse lattice (``cell_mm`` apart) are spread to voxels with separable
    Gaussian weights; each voxel block costs two small matrix products per slice.
    """

    def __init__(self, rng: np.random.Generator, grid: Grid, cell_mm: tuple[float, float, float], channels: int):
        nz, ny, nx = grid.shape_zyx
        self._w = []
        for axis, n in zip((2, 1, 0), (nz, ny, nx)):
            coords = np.arange(n) * grid.spacing_xyz[axis]
            cell = cell_mm[axis]
            lattice = np.arange(-1, coords[-1] / cell + 2) * cell
            w = np.exp(-0.5 * ((coords[:, None] - lattice[None, :]) / (0.8 * cell)) ** 2)
            self._w.append((w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32))
        wz, wy, wx = self._w
        self._g = rng.standard_normal((channels, wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32)

    def block(self, z0: int, z1: int, channel: int, win: tuple[slice, slice]) -> np.ndarray:
        """(z1 - z0, wy, wx) float32 texture of slices z0..z1-1 inside the in-plane window ``win``."""
        wz, wy, wx = self._w
        wy, wx = wy[win[0]], wx[win[1]]
        gz = np.tensordot(wz[z0:z1], self._g[channel], axes=(1, 0))  # (nzc, gy, gx)
        gzx = np.tensordot(gz, wx, axes=(2, 1))  # (nzc, gy, nx)
        return np.ascontiguousarray(np.tensordot(wy, gzx, axes=(1, 1)).transpose(1, 0, 2))


def _fractional_levels(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(nz,) fractional level (0 = C1 .. 25 = S2) of each slice height ``z`` (mm), extrapolated."""
    zc = centres[:, 2]
    f = np.interp(z, zc[::-1], np.arange(26)[::-1].astype(float))
    above, below = z > zc[0], z < zc[-1]
    f[above] = -(z[above] - zc[0]) / 20.0
    f[below] = 25.0 + (zc[-1] - z[below]) / 25.0
    return f


def _slice_params(grid: Grid, spine: Spine, habitus: Habitus) -> dict[str, np.ndarray]:
    """Per-slice (nz,) outline, lung and organ parameters."""
    z = grid.world_z()
    f = _fractional_levels(z, spine.centres)
    fl = np.clip(f, 0, 25)
    idx = np.arange(26)
    p = {"f": f}
    for k, v in _OUTLINE.items():
        p[k] = np.interp(f, _OUTLINE_F, v).astype(float)
    p["half_w"] *= habitus.girth
    p["half_d"] *= habitus.girth
    p["fat"] *= habitus.fat
    p["back"] = p["back"] * spine.scale + (habitus.girth - 1.0) * 25.0 + p["fat"] - 12.0
    sx = np.interp(fl, idx, spine.outline_centres[:, 0])
    sy = np.interp(fl, idx, spine.outline_centres[:, 1])
    ax = np.interp(fl, idx, spine.centres[:, 0])
    ay = np.interp(fl, idx, spine.centres[:, 1])
    p["spine_x"], p["spine_y"] = ax, ay
    p["cx"] = sx + habitus.offset_x
    p["cy"] = sy + p["back"] - p["half_d"]
    # Rib cage (thoracic levels): ellipse half axes and centre, following the spine.
    tl = np.clip(f - T1, 0, 11)
    s = spine.scale * spine.chest
    p["rib_a"] = np.interp(tl, np.arange(12), _RIBS["A"]) * s
    p["rib_b"] = np.interp(tl, np.arange(12), _RIBS["B"]) * s
    p["rib_cx"] = 0.5 * (ax + sx)
    p["rib_cy"] = ay + RIB_POSTERIOR_MM * spine.scale - p["rib_b"]
    p["body_a"] = np.interp(fl, idx, spine.dims["body_a"])
    p["body_b"] = np.interp(fl, idx, spine.dims["body_b"])
    return p


def _ellipse_sd(x, y, cx, cy, a, b):
    """Approximate signed distance (mm) to an axis-aligned ellipse; params broadcast per slice."""
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (r - 1.0) * np.minimum(a, b)


def _cov(sd, edge):
    return np.clip(0.5 - sd / np.float32(edge), 0.0, 1.0)


@dataclass(frozen=True)
class _Block:
    """A block of slices: in-plane axes x (1, 1, nx), y (1, ny, 1), heights z (nzc, 1, 1) mm,
    fractional levels f (nzc, 1, 1) and the per-slice parameters ``p`` cut to the block."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    f: np.ndarray
    p: dict[str, np.ndarray]

    def col(self, key: str) -> np.ndarray:
        return self.p[key][:, None, None]

    def window(self, x_lo, x_hi, y_lo, y_hi, margin: float = 3.0) -> tuple[slice, slice] | None:
        """(y, x) slices of the in-plane box [x_lo, x_hi] x [y_lo, y_hi] mm (+ margin), or None."""
        xs = np.searchsorted(self.x[0, 0], [np.min(x_lo) - margin, np.max(x_hi) + margin])
        ys = np.searchsorted(self.y[0, :, 0], [np.min(y_lo) - margin, np.max(y_hi) + margin])
        if xs[1] <= xs[0] or ys[1] <= ys[0]:
            return None
        return slice(int(ys[0]), int(ys[1])), slice(int(xs[0]), int(xs[1]))

    def axes(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return self.x[:, :, win[1]], self.y[:, win[0], :]


def _lung_sd(blk: _Block, x, y, dome_z: float, apex_f: float):
    """Signed distance (mm) of the lungs: two half-thorax ellipses minus the mediastinum and the
    spine, cut below by diaphragm domes and tapered at the apex (x, y: window axes)."""
    f, z = blk.f, blk.z
    grow = np.sqrt(np.clip((f - apex_f) / 2.5, 0.0, 1.0))
    a, b = blk.col("rib_a") - 8.0, blk.col("rib_b") - 8.0
    cx, cy = blk.col("rib_cx"), blk.col("rib_cy")
    out = None
    for side in (-1.0, 1.0):
        lcx = cx + side * a * 0.5
        la = np.maximum(a * 0.5 * grow, 1.0)
        lb = np.maximum(b * (0.55 + 0.45 * grow), 1.0)
        sd = _ellipse_sd(x, y, lcx, cy + b * 0.05, la, lb)
        # Diaphragm dome: the lung ends where z drops below a dome over this side.
        rr = ((x - lcx) / la) ** 2 + ((y - cy) / lb) ** 2
        dome = dome_z + (8.0 if side < 0 else 0.0) + 35.0 * np.clip(1.0 - rr, 0.0, 1.0)
        sd = np.maximum(sd, dome - z)
        out = sd if out is None else np.minimum(out, sd)
    heart = np.clip((f - 9.5) / 3.0, 0, 1)
    mediast = _ellipse_sd(x, y, cx + 12.0 * heart, cy - b * 0.25, 18.0 + 42.0 * heart, b * 0.8)
    spine_ex = _ellipse_sd(x, y, blk.col("spine_x"), blk.col("spine_y") + 12.0, blk.col("body_a") + 12.0,
                           blk.col("body_b") + 26.0)
    return np.maximum(out, np.maximum(-mediast, -spine_ex))


def _paint2d(out: np.ndarray, win, cov: np.ndarray, value) -> None:
    """Blend ``value`` into the window ``win`` of ``out`` (nzc, ny, nx) with coverage ``cov``."""
    view = out[:, win[0], win[1]]
    view += cov * (value - view)


def render_tissue(
    vol: np.ndarray, grid: Grid, spine: Spine, habitus: Habitus, rng: np.random.Generator, block: int = 16
) -> None:
    """Fill ``vol`` (nz, ny, nx) float32 with air, body outline, fat, soft tissue, lungs and organs.

    Works block by block of ``block`` slices; every structure is evaluated only inside its own
    in-plane window.
    """
    p = _slice_params(grid, spine, habitus)
    soft_field = SmoothField(rng, grid, (28.0, 28.0, 36.0), channels=1)
    fat_field = SmoothField(rng, grid, (14.0, 14.0, 18.0), channels=1)
    edge = grid.edge_mm
    x, y, _ = grid.axes((slice(0, 1), slice(0, grid.shape_zyx[1]), slice(0, grid.shape_zyx[2])))
    zc = spine.centres[:, 2]
    organs = {
        "dome_z": float(zc[INDEX_T10] + (zc[INDEX_T10 + 1] - zc[INDEX_T10]) * rng.uniform(0.0, 0.8)),
        "apex_f": 6.0 + rng.uniform(-0.5, 0.5),
        "liver_x": -rng.uniform(0.3, 0.4),
    }
    table_y = float(np.max(p["cy"] + p["half_d"])) + 2.0
    zw = grid.world_z()
    for z0 in range(0, grid.shape_zyx[0], block):
        z1 = min(z0 + block, grid.shape_zyx[0])
        blk = _Block(x, y, zw[z0:z1, None, None].astype(np.float32), p["f"][z0:z1, None, None],
                     {k: v[z0:z1] for k, v in p.items()})
        out = np.full((z1 - z0, *grid.shape_zyx[1:]), AIR, dtype=np.float32)
        cx, cy, hw, hd = blk.col("cx"), blk.col("cy"), blk.col("half_w"), blk.col("half_d")
        win = blk.window(cx - hw, cx + hw, cy - hd, cy + hd)
        tex = np.zeros_like(out)
        if win is not None:
            xw, yw = blk.axes(win)
            tex[:, win[0], win[1]] = soft_field.block(z0, z1, 0, win)
            body = _cov(_ellipse_sd(xw, yw, cx, cy, hw, hd), edge)
            fat = blk.col("fat")
            inner = _cov(_ellipse_sd(xw, yw, cx, cy, hw - fat, hd - fat), edge)
            soft = SOFT + 12.0 * tex[:, win[0], win[1]]
            abdomen = np.clip((blk.f - 17.0) / 2.0, 0, 1) * (blk.f < 29)
            if abdomen.any():
                fatty = np.clip((fat_field.block(z0, z1, 0, win) - 0.6) * 3.0, 0, 1) * abdomen
                soft += fatty * (FAT - soft)
            out[:, win[0], win[1]] = AIR + body * (FAT - AIR + inner * (soft - FAT))
            _organs(out, blk, tex, edge, **organs)
        _table(out, blk, table_y, edge)
        vol[z0:z1] = out


def _table(out: np.ndarray, blk: _Block, table_y: float, edge: float) -> None:
    """The scanner table: a 8 mm plate (~250 HU) under the patient's back, 460 mm wide."""
    cx = float(np.mean(blk.p["cx"]))
    win = blk.window(cx - 230, cx + 230, table_y + 2.0, table_y + 10.0)
    if win is None:
        return
    xw, yw = blk.axes(win)
    cov = _cov(np.abs(yw - np.float32(table_y + 6.0)) - 4.0, edge) * np.ones_like(xw)
    _paint2d(out, win, cov * (out[:, win[0], win[1]] < -500), 250.0)


def _organs(out, blk: _Block, tex, edge, dome_z, apex_f, liver_x) -> None:
    """Lungs, trachea, liver and kidneys into the block ``out`` (in place), each in its window."""
    f = blk.f
    fmin, fmax = float(f.min()), float(f.max())
    col = blk.col
    if fmax > apex_f and fmin < 19.5:
        a, b = col("rib_a"), col("rib_b")
        win = blk.window(col("rib_cx") - a, col("rib_cx") + a, col("rib_cy") - b, col("rib_cy") + b)
        if win is not None:
            xw, yw = blk.axes(win)
            lung = _cov(_lung_sd(blk, xw, yw, dome_z, apex_f), edge)
            _paint2d(out, win, lung, LUNG + 35.0 * tex[:, win[0], win[1]])
    if fmax > 2.5 and fmin < 11.0:
        tr_x = col("spine_x")
        tr_y = col("spine_y") - col("body_b") - 14.0 - 4.0 * np.clip(f - 6, 0, 4)
        win = blk.window(tr_x - 10, tr_x + 10, tr_y - 10, tr_y + 10)
        if win is not None:
            xw, yw = blk.axes(win)
            on = ((f > 2.5) & (f < 11.0)).astype(np.float32)
            trachea = _cov(np.sqrt((xw - tr_x) ** 2 + (yw - tr_y) ** 2) - 8.5, edge) * on
            _paint2d(out, win, trachea, AIR)
    if fmax > 15.5 and fmin < 21.0:
        prof = np.sqrt(np.clip(1 - ((f - 18.0) / 2.8) ** 2, 0, 1))
        a = col("rib_a") * 0.55 * prof + 1
        b = col("rib_b") * 0.9 * prof + 1
        lx, ly = col("rib_cx") + liver_x * col("rib_a") * 1.3, col("rib_cy") - 5.0
        win = blk.window(lx - a, lx + a, ly - b, ly + b)
        if win is not None:
            xw, yw = blk.axes(win)
            liver = _cov(np.maximum(_ellipse_sd(xw, yw, lx, ly, a, b), dome_z + 20.0 - blk.z), edge)
            liver *= out[:, win[0], win[1]] > -500  # not over the lung
            _paint2d(out, win, liver, 62.0 + 8.0 * tex[:, win[0], win[1]])
    if fmax > 17.0 and fmin < 22.5:
        prof = np.sqrt(np.clip(1 - ((f - 19.8) / 2.2) ** 2, 0, 1))
        for side in (-1.0, 1.0):
            kx = col("spine_x") + side * (col("body_a") + 42.0)
            ky = col("spine_y") + 12.0
            win = blk.window(kx - 34, kx + 34, ky - 30, ky + 30)
            if win is None:
                continue
            xw, yw = blk.axes(win)
            k_sd = _ellipse_sd(xw, yw, kx, ky, 24.0 * prof + 0.5, 20.0 * prof + 0.5)
            present = (prof > 0).astype(np.float32)
            _paint2d(out, win, _cov(k_sd - 8.0, edge) * present, FAT)
            _paint2d(out, win, _cov(k_sd, edge) * present, 35.0 + 5.0 * tex[:, win[0], win[1]])
