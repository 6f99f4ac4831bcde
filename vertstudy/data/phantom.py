"""The spine phantom generator: synthetic spine CTs with exactly known centroids.

Each case is a CT volume (int16 HU) of a spine whose centreline is a real spine shape from the
shipped table (:mod:`vertstudy.data.shapes`), completed to C1..S2, with vertebral bodies
(cortical shell, cancellous core), discs, posterior elements, ribs, sternum, sacrum, iliac
wings, skull base and mandible, soft tissue, fat, lungs and organs. The paper's difficulties
are controlled conditions drawn with the probabilities of :class:`PhantomConfig` and recorded
as tags: ``fov`` (full/long/short field of view, with ``first_level``/``last_level``),
``metal`` (pedicle screws and rods with streaks), ``curvature`` (normal/scoliosis/kyphosis),
``noise`` (low/high) and the voxel ``spacing`` ("x x y x z" mm).

Nothing about the label is fixed in the volume: the body sits at a random in-plane offset,
slightly tilted, with random size and build; the field of view starts and ends at random
heights between vertebrae; the origin is scanner-like and the direction occasionally flipped.

Determinism: a case depends only on ``(index, seed, config)``. Its random streams are children
of ``np.random.SeedSequence([seed, index])``, one per part (conditions, shape, curvature, pose,
field of view, tissue, bones, metal, noise), so forcing one condition on or off leaves every
other part of the same case unchanged.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field

from vertstudy.anatomy import INDEX, NAMES, NUM_CLASSES
from vertstudy.data import phantom_anatomy as pa
from vertstudy.data.case import Case, Landmark
from vertstudy.data.phantom_artifacts import add_metal_streaks, add_noise
from vertstudy.data.phantom_draw import Grid, Material, paint
from vertstudy.data.phantom_tissue import Habitus, render_tissue
from vertstudy.data.shapes import SpineShapes, load_shapes, sample_centreline
from vertstudy.errors import ConfigError
from vertstudy.progress import progress_counter

GENERATOR_VERSION = "1"
HU_RANGE = (-1024.0, 3071.0)  # a 12-bit CT's range; metal saturates near the top
# In-plane margins (x, y) mm kept around the visible centroids: right/anterior and left/posterior.
_MARGIN_LO = np.array([45.0, 35.0])
_MARGIN_HI = np.array([45.0, 65.0])


class PhantomConfig(BaseModel):
    """Probabilities and geometry of the generated cases (every field a study may tune).

    Probabilities are per case; 0 or 1 forces a condition off or on. Conditional ones are drawn
    in order: full view, else short view with ``p_fov_short``, else long; scoliosis, else
    kyphosis with ``p_kyphosis``, else normal curvature.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: Literal["coarse", "clinical"] = Field("coarse", description="voxel spacing preset")
    p_fov_full: float = Field(0.2, ge=0, le=1, description="P(C1..S2 all in view)")
    p_fov_short: float = Field(0.25, ge=0, le=1, description="P(only 2-4 levels in view | not full); else a long view")
    p_metal: float = Field(0.2, ge=0, le=1, description="P(pedicle screws and rods)")
    p_scoliosis: float = Field(0.15, ge=0, le=1, description="P(lateral curve, 10-50 mm)")
    p_kyphosis: float = Field(0.1, ge=0, le=1, description="P(abnormal thoracic kyphosis | no scoliosis)")
    p_noise_high: float = Field(0.3, ge=0, le=1, description="P(high noise)")
    p_flipped: float = Field(0.2, ge=0, le=1, description="P(direction diag(-1,-1,1), as a RAS-stored NIfTI)")
    max_slices: int = Field(320, ge=16, description="slices are thickened so a long view stays below this")
    shape_zyx: tuple[int, int, int] | None = Field(None, description="force the volume size (z, y, x) voxels")
    spacing_xyz_mm: tuple[float, float, float] | None = Field(None, description="force the spacing (x, y, z) mm")

    @classmethod
    def preset(cls, resolution: str, **overrides) -> PhantomConfig:
        """The default probabilities at resolution ``coarse`` or ``clinical``."""
        return cls(resolution=resolution, **overrides)

    @classmethod
    def fixed_grid(
        cls, size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float], **overrides
    ) -> PhantomConfig:
        """Every case on one grid: ``size_xyz`` voxels (x, y, z) at ``spacing_xyz`` mm (benchmarks)."""
        size = tuple(int(n) for n in size_xyz)
        return cls(shape_zyx=size[::-1], spacing_xyz_mm=tuple(float(s) for s in spacing_xyz), **overrides)

    def model_post_init(self, _context) -> None:
        if (self.shape_zyx is None) != (self.spacing_xyz_mm is None):
            raise ConfigError("phantom: shape_zyx and spacing_xyz_mm must be given together (or neither)")


