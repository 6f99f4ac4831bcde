"""Real spine shapes for the phantom: the shipped table of vertebral-body centre points.

The table ``resources/spine_shapes.csv.gz`` is derived (by :func:`build_shape_table`) from the
body centre points of 1,947 real spines of the VID vertebra identification data set
(ImFusionGmbH/VID-vertebra-identification-dataset, training split: VerSe 2019/2020, CT
Colonography, Pancreas-CT), CC BY-SA 4.0; the derived table is shared under the same license
(``resources/LICENSE-spine-shapes.txt``). It holds, per spine and level, the point relative to
that spine's own mean point, rounded to 0.1 mm: columns ``spine, source, level, x, y, z``.

Coordinates are ITK/LPS millimetres in (x, y, z) order: +x patient left, +y posterior,
+z superior. Levels are class indices of :mod:`vertstudy.anatomy`; the table covers C1..L5
(indices 0..23), never the sacrum.

:func:`sample_centreline` draws a full C1..S2 centreline (26 points): a real spine where it has
levels, extended by population step vectors (scaled to that spine and rotated to continue its
end tangents) and by literature spacings for the sacrum.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from vertstudy.anatomy import INDEX, NAMES, NUM_CLASSES

TABLE_LEVELS = 24  # C1..L5: the levels the table can hold
SHAPES_RESOURCE = "spine_shapes.csv.gz"
# Step-length limits (fraction of the population median of that step) outside which a spine
# is taken to have a missing or mislabelled level and dropped from the table.
_STEP_RATIO_LIMITS = (0.6, 1.5)


@dataclass(frozen=True)
class SpineShapes:
    """The loaded table.

    Attributes:
        points: (n_spines, 24, 3) float64 LPS (x, y, z) mm relative to each spine's mean point,
            NaN where the spine has no such level; axis 1 is the class index C1..L5.
        sources: (n_spines,) the source data set of each spine (``verse19``, ``COLONOG``...).
    """

    points: np.ndarray
    sources: tuple[str, ...]

    @property
    def n_spines(self) -> int:
        return int(self.points.shape[0])

    def present(self) -> np.ndarray:
        """(n_spines, 24) bool: which levels each spine has."""
        return ~np.isnan(self.points[..., 0])

    def level_counts(self) -> dict[str, int]:
        """Number of spines having each level, by level name (C1..L5)."""
        counts = self.present().sum(axis=0)
        return {NAMES[i]: int(counts[i]) for i in range(TABLE_LEVELS)}

    def steps(self) -> np.ndarray:
        """(n_spines, 23, 3) difference vectors level i+1 minus level i (mm), NaN if either is missing."""
        return self.points[:, 1:] - self.points[:, :-1]

    def mean_steps(self) -> np.ndarray:
        """(23, 3) population mean step vector from level i to level i+1 (LPS mm)."""
        return np.nanmean(self.steps(), axis=0)

    def mean_step_lengths(self) -> np.ndarray:
        """(23,) population mean distance between adjacent centroids (mm)."""
        return np.nanmean(np.linalg.norm(self.steps(), axis=-1), axis=0)


# --- building the table from the source CSV ---------------------------------------------------


def _read_bodies(src: Path) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, str], list[str]]:
    """Read ``bodies.csv``: per spine {level index or -1 for L6: point}, sources, names in order."""
    spines: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    sources: dict[str, str] = {}
    order: list[str] = []
    with open(src, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            sid = row["spine"]
            if sid not in sources:
                order.append(sid)
                sources[sid] = row["source"]
            level = INDEX.get(row["level"], -1)  # L6 (or anything else) -> -1
            spines[sid][level] = np.array([float(row[k]) for k in ("x_lps_mm", "y_lps_mm", "z_lps_mm")])
    return spines, sources, order


def _keep_spine(levels: dict[int, np.ndarray], median_steps: np.ndarray) -> bool:
    """Selection rule of the shipped table (see :func:`build_shape_table`)."""
    idx = sorted(levels)
    if -1 in levels or len(idx) < 2 or idx[-1] >= TABLE_LEVELS:
        return False
    if idx[-1] - idx[0] + 1 != len(idx):
        return False
    lo, hi = _STEP_RATIO_LIMITS
    for a in idx[:-1]:
        ratio = np.linalg.norm(levels[a + 1] - levels[a]) / median_steps[a]
        if not lo <= ratio <= hi:
            return False
    return True


def build_shape_table(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Derive the compact shape table from the VID ``bodies.csv`` and write it gzipped.

    Rules: spines with an L6 (transitional lumbar vertebra, 46 spines: their L1-L5 numbering is
    ambiguous) are dropped; so are spines with a gap in their run of levels, and spines with a
    step between adjacent levels shorter than 0.6x or longer than 1.5x the population median
    of that step (a missing or mislabelled level). Each kept spine is renumbered 0..n-1 (in
    source order) and its points are stored relative to its own mean point, rounded to 0.1 mm.

    Returns counts: ``{"spines_in": ..., "spines_kept": ..., "rows": ...}``.
    """
    spines, sources, order = _read_bodies(Path(src))
    diffs: dict[int, list[float]] = defaultdict(list)
    for levels in spines.values():
        for a in levels:
            if a >= 0 and a + 1 in levels:
                diffs[a].append(float(np.linalg.norm(levels[a + 1] - levels[a])))
    median_steps = np.array([np.median(diffs[a]) if diffs[a] else np.nan for a in range(TABLE_LEVELS - 1)])
    out = io.StringIO()
    out.write("spine,source,level,x,y,z\n")
    kept = rows = 0
    for sid in order:
        levels = spines[sid]
        if not _keep_spine(levels, median_steps):
            continue
        centre = np.mean(list(levels.values()), axis=0)
        for level in sorted(levels):
            x, y, z = np.round(levels[level] - centre, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
            out.write(f"{kept},{sources[sid]},{NAMES[level]},{x:.1f},{y:.1f},{z:.1f}\n")
            rows += 1
        kept += 1
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    # No file name and mtime=0 in the gzip header: the bytes are reproducible.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(out.getvalue().encode())
    tmp.replace(dst)
    return {"spines_in": len(order), "spines_kept": kept, "rows": rows}


# --- loading ----------------------------------------------------------------------------------


def load_shapes(path: str | Path | None = None) -> SpineShapes:
    """Load the shape table (default: the copy shipped inside the package)."""
    if path is None:
        data = resources.files("vertstudy.data").joinpath("resources", SHAPES_RESOURCE).read_bytes()
    else:
        data = Path(path).read_bytes()
    rows = list(csv.DictReader(io.StringIO(gzip.decompress(data).decode())))
    n = 1 + max(int(r["spine"]) for r in rows)
    points = np.full((n, TABLE_LEVELS, 3), np.nan)
    sources = [""] * n
    for r in rows:
        s = int(r["spine"])
        points[s, INDEX[r["level"]]] = (float(r["x"]), float(r["y"]), float(r["z"]))
        sources[s] = r["source"]
    return SpineShapes(points=points, sources=tuple(sources))


# --- sampling a full centreline ---------------------------------------------------------------


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) rotation taking the direction of ``a`` onto the direction of ``b`` (Rodrigues)."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-9:
        return np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c)


