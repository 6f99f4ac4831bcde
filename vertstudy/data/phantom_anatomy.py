"""Anatomy of the spine phantom: per-level dimensions and the shapes of every structure.

All positions are ITK/LPS mm (+x left, +y posterior, +z superior). Each vertebra has a local
frame (rows: lateral-left ``l``, posterior ``p``, superior ``t`` = spine tangent); level-wise
dimensions (mm, before the patient's size scale) are interpolated between anchor levels from
textbook morphometry (body width/depth, canal, pedicles, processes, ribs). Class indices as in
:mod:`vertstudy.anatomy`: C1=0 .. C7=6, T1=7 .. T12=18, L1=19 .. L5=23, S1=24, S2=25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vertstudy.anatomy import INDEX
from vertstudy.data.phantom_draw import Capsule, Cylinder, Ellipsoid, Shell

# Anchor levels of the dimension tables: C3, C7, T1, T6, T12, L1, L3, L5.
_ANCHORS = np.array([2, 6, 7, 12, 18, 19, 21, 23])
_TABLE: dict[str, tuple[float, ...]] = {
    "body_a": (8.5, 11.5, 13.0, 15.0, 21.0, 21.5, 24.0, 25.5),  # half width (lateral)
    "body_b": (7.5, 8.5, 9.5, 13.0, 16.0, 16.5, 18.0, 18.0),  # half depth (AP)
    "body_frac": (0.70, 0.72, 0.76, 0.79, 0.78, 0.76, 0.74, 0.72),  # body height / centroid spacing
    "canal_a": (12.0, 11.0, 8.5, 7.5, 9.0, 10.0, 11.5, 12.5),
    "canal_b": (7.0, 7.0, 7.5, 7.5, 8.0, 8.5, 8.5, 8.5),
    "ped_r": (2.5, 3.0, 3.5, 3.5, 4.5, 4.5, 5.5, 6.5),
    "lam_r": (2.5, 3.0, 3.5, 4.0, 4.5, 4.5, 5.0, 5.0),
    "spin_len": (16.0, 30.0, 34.0, 40.0, 30.0, 30.0, 30.0, 24.0),
    "spin_deg": (20.0, 15.0, 30.0, 60.0, 30.0, 10.0, 5.0, 5.0),  # downward from horizontal
    "spin_r": (3.0, 4.0, 4.0, 3.5, 4.5, 5.0, 5.5, 5.0),
    "tp_len": (9.0, 14.0, 26.0, 24.0, 12.0, 20.0, 32.0, 24.0),
    "tp_deg": (-25.0, -10.0, 35.0, 40.0, 30.0, 10.0, 10.0, 15.0),  # + = toward posterior
    "tp_r": (3.0, 3.5, 4.5, 4.5, 4.0, 3.5, 3.5, 6.0),
    "facet_r": (3.5, 4.0, 4.0, 4.0, 5.0, 5.0, 5.5, 6.0),
}
# Ribs of T1..T12: ellipse half axes (lateral A, AP B), arc end (deg from posterior), drop
# of the anterior end below the head (mm), tube radius.
_RIBS = {
    "A": (46, 62, 76, 88, 97, 104, 110, 112, 112, 110, 107, 103),
    "B": (30, 40, 48, 55, 60, 63, 66, 67, 68, 68, 67, 66),
    "end_deg": (145, 158, 165, 165, 165, 165, 160, 155, 150, 140, 95, 60),
    "drop": (25, 35, 45, 55, 60, 65, 65, 65, 60, 55, 35, 18),
    "r": (4.2, 3.8, 3.8, 4.0, 4.0, 4.2, 4.2, 4.2, 4.2, 4.0, 3.8, 3.4),
}
RIB_POSTERIOR_MM = 24.0  # posterior apex of the rib ellipse behind the body centroid (v)
T1, T12, L5, S1, S2 = INDEX["T1"], INDEX["T12"], INDEX["L5"], INDEX["S1"], INDEX["S2"]


@dataclass(frozen=True)
class Spine:
    """One phantom spine in LPS mm.

    Attributes:
        centres: (26, 3) body centroids C1..S2 (the ground-truth landmarks).
        frames: (26, 3, 3) per level rows ``l`` (left), ``p`` (posterior), ``t`` (superior).
        outline_centres: (26, 3) the centreline without scoliosis, which the body outline follows.
        dims: per-level dimensions, each (26,) mm, already scaled to the patient.
        scale: the size scale of the vertebrae (1 = population mean).
        chest: extra scale of the rib cage (the patient's girth).
    """

    centres: np.ndarray
    frames: np.ndarray
    outline_centres: np.ndarray
    dims: dict[str, np.ndarray]
    scale: float
    chest: float = 1.0

    def to_world(self, level: int, uvw) -> np.ndarray:
        """LPS mm of local point(s) ``uvw`` (..., 3) of vertebra ``level``."""
        return self.centres[level] + np.asarray(uvw, dtype=np.float64) @ self.frames[level]


def level_dims(scale: float, steps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-level dimensions (26,) mm: the table interpolated over levels and scaled.

    ``steps``: (26,) mean distance of each centroid to its neighbours (mm): body height is a
    level-dependent fraction of it (the rest is disc).
    """
    levels = np.arange(26)
    dims = {k: np.interp(levels, _ANCHORS, v) for k, v in _TABLE.items()}
    for k in dims:
        if not (k.endswith("_deg") or k == "body_frac"):
            dims[k] = dims[k] * scale
    dims["body_h"] = dims["body_frac"] * steps / 2.0
    # Sacrum: S1 a wide body, S2 smaller; their bodies fuse.
    dims["body_a"][S1], dims["body_b"][S1] = 24.0 * scale, 16.5 * scale
    dims["body_a"][S2], dims["body_b"][S2] = 18.0 * scale, 12.0 * scale
    return dims


def spine_frames(centres: np.ndarray, posterior: np.ndarray, axial_deg: np.ndarray) -> np.ndarray:
    """(26, 3, 3) local frames: tangent from neighbouring centroids (superior), posterior
    direction ``posterior`` (3,) made orthogonal to it and turned by ``axial_deg`` (26,) about it.

    The sacrum (S1, S2) takes the direction S2->S1 as its axis.
    """
    up = np.empty_like(centres)
    up[1:-1] = centres[:-2] - centres[2:]
    up[0] = centres[0] - centres[1]
    up[-1] = centres[-2] - centres[-1]
    up[S1] = up[S2] = centres[S1] - centres[S2]
    up /= np.linalg.norm(up, axis=1, keepdims=True)
    frames = np.empty((len(centres), 3, 3))
    for i, t in enumerate(up):
        p = posterior - (posterior @ t) * t
        p /= np.linalg.norm(p)
        ang = np.deg2rad(axial_deg[i])
        l0 = np.cross(p, t)
        p = np.cos(ang) * p - np.sin(ang) * l0  # rotate p about t
        frames[i] = (np.cross(p, t), p, t)
    return frames


# --- vertebrae ---------------------------------------------------------------------------------


def _posterior_elements(spine: Spine, i: int, d: dict[str, np.ndarray]) -> list:
    """Pedicles, laminae, articular, transverse and spinous processes of level ``i`` (capsules)."""
    b, h = d["body_b"][i], d["body_h"][i]
    ca, cb = d["canal_a"][i], d["canal_b"][i]
    ped_r, lam_r = d["ped_r"][i], d["lam_r"][i]
    w = lambda u, v, z: spine.to_world(i, (u, v, z))  # noqa: E731
    shapes = []
    spin_base = w(0.0, b + 2 * cb + lam_r * 0.8, 0.0)
    for side in (-1.0, 1.0):
        ped0 = w(side * (ca * 0.85), b * 0.55, h * 0.15)
        ped1 = w(side * (ca + ped_r * 0.6), b + cb * 0.9, h * 0.1)
        shapes.append(Capsule(tuple(ped0), tuple(ped1), ped_r, ped_r * 0.95))
        shapes.append(Capsule(tuple(ped1), tuple(spin_base), lam_r, lam_r))
        # Superior and inferior articular processes at the pedicle-lamina junction.
        up = w(side * (ca + ped_r * 0.5), b + cb * 1.2, h * 0.9 + 2)
        down = w(side * (ca + ped_r * 0.3), b + cb * 1.6, -h * 0.9 - 2)
        shapes.append(Capsule(tuple(up), tuple(down), d["facet_r"][i], d["facet_r"][i] * 0.9))
        if i != S2:
            ang = np.deg2rad(d["tp_deg"][i])
            length = d["tp_len"][i]
            tip = w(side * (ca + ped_r + length * np.cos(ang)), b + cb + length * np.sin(ang), 0.0)
            shapes.append(Capsule(tuple(ped1), tuple(tip), d["tp_r"][i], d["tp_r"][i] * 0.75))
    ang = np.deg2rad(d["spin_deg"][i])
    length = d["spin_len"][i]
    tip = spine.to_world(i, (0.0, b + 2 * cb + length * np.cos(ang), -length * np.sin(ang)))
    shapes.append(Capsule(tuple(spin_base), tuple(tip), d["spin_r"][i], d["spin_r"][i] * 0.8))
    if i >= INDEX["L1"] and i <= L5:  # lumbar spinous processes are tall plates
        for dz in (-0.45, 0.45):
            off = spine.frames[i][2] * d["spin_r"][i] * 2 * dz
            shapes.append(Capsule(tuple(spin_base + off), tuple(tip + off), d["spin_r"][i] * 0.8, d["spin_r"][i] * 0.7))
    return shapes


def vertebra_shapes(spine: Spine, i: int) -> list:
    """Shapes of vertebra ``i`` (2..23, C3..L5; C1, C2 and the sacrum have their own)."""
    d = spine.dims
    body = Cylinder(tuple(spine.centres[i]), spine.frames[i], d["body_a"][i], d["body_b"][i], d["body_h"][i],
                    rounding=min(2.5, d["body_h"][i] * 0.3), waist=0.07)
    return [body, *_posterior_elements(spine, i, d)]


def atlas_shapes(spine: Spine) -> list:
    """C1 (atlas): a ring of anterior arch, lateral masses and posterior arch, no body."""
    d, s = spine.dims, spine.scale
    w = lambda u, v, z: spine.to_world(0, (u, v, z))  # noqa: E731
    # The C1 centroid sits on the dens (C2), inside the ring behind the anterior arch.
    shapes = [Capsule(tuple(w(-9 * s, -9 * s, 0)), tuple(w(9 * s, -9 * s, 0)), 4.0 * s, 4.0 * s)]
    for side in (-1.0, 1.0):
        shapes.append(Capsule(tuple(w(side * 9 * s, -9 * s, 0)), tuple(w(side * 17 * s, 2 * s, 0)), 4.0 * s, 6 * s))
        shapes.append(Ellipsoid(tuple(w(side * 18 * s, 5 * s, 0)), spine.frames[0], (7 * s, 9 * s, 8 * s)))
        shapes.append(Capsule(tuple(w(side * 18 * s, 8 * s, 0)), tuple(w(side * 10 * s, 30 * s, -1)), 4 * s, 3.5 * s))
        shapes.append(Capsule(tuple(w(side * 10 * s, 30 * s, -1)), tuple(w(0, 34 * s, -1)), 3.5 * s, 4 * s))
        shapes.append(Capsule(tuple(w(side * 22 * s, 5 * s, 0)), tuple(w(side * 36 * s, 4 * s, 0)), 4 * s, 3 * s))
    del d
    return shapes


def axis_shapes(spine: Spine) -> list:
    """C2 (axis): body, dens rising through the atlas ring to above the C1 centroid, posterior elements."""
    d, s = spine.dims, spine.scale
    i = 1
    c, f = spine.centres[i], spine.frames[i]
    h = max(d["body_h"][i] * 0.7, 7 * s)
    body = Cylinder(tuple(c - f[2] * 2 * s), f, 9.5 * s, 8.5 * s, h, rounding=2.0, waist=0.05)
    dens_top = spine.centres[0] + spine.frames[0][2] * 7 * s
    dens = Capsule(tuple(c + f[2] * (h - 3 * s)), tuple(dens_top), 5.5 * s, 4.5 * s)
    return [body, dens, *_posterior_elements(spine, i, d)]


def disc_shapes(spine: Spine, i: int) -> list:
    """The intervertebral disc between levels ``i`` and ``i + 1`` (C2-C3 .. L5-S1)."""
    d = spine.dims
    c0, c1 = spine.centres[i], spine.centres[i + 1]
    t = c0 - c1
    length = float(np.linalg.norm(t))
    t /= length
    frame = 0.5 * (spine.frames[i] + spine.frames[i + 1])
    frame[2] = t
    frame[1] -= (frame[1] @ t) * t
    frame[1] /= np.linalg.norm(frame[1])
    frame[0] = np.cross(frame[1], t)
    a = 0.5 * (d["body_a"][i] + d["body_a"][i + 1]) * 0.96
    b = 0.5 * (d["body_b"][i] + d["body_b"][i + 1]) * 0.96
    return [Cylinder(tuple(0.5 * (c0 + c1)), frame, a, b, length * 0.42, rounding=2.0, waist=-0.04)]


def canal_shapes(spine: Spine) -> list:
    """The spinal canal (CSF and cord) as a chain of capsules behind the bodies, C1 to S2."""
    d = spine.dims
    pts, radii = [], []
    for i in range(26):
        r = min(d["canal_a"][i], d["canal_b"][i]) * (0.7 if i >= S1 else 1.0)
        pts.append(spine.to_world(i, (0.0, d["body_b"][i] + d["canal_b"][i] + 0.5, 0.0)))
        radii.append(r)
    pts[0] = spine.to_world(0, (0.0, 12.0 * spine.scale, 0.0))
    return [Capsule(tuple(pts[k]), tuple(pts[k + 1]), radii[k], radii[k + 1]) for k in range(25)]


# --- ribs, sternum, sacrum, pelvis, skull ----------------------------------------------------


def rib_path(spine: Spine, i: int, side: float, n: int = 24) -> tuple[np.ndarray, float]:
    """(n + 1, 3) LPS mm points of the rib of thoracic level ``i`` on ``side`` (+1 left), and its radius.

    Neck from the costal facet to the tubercle at the transverse process, then an arc of an
    ellipse (half axes A lateral, B AP; posterior apex ``RIB_POSTERIOR_MM`` behind the body
    centroid) running forward and down to the costal cartilage.
    """
    k = i - T1
    s = spine.scale
    A, B = _RIBS["A"][k] * s * spine.chest, _RIBS["B"][k] * s * spine.chest
    d = spine.dims
    th0 = np.arcsin(min(0.9, (d["canal_a"][i] + d["ped_r"][i] + 14 * s) / A))
    th1 = np.deg2rad(_RIBS["end_deg"][k])
    th = np.linspace(th0, th1, n)
    frac = (th - th0) / (th1 - th0)
    u = side * A * np.sin(th)
    v = B * np.cos(th) - B + RIB_POSTERIOR_MM * s
    w = d["body_h"][i] * 0.5 - _RIBS["drop"][k] * s * frac**1.3
    facet = (side * d["body_a"][i] * 0.85, d["body_b"][i] * 0.55, d["body_h"][i] * 0.55)
    local_pts = np.vstack([facet, np.stack([u, v, w], axis=1)])
    return spine.to_world(i, local_pts), _RIBS["r"][k] * s


def rib_shapes(spine: Spine, i: int, side: float) -> list:
    pts, r = rib_path(spine, i, side)
    return [Capsule(tuple(pts[k]), tuple(pts[k + 1]), r, r) for k in range(len(pts) - 1)]


def sternum_shapes(spine: Spine) -> list:
    """Manubrium and sternal body: a flat bone at the front of the rib cage, T2 to T9 heights."""
    s = spine.scale
    pts = []
    for i, drop in ((INDEX["T2"], 30), (INDEX["T4"], 45), (INDEX["T6"], 55), (INDEX["T8"], 60), (INDEX["T9"], 55)):
        k = i - T1
        B = _RIBS["B"][k] * s * spine.chest
        pts.append(spine.to_world(i, (0.0, -2 * B + RIB_POSTERIOR_MM * s - 4, -drop * s)))
    return [Capsule(tuple(pts[k]), tuple(pts[k + 1]), 7.5 * s, 6.5 * s) for k in range(len(pts) - 1)]


def sacrum_shapes(spine: Spine) -> list:
    """S1 and S2 fused (bodies joined, no disc), alae, posterior elements and median crest."""
    d, s = spine.dims, spine.scale
    shapes = []
    for i in (S1, S2):
        h = d["body_h"][i] if i == S1 else np.linalg.norm(spine.centres[S1] - spine.centres[S2]) * 0.55
        shapes.append(Cylinder(tuple(spine.centres[i]), spine.frames[i], d["body_a"][i], d["body_b"][i], h,
                               rounding=2.5, waist=0.03))
    shapes.append(Capsule(tuple(spine.centres[S1]), tuple(spine.centres[S2]), 12 * s, 10 * s))
    for side in (-1.0, 1.0):
        ala = spine.to_world(S1, (side * 36 * s, 4 * s, -2 * s))
        shapes.append(Ellipsoid(tuple(ala), spine.frames[S1], (22 * s, 15 * s, 17 * s)))
        lat = spine.to_world(S2, (side * 28 * s, 6 * s, 0))
        shapes.append(Ellipsoid(tuple(lat), spine.frames[S2], (18 * s, 12 * s, 16 * s)))
    sacral = dict(d)
    for key, value in (("spin_len", 12.0), ("spin_deg", 30.0), ("tp_len", 8.0), ("canal_a", 10.0), ("canal_b", 5.0)):
        sacral[key] = d[key].copy()
        sacral[key][S1] = sacral[key][S2] = value * (1.0 if key.endswith("_deg") else s)
    for i in (S1, S2):
        shapes += _posterior_elements(spine, i, sacral)
    return shapes


def ilium_shapes(spine: Spine, side: float) -> list:
    """One iliac wing: a thick block at the sacroiliac joint and a thin curved plate flaring
    from it up, out and forward (its top, the iliac crest, near the L4-L5 level)."""
    s = spine.scale
    f = spine.frames[S1]
    out, fwd = side * spine.frames[L5][0], -spine.frames[L5][1]
    up = spine.frames[L5][2]
    base = spine.to_world(S1, (side * 56 * s, 6 * s, -8 * s))
    shapes = [Ellipsoid(tuple(base), f, (12 * s, 16 * s, 26 * s))]
    plane_u = out * 0.62 + fwd * 0.78
    plane_u /= np.linalg.norm(plane_u)
    plane_w = up + out * 0.35
    plane_w -= (plane_w @ plane_u) * plane_u
    plane_w /= np.linalg.norm(plane_w)
    frame = np.stack([plane_u, np.cross(plane_w, plane_u), plane_w])
    for along, rise, ru, rw, thick in ((30, 18, 40, 44, 9), (52, 34, 30, 30, 7)):
        centre = base + plane_u * along * s + plane_w * rise * s
        shapes.append(Ellipsoid(tuple(centre), frame, (ru * s, thick * s, rw * s)))
    return shapes


def skull_shapes(spine: Spine) -> list:
    """The skull base above the atlas: an ellipsoidal shell with the foramen magnum over the dens."""
    s = spine.scale
    f0 = spine.frames[0]
    centre = spine.centres[0] + np.array([0.0, -24.0, 84.0]) * s
    skull = Ellipsoid(tuple(centre), np.eye(3), (68 * s, 86 * s, 72 * s))
    hole = Capsule(tuple(spine.centres[0]), tuple(spine.centres[0] + f0[2] * 40 * s + f0[1] * 4 * s), 16 * s, 16 * s)
    return [Shell(skull, 7.0 * s, hole)]


def face_shapes(spine: Spine) -> list:
    """Soft tissue of the jaw and floor of the mouth around the mandible (the neck outline is narrower)."""
    s = spine.scale
    return [Ellipsoid(tuple(spine.to_world(1, (0.0, -60 * s, 4 * s))), np.eye(3), (56 * s, 46 * s, 34 * s))]


def mandible_shapes(spine: Spine) -> list:
    """The lower jaw: a U of capsules in front of C2-C3 (a strong cue of the cervical levels)."""
    s = spine.scale
    pts = []
    for ang in np.linspace(-80, 80, 9):
        a = np.deg2rad(ang)
        uvw = (48 * np.sin(a), -28 - 52 * np.cos(a), -6 + 12 * abs(np.sin(a)))
        pts.append(spine.to_world(1, np.array(uvw) * s))
    shapes = [Capsule(tuple(pts[k]), tuple(pts[k + 1]), 6 * s, 6 * s) for k in range(len(pts) - 1)]
    for side, end in ((-1.0, pts[0]), (1.0, pts[-1])):
        ramus_top = spine.to_world(0, (side * 46 * s, -12 * s, 14 * s))
        shapes.append(Capsule(tuple(end), tuple(ramus_top), 6 * s, 5 * s))
    return shapes


def screw_shapes(spine: Spine, levels: list[int]) -> list:
    """Pedicle screws (with tulip heads) at ``levels`` on both sides, joined by two rods."""
    d = spine.dims
    shapes = []
    heads: dict[float, list[np.ndarray]] = {-1.0: [], 1.0: []}
    for i in levels:
        a, b = d["body_a"][i], d["body_b"][i]
        r = 3.2 if i >= INDEX["T10"] else 2.6
        for side in (-1.0, 1.0):
            lateral, back = d["canal_a"][i] + d["ped_r"][i] * 1.3, b + 2 * d["canal_b"][i]
            entry = spine.to_world(i, (side * lateral, back + 4, 0))
            tip = spine.to_world(i, (side * 0.25 * a, -0.55 * b, 0))
            head = spine.to_world(i, (side * (lateral + 2), back + 14, 0))
            shapes.append(Capsule(tuple(entry), tuple(tip), r, r * 0.8))
            shapes.append(Capsule(tuple(entry), tuple(head), 5.5, 5.5))
            heads[side].append(head)
    for pts in heads.values():
        pts = np.array(pts)
        ext = (pts[0] - pts[-1]) / max(np.linalg.norm(pts[0] - pts[-1]), 1e-6) * 10.0
        chain = [pts[0] + ext, *pts, pts[-1] - ext]
        shapes += [Capsule(tuple(chain[k]), tuple(chain[k + 1]), 3.0, 3.0) for k in range(len(chain) - 1)]
    return shapes
