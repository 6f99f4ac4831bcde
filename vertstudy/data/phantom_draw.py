"""Drawing primitives of the spine phantom: a voxel grid, signed distance shapes, painting.

Everything works in the physical frame of an identity-direction grid: voxel ``(k, j, i)`` of an
array of shape ``(nz, ny, nx)`` has its centre at LPS mm ``origin + (i*sx, j*sy, k*sz)``.
Shapes are signed distance functions (SDF, mm, negative inside) of broadcast coordinate axes
``x (1, 1, nx)``, ``y (1, ny, 1)``, ``z (nz, 1, 1)``; each is evaluated only inside its own
bounding box. An object is the union (min) of its shapes, painted once with a material so that
overlapping parts share one cortical shell. Edges are soft over ``edge`` mm (about one voxel),
which gives partial-volume values at boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[slice, slice, slice]  # (z, y, x) voxel slices


@dataclass(frozen=True)
class Grid:
    """An identity-direction voxel grid: shape (nz, ny, nx), spacing and origin (x, y, z) mm."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]

    @property
    def edge_mm(self) -> float:
        """Width of soft edges: the mean voxel size (mm)."""
        return float(np.mean(self.spacing_xyz))

    def box(self, lo_xyz, hi_xyz) -> Box | None:
        """Voxel slices (z, y, x) covering the LPS mm box [lo, hi], or None if outside the grid."""
        lo = np.floor((np.asarray(lo_xyz) - self.origin_xyz) / self.spacing_xyz).astype(int)
        hi = np.ceil((np.asarray(hi_xyz) - self.origin_xyz) / self.spacing_xyz).astype(int) + 1
        size = np.array(self.shape_zyx[::-1])
        lo = np.clip(lo, 0, size)
        hi = np.clip(hi, 0, size)
        if (hi <= lo).any():
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def axes(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcast LPS mm coordinates of a box: x (1,1,nx), y (1,ny,1), z (nz,1,1), float32."""
        out = []
        for axis, sl in zip(range(3), (box[2], box[1], box[0])):
            c = self.origin_xyz[axis] + self.spacing_xyz[axis] * np.arange(sl.start, sl.stop, dtype=np.float64)
            shape = [1, 1, 1]
            shape[2 - axis] = -1
            out.append(c.astype(np.float32).reshape(shape))
        return out[0], out[1], out[2]

    def world_z(self) -> np.ndarray:
        """(nz,) LPS z mm of the slice centres."""
        return self.origin_xyz[2] + self.spacing_xyz[2] * np.arange(self.shape_zyx[0])


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` expressed in the index space of ``outer`` (inner must lie inside outer)."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def local(x, y, z, centre, frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates (u, v, w) mm along the rows of ``frame`` (3, 3), relative to ``centre`` (x, y, z)."""
    dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
    f = np.asarray(frame, dtype=np.float32)
    return tuple(f[r, 0] * dx + f[r, 1] * dy + f[r, 2] * dz for r in range(3))


# --- shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capsule:
    """A segment p0-p1 (LPS mm) swept by a sphere whose radius goes linearly r0 -> r1 (mm)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float

    def bounds(self):
        p = np.array([self.p0, self.p1])
        r = max(self.r0, self.r1) + 2.0
        return p.min(axis=0) - r, p.max(axis=0) + r

    def sdf(self, x, y, z):
        a = np.asarray(self.p0, dtype=np.float32)
        ba = np.asarray(self.p1, dtype=np.float32) - a
        px, py, pz = x - a[0], y - a[1], z - a[2]
        denom = max(float(ba @ ba), 1e-6)
        h = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / np.float32(denom), 0.0, 1.0)
        d = np.sqrt((px - ba[0] * h) ** 2 + (py - ba[1] * h) ** 2 + (pz - ba[2] * h) ** 2)
        return d - (np.float32(self.r0) + np.float32(self.r1 - self.r0) * h)


@dataclass(frozen=True)
class Cylinder:
    """A rounded elliptic cylinder (vertebral body, disc) in a local frame.

    ``frame`` rows: lateral (u), posterior (v), axial/superior (w) unit vectors. Half axes
    ``a`` (u), ``b`` (v), half height ``h`` (w), edge rounding ``rounding`` (mm) and ``waist``:
    relative narrowing of the cross-section at mid-height (negative bulges, as a disc).
    """

    centre: tuple[float, float, float]
    frame: np.ndarray
    a: float
    b: float
    h: float
    rounding: float = 2.0
    waist: float = 0.0

    def bounds(self):
        r = np.sqrt(max(self.a, self.b) ** 2 * (1 + max(-self.waist, 0)) ** 2 + self.h**2) + 2.0
        c = np.asarray(self.centre)
        return c - r, c + r

    def sdf(self, x, y, z):
        u, v, w = local(x, y, z, self.centre, self.frame)
        t = np.clip(w / np.float32(self.h), -1.0, 1.0)
        narrow = 1.0 - np.float32(self.waist) * (1.0 - t * t)
        a, b = np.float32(self.a) * narrow, np.float32(self.b) * narrow
        radial = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * np.minimum(a, b)
        r = np.float32(self.rounding)
        q0 = radial + r
        q1 = np.abs(w) - np.float32(self.h) + r
        outside = np.sqrt(np.maximum(q0, 0) ** 2 + np.maximum(q1, 0) ** 2)
        return np.minimum(np.maximum(q0, q1), 0) + outside - r


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid: centre (x, y, z) mm, ``frame`` rows are its axes, ``radii`` (mm) along them."""

    centre: tuple[float, float, float]
    frame: np.ndarray
    radii: tuple[float, float, float]

    def bounds(self):
        r = max(self.radii) + 2.0
        c = np.asarray(self.centre)
        return c - r, c + r

    def sdf(self, x, y, z):
        u, v, w = local(x, y, z, self.centre, self.frame)
        ra, rb, rc = (np.float32(r) for r in self.radii)
        k0 = np.sqrt((u / ra) ** 2 + (v / rb) ** 2 + (w / rc) ** 2)
        k1 = np.sqrt((u / ra**2) ** 2 + (v / rb**2) ** 2 + (w / rc**2) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


@dataclass(frozen=True)
class Shell:
    """A hollow version of ``shape``: the band |sdf| < thickness/2, minus an optional ``hole``."""

    shape: object
    thickness: float
    hole: object | None = None

    def bounds(self):
        return self.shape.bounds()

    def sdf(self, x, y, z):
        d = np.abs(self.shape.sdf(x, y, z)) - np.float32(self.thickness / 2)
        if self.hole is not None:
            d = np.maximum(d, -self.hole.sdf(x, y, z))
        return d


# --- painting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """HU of an object's outer ``shell`` (mm thick) and of its ``core``."""

    shell_hu: float
    core_hu: float
    shell_mm: float = 0.0


def union_sdf(grid: Grid, shapes) -> tuple[Box, np.ndarray] | None:
    """Union (min) of the shapes' SDFs over their joint bounding box, each evaluated in its own box.

    Returns (box, sdf float32 of the box's shape), or None when nothing lies in the grid.
    """
    boxes = []
    for shape in shapes:
        lo, hi = shape.bounds()
        box = grid.box(lo, hi)
        if box is not None:
            boxes.append((shape, box))
    if not boxes:
        return None
    outer = tuple(
        slice(min(b[1][a].start for b in boxes), max(b[1][a].stop for b in boxes)) for a in range(3)
    )
    acc = np.full(tuple(s.stop - s.start for s in outer), np.inf, dtype=np.float32)
    for shape, box in boxes:
        x, y, z = grid.axes(box)
        view = acc[relative(box, outer)]
        np.minimum(view, shape.sdf(x, y, z), out=view)
    return outer, acc


def coverage(sdf: np.ndarray, edge: float) -> np.ndarray:
    """Fraction (0..1) of a voxel inside the surface, linear over ``edge`` mm across it."""
    return np.clip(0.5 - sdf / np.float32(edge), 0.0, 1.0)


def paint(vol: np.ndarray, grid: Grid, shapes, material: Material) -> tuple[Box, np.ndarray] | None:
    """Paint the union of ``shapes`` into ``vol`` (float32, (nz, ny, nx), HU) with ``material``.

    Partial volume: a voxel's value becomes ``(1-c) old + c_shell shell + c_core core`` where
    ``c`` is the voxel's coverage by the object and ``c_core`` its coverage by the core (the
    object shrunk by the shell thickness). Returns the union (box, sdf) for later use.
    """
    united = union_sdf(grid, shapes)
    if united is None:
        return None
    box, sdf = united
    edge = grid.edge_mm
    occ = coverage(sdf, edge)
    target = vol[box]
    if material.shell_mm > 0:
        core = coverage(sdf + np.float32(material.shell_mm), edge)
        value = (occ - core) * np.float32(material.shell_hu) + core * np.float32(material.core_hu)
    else:
        value = occ * np.float32(material.core_hu)
    target *= 1.0 - occ
    target += value
    return united