def _sacral_steps(rng: np.random.Generator, scale: float) -> np.ndarray:
    """(2, 3) steps L5->S1 and S1->S2 (LPS mm): down and back, the sacrum tilted posteriorly.

    L5-S1 ~35-40 mm between centroids with S1 posterior of L5; S1-S2 ~25 mm along a sacrum
    tilted ~35-45 degrees back from vertical.
    """
    l5s1 = np.array([rng.normal(0, 1.0), rng.uniform(10, 17), -rng.uniform(32, 36)])
    tilt = np.deg2rad(rng.uniform(35, 45))
    length = rng.uniform(23, 27)
    s1s2 = np.array([rng.normal(0, 1.0), length * np.sin(tilt), -length * np.cos(tilt)])
    return np.stack([l5s1, s1s2]) * scale


def sample_centreline(
    rng: np.random.Generator, shapes: SpineShapes, spine: int | None = None, jitter_mm: float = 0.8
) -> tuple[np.ndarray, int, float]:
    """Sample the 26 centroids C1..S2 of one spine (LPS mm, relative to their mean).

    A real spine is picked (``spine`` or at random); its levels are kept as they are, the
    missing levels C1..L5 are extrapolated from the population mean step vectors, scaled by
    this spine's size (median ratio of its steps to the population's) and rotated so that they
    continue the spine's own end directions, each step perturbed by ``jitter_mm`` (std, per
    axis) and 3% in length; S1 and S2 follow literature spacings.

    Returns ``(points (26, 3), spine index, size scale)``; the scale is the spine's size
    relative to the population mean (~0.8..1.25).
    """
    if spine is None:
        spine = int(rng.integers(shapes.n_spines))
    real = shapes.points[spine]
    have = np.flatnonzero(~np.isnan(real[:, 0]))
    first, last = int(have[0]), int(have[-1])
    mean = shapes.mean_steps()
    own = real[1:] - real[:-1]
    ratios = np.linalg.norm(own, axis=1) / np.linalg.norm(mean, axis=1)
    scale = float(np.clip(np.nanmedian(ratios), 0.8, 1.25))

    def step(i: int) -> np.ndarray:
        return mean[i] * scale * rng.normal(1.0, 0.03) + rng.normal(0.0, jitter_mm, 3)

    pts = np.full((NUM_CLASSES, 3), np.nan)
    pts[: TABLE_LEVELS] = real
    # Continue the spine's own direction at each end: rotate population steps onto it.
    rot_up = _rotation_between(mean[first], own[first]) if last > first else np.eye(3)
    rot_down = _rotation_between(mean[last - 1], own[last - 1]) if last > first else np.eye(3)
    for i in range(first - 1, -1, -1):
        pts[i] = pts[i + 1] - rot_up @ step(i)
    for i in range(last + 1, TABLE_LEVELS):
        pts[i] = pts[i - 1] + rot_down @ step(i - 1)
    sacral = _sacral_steps(rng, scale)
    pts[INDEX["S1"]] = pts[INDEX["L5"]] + rot_down @ sacral[0]
    pts[INDEX["S2"]] = pts[INDEX["S1"]] + rot_down @ sacral[1]
    return pts - pts.mean(axis=0), spine, scale