@dataclass(frozen=True)
class Plan:
    """The conditions drawn for one case."""

    fov: str
    curvature: str
    metal: bool
    noise: str
    flipped: bool


def _draw_plan(rng: np.random.Generator, cfg: PhantomConfig) -> Plan:
    u = rng.uniform(size=7)
    fov = "full" if u[0] < cfg.p_fov_full else "short" if u[1] < cfg.p_fov_short else "long"
    curvature = "scoliosis" if u[2] < cfg.p_scoliosis else "kyphosis" if u[3] < cfg.p_kyphosis else "normal"
    return Plan(
        fov=fov,
        curvature=curvature,
        metal=bool(u[4] < cfg.p_metal),
        noise="high" if u[5] < cfg.p_noise_high else "low",
        flipped=bool(u[6] < cfg.p_flipped),
    )


# --- spine geometry ---------------------------------------------------------------------------


def _bump(n: int, centre: float, half_width: float) -> np.ndarray:
    """(n,) smooth bump over level indices: cos^2 profile, 1 at ``centre``, 0 beyond ``half_width``."""
    t = np.clip((np.arange(n) - centre) / half_width, -1, 1)
    return np.cos(t * np.pi / 2) ** 2


def _curvature(rng: np.random.Generator, kind: str, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Apply the curvature condition to centroids (26, 3) mm.

    Returns (displacement (26, 3) mm, axial rotation (26,) deg, amplitude mm). Scoliosis: a
    lateral C or S curve of 10-50 mm over the thoracolumbar spine with vertebral rotation;
    kyphosis: a posterior bump of 15-40 mm over the thoracic spine.
    """
    disp = np.zeros_like(pts)
    rot = np.zeros(len(pts))
    if kind == "scoliosis":
        amp = rng.uniform(10, 50)
        centre = rng.uniform(INDEX["T5"], INDEX["L2"])
        half = rng.uniform(5, 8)
        lateral = amp * _bump(len(pts), centre, half) * rng.choice([-1, 1])
        if rng.uniform() < 0.4:  # S curve: a smaller counter-curve below or above
            other = centre + rng.choice([-1, 1]) * half * 1.2
            lateral -= np.sign(lateral[int(round(centre))]) * 0.6 * amp * _bump(len(pts), other, half * 0.8)
        disp[:, 0] = lateral
        rot = 0.4 * lateral
        return disp, rot, amp
    if kind == "kyphosis":
        amp = rng.uniform(15, 40)
        disp[:, 1] = amp * _bump(len(pts), rng.uniform(INDEX["T6"], INDEX["T10"]), rng.uniform(5, 7))
        return disp, rot, amp
    return disp, rot, 0.0


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A slight random tilt: pitch +-6 deg, roll +-4 deg, yaw +-4 deg."""
    ax, ay, az = np.deg2rad([rng.uniform(-6, 6), rng.uniform(-4, 4), rng.uniform(-4, 4)])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Geometry:
    """Spine-relative geometry before placement in the scanner."""

    centres: np.ndarray
    outline: np.ndarray
    axial_deg: np.ndarray
    posterior: np.ndarray
    scale: float
    spine_id: int
    curve_mm: float


def _sample_geometry(streams: dict[str, np.random.Generator], shapes: SpineShapes, plan: Plan) -> _Geometry:
    pts, spine_id, scale = sample_centreline(streams["shape"], shapes)
    disp, axial, amp = _curvature(streams["curvature"], plan.curvature, pts)
    rot = _rotation(streams["pose"])
    outline = pts.copy()
    outline[:, 1] += disp[:, 1]  # the back follows a kyphosis, the outline ignores a lateral curve
    centres = (pts + disp) @ rot.T
    outline = outline @ rot.T
    return _Geometry(centres, outline, axial, rot @ np.array([0.0, 1.0, 0.0]), scale, spine_id, amp)


# --- field of view and grid -------------------------------------------------------------------


def _spacing(rng: np.random.Generator, cfg: PhantomConfig) -> tuple[tuple[float, float, float], tuple[int, int]]:
    """In-plane and slice spacing (x, y, z) mm, rounded to 0.01, and the in-plane matrix (ny, nx)."""
    if cfg.resolution == "clinical":
        sxy, sz = rng.uniform(0.6, 1.0), rng.uniform(1.0, 3.0)
        n = 512
    else:
        sxy, sz = rng.uniform(1.5, 2.5), rng.uniform(2.0, 4.0)
        n = int(round(rng.uniform(220, 300) / sxy))
    sxy, sz = round(float(sxy), 2), round(float(sz), 2)
    return (sxy, sxy, sz), (n, n)


def _z_window(rng: np.random.Generator, fov: str, z: np.ndarray) -> tuple[float, float]:
    """(bottom, top) heights (mm) of the view: a run of levels with random margins that end
    between the first level out and the last level in (so the run is exactly what is labelled)."""
    if fov == "full":
        i0, i1 = 0, NUM_CLASSES - 1
    else:
        length = int(rng.integers(2, 5)) if fov == "short" else int(rng.integers(5, NUM_CLASSES))
        i0 = int(rng.integers(0, NUM_CLASSES - length + 1))
        i1 = i0 + length - 1
    top = z[i0] + (rng.uniform(15, 90) if i0 == 0 else rng.uniform(0.15, 0.85) * (z[i0 - 1] - z[i0]))
    bottom = z[i1] - (rng.uniform(15, 100) if i1 == NUM_CLASSES - 1 else rng.uniform(0.15, 0.85) * (z[i1] - z[i1 + 1]))
    return bottom, top


def _make_grid(rng: np.random.Generator, cfg: PhantomConfig, plan: Plan, geo: _Geometry) -> tuple[Grid, np.ndarray]:
    """The voxel grid and the translation (3,) mm from spine-relative to scanner coordinates."""
    z = geo.centres[:, 2]
    if cfg.shape_zyx is not None:
        shape = cfg.shape_zyx
        spacing = tuple(float(s) for s in cfg.spacing_xyz_mm)
        extent = (shape[0] - 1) * spacing[2]
        lo, hi = z[-1] - 60 + extent, z[0] + 80
        top = rng.uniform(min(lo, hi), max(lo, hi))
        bottom = top - extent
    else:
        spacing, (ny, nx) = _spacing(rng, cfg)
        bottom, top = _z_window(rng, plan.fov, z)
        sz = spacing[2]
        if (top - bottom) / sz + 1 > cfg.max_slices:
            sz = float(np.ceil((top - bottom) / (cfg.max_slices - 1) * 100) / 100)
            spacing = (spacing[0], spacing[1], sz)
        nz = int(np.floor((top - bottom) / sz)) + 1
        shape = (nz, ny, nx)
    # In plane: centre the view a little in front of the spine at a random offset, keeping the
    # visible spine (bodies and processes: margins below) inside; a coarse matrix grows if needed.
    inview = (z >= bottom) & (z <= top)
    xy = geo.centres[inview, :2] if inview.any() else geo.centres[:, :2]
    lo, hi = xy.min(axis=0) - _MARGIN_LO, xy.max(axis=0) + _MARGIN_HI
    spacing_xy = np.array(spacing[:2])
    if cfg.shape_zyx is None:
        need = int(np.ceil(((hi - lo) / spacing_xy).max())) + 1
        if need > shape[1]:
            shape = (shape[0], need, need)
    half = (np.array([shape[2], shape[1]]) - 1) * spacing_xy / 2
    preferred = xy.mean(axis=0) + np.array([rng.uniform(-25, 25), -rng.uniform(10, 70)])
    c_lo, c_hi = hi - half, lo + half
    centre = np.where(c_lo <= c_hi, np.clip(preferred, c_lo, c_hi), (lo + hi) / 2)
    cx, cy = centre
    half_x, half_y = half
    scanner_centre = np.array([rng.uniform(-20, 20), rng.uniform(-40, 20)])
    z_bottom = rng.uniform(-1500.0, -100.0)
    shift = np.array([scanner_centre[0] - cx, scanner_centre[1] - cy, z_bottom - bottom])
    origin = (scanner_centre[0] - half_x, scanner_centre[1] - half_y, z_bottom)
    return Grid(tuple(int(s) for s in shape), spacing, tuple(float(o) for o in origin)), shift


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Materials:
    bone: Material
    rib: Material
    disc: Material
    canal: Material
    metal: Material
    skull: Material


def _materials(rng: np.random.Generator) -> _Materials:
    cortical, cancellous = rng.uniform(750, 950), rng.uniform(160, 280)
    return _Materials(
        bone=Material(cortical, cancellous, 1.6),
        rib=Material(cortical * 0.9, cancellous * 0.9, 1.2),
        disc=Material(105.0, 78.0, 3.0),
        canal=Material(22.0, 18.0, 0.0),
        metal=Material(3000.0, 3000.0, 0.0),
        skull=Material(cortical * 1.15, cancellous * 1.6, 2.0),
    )


def _build_spine(geo: _Geometry, shift: np.ndarray, rng: np.random.Generator, chest: float) -> pa.Spine:
    centres = geo.centres + shift
    frames = pa.spine_frames(centres, geo.posterior, geo.axial_deg + rng.normal(0, 1.5, NUM_CLASSES))
    d = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    steps = np.concatenate([[d[0]], 0.5 * (d[:-1] + d[1:]), [d[-1]]])
    return pa.Spine(centres, frames, geo.outline + shift, pa.level_dims(geo.scale, steps), geo.scale, chest)


def _render_bones(vol: np.ndarray, grid: Grid, spine: pa.Spine, mats: _Materials, rng: np.random.Generator) -> None:
    """Face soft tissue, skull, mandible, discs, vertebrae, sacrum, ilia, ribs, sternum and canal, in
    that order."""
    paint(vol, grid, pa.face_shapes(spine), Material(-90.0, 40.0, 6.0))
    paint(vol, grid, pa.skull_shapes(spine), mats.skull)
    paint(vol, grid, pa.mandible_shapes(spine), mats.rib)
    for i in range(1, INDEX["L5"] + 1):
        paint(vol, grid, pa.disc_shapes(spine, i), mats.disc)

    def level_bone(i: int) -> Material:
        jitter = rng.normal(0, 15)
        return Material(mats.bone.shell_hu + jitter, mats.bone.core_hu + jitter, mats.bone.shell_mm)

    paint(vol, grid, pa.atlas_shapes(spine), level_bone(0))
    paint(vol, grid, pa.axis_shapes(spine), level_bone(1))
    for i in range(2, INDEX["L5"] + 1):
        paint(vol, grid, pa.vertebra_shapes(spine, i), level_bone(i))
    paint(vol, grid, pa.sacrum_shapes(spine), level_bone(INDEX["S1"]))
    for side in (-1.0, 1.0):
        paint(vol, grid, pa.ilium_shapes(spine, side), mats.rib)
        for i in range(pa.T1, pa.T12 + 1):
            paint(vol, grid, pa.rib_shapes(spine, i, side), mats.rib)
    paint(vol, grid, pa.sternum_shapes(spine), mats.rib)
    paint(vol, grid, pa.canal_shapes(spine), mats.canal)


def _metal_levels(rng: np.random.Generator, inside: np.ndarray) -> list[int]:
    """2-4 consecutive levels for screws, among the visible ones (preferring T4..S1)."""
    visible = np.flatnonzero(inside)
    preferred = visible[(visible >= INDEX["T4"]) & (visible <= INDEX["S1"])]
    pool = preferred if len(preferred) else visible
    n = int(min(len(pool), rng.integers(2, 5)))
    start = int(rng.integers(0, len(pool) - n + 1))
    return [int(i) for i in pool[start:start + n]]


def _inside(grid: Grid, points: np.ndarray) -> np.ndarray:
    """(N,) bool: continuous index of each LPS point (N, 3) within [0, n - 1] on every axis."""
    idx = (points - np.array(grid.origin_xyz)) / np.array(grid.spacing_xyz)
    size = np.array(grid.shape_zyx[::-1]) - 1
    return ((idx >= -1e-6) & (idx <= size + 1e-6)).all(axis=1)


def _to_image(vol: np.ndarray, grid: Grid, flipped: bool) -> sitk.Image:
    """int16 SimpleITK image; ``flipped`` stores x and y reversed with direction diag(-1, -1, 1)."""
    out = np.empty(vol.shape, dtype=np.int16)
    for k in range(vol.shape[0]):
        np.rint(np.clip(vol[k], *HU_RANGE), out=vol[k])
        out[k] = vol[k]
    origin = np.array(grid.origin_xyz, dtype=np.float64)
    if flipped:
        out = out[:, ::-1, ::-1]
        origin[0] += (grid.shape_zyx[2] - 1) * grid.spacing_xyz[0]
        origin[1] += (grid.shape_zyx[1] - 1) * grid.spacing_xyz[1]
    image = sitk.GetImageFromArray(np.ascontiguousarray(out))
    image.SetSpacing(tuple(float(s) for s in grid.spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0) if flipped else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return image


_STREAMS = ("plan", "shape", "curvature", "pose", "fov", "tissue", "bones", "metal", "noise")


def _streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """One independent random generator per part of a case, all from SeedSequence([seed, index])."""
    children = np.random.SeedSequence([seed, index]).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def case_id(seed: int, index: int) -> str:
    return f"phantom-{seed:04d}-{index:05d}"


def generate_case(
    index: int, seed: int, config: PhantomConfig | None = None, shapes: SpineShapes | None = None
) -> Case:
    """Generate one phantom case (in memory): ``fmt="phantom"``, no sources, condition tags.

    Args:
        index: case number within the data set (>= 0).
        seed: data-set seed; the case depends only on (index, seed, config).
        config: probabilities and geometry (default :class:`PhantomConfig`).
        shapes: the shape table (default: the shipped one, loaded here).
    """
    if index < 0 or seed < 0:
        raise ConfigError(f"phantom: index and seed must be >= 0, got index={index}, seed={seed}")
    cfg = config or PhantomConfig()
    shapes = shapes or load_shapes()
    rng = _streams(seed, index)
    plan = _draw_plan(rng["plan"], cfg)
    geo = _sample_geometry(rng, shapes, plan)
    grid, shift = _make_grid(rng["fov"], cfg, plan, geo)
    pose = rng["pose"]
    habitus = Habitus(girth=pose.uniform(0.85, 1.15), fat=pose.uniform(0.5, 2.0), offset_x=pose.normal(0, 4))
    spine = _build_spine(geo, shift, pose, chest=habitus.girth)
    inside = _inside(grid, spine.centres)

    vol = np.empty(grid.shape_zyx, dtype=np.float32)
    render_tissue(vol, grid, spine, habitus, rng["tissue"])
    mats = _materials(rng["bones"])
    _render_bones(vol, grid, spine, mats, rng["bones"])
    levels: list[int] = []
    if plan.metal and inside.any():
        levels = _metal_levels(rng["metal"], inside)
        united = paint(vol, grid, pa.screw_shapes(spine, levels), mats.metal)
        if united is not None:
            midline = float(spine.centres[levels, 0].mean())
            strength = rng["metal"].uniform(300, 600)
            add_metal_streaks(vol, grid, united[0], united[1], midline, rng["metal"], strength)
    sigma = rng["noise"].uniform(35, 60) if plan.noise == "high" else rng["noise"].uniform(8, 18)
    add_noise(vol, rng["noise"], sigma)
    image = _to_image(vol, grid, plan.flipped)

    landmarks = [Landmark(i, tuple(float(v) for v in spine.centres[i])) for i in np.flatnonzero(inside)]
    names = [NAMES[lm.index] for lm in landmarks]
    n = len(landmarks)
    tags = {
        "generator": f"vertstudy-phantom-{GENERATOR_VERSION}",
        "fov": "full" if n == NUM_CLASSES else "short" if n <= 4 else "long",
        "first_level": names[0] if names else "none",
        "last_level": names[-1] if names else "none",
        "metal": "yes" if levels else "no",
        "metal_levels": ",".join(NAMES[i] for i in levels),
        "curvature": plan.curvature,
        "curve_mm": f"{geo.curve_mm:.1f}",
        "noise": plan.noise,
        "noise_hu": f"{sigma:.1f}",
        "spacing": "x".join(f"{s:.2f}" for s in grid.spacing_xyz),
        "resolution": "custom" if cfg.shape_zyx is not None else cfg.resolution,
        "direction": "flipped" if plan.flipped else "identity",
        "size_scale": f"{geo.scale:.3f}",
        "girth": f"{habitus.girth:.3f}",
        "spine_shape": str(geo.spine_id),
    }
    return Case(case_id=case_id(seed, index), image=image, landmarks=landmarks, sources=[], fmt="phantom", tags=tags)


# --- writing data sets ------------------------------------------------------------------------


def _writer(fmt: str):
    if fmt == "csi2014":
        from vertstudy.data.formats.csi2014 import write_case
    elif fmt == "verse":
        from vertstudy.data.formats.verse import write_case
    else:
        raise ConfigError(f"phantom: fmt={fmt!r} is not a phantom output format; accepted: csi2014, verse")
    return write_case


def _generate_and_write(
    index: int, seed: int, config: PhantomConfig, fmt: str, out: Path
) -> tuple[int, list[Path], float]:
    t0 = time.perf_counter()
    case = generate_case(index, seed, config)
    paths = _writer(fmt)(case, out)
    return index, paths, time.perf_counter() - t0


def write_phantoms(
    out: Path,
    cases: int,
    seed: int,
    fmt: str = "csi2014",
    config: PhantomConfig | None = None,
    workers: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Generate ``cases`` phantoms (indices 0..cases-1) and write them into ``out`` in ``fmt``.

    Cases are generated in ``workers`` processes (1: in this process) and written atomically by
    the format's writer (image, landmark file, tags). Returns all written paths, in case order.
    """
    if cases < 0 or workers < 1:
        raise ConfigError(f"phantom: cases must be >= 0 and workers >= 1, got cases={cases}, workers={workers}")
    _writer(fmt)
    config = config or PhantomConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[Path]] = {}
    with progress_counter(progress, cases, f"phantoms -> {out}") as advance:
        if workers == 1:
            for i in range(cases):
                results[i] = _generate_and_write(i, seed, config, fmt, out)[1]
                advance()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, max(cases, 1))) as pool:
                futures = [pool.submit(_generate_and_write, i, seed, config, fmt, out) for i in range(cases)]
                for fut in as_completed(futures):
                    i, paths, _ = fut.result()
                    results[i] = paths
                    advance()
    return [p for i in range(cases) for p in results[i]]
