"""Tile outputs -> votes, and the paper's per-class K-means clustering of them (steps 3-4; see
:mod:`vertstudy.infer`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.infer.tiling import TileOutputs

MERGE_MM = 10.0  # two K-means centres closer than this are one vertebra's scatter

KMEANS_N_INIT = 4

KMEANS_RANDOM_STATE = 0


# -- votes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Votes:
    """Votes of many tiles: ``classes`` (N,) int64 class index, ``points_zyx`` (N, 3) float64
    canonical (z, y, x) voxels, ``weights`` (N,) float64 (probability, or 1 for loc-only),
    ``centrality`` (N,) float64 in (0, 1]: how deep inside its tile the vote lies
    (:func:`centrality`; ``None``: every vote 1)."""

    classes: np.ndarray
    points_zyx: np.ndarray
    weights: np.ndarray
    centrality: np.ndarray | None = None

    @staticmethod
    def empty() -> Votes:
        return Votes(np.zeros(0, np.int64), np.zeros((0, 3), np.float64), np.zeros(0, np.float64))

    @staticmethod
    def concat(parts: Sequence[Votes]) -> Votes:
        if not parts:
            return Votes.empty()
        return Votes(
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.points_zyx for p in parts]),
            np.concatenate([p.weights for p in parts]),
            np.concatenate([p.centre_depth() for p in parts]),
        )

    def centre_depth(self) -> np.ndarray:
        """(N,) ``centrality``, ones where it was not recorded."""
        return np.ones(len(self.classes)) if self.centrality is None else self.centrality

    def position_weights(self, power: float) -> np.ndarray:
        """(N,) the weights that average vote positions into a centroid: ``weights *
        centrality ** power`` (``infer.centre_weight``; 0: the probabilities alone, the paper's)."""
        if power == 0:
            return self.weights
        return self.weights * self.centre_depth() ** power

    def at_least(self, probability: float | None) -> Votes:
        """The votes whose weight (probability) is at least ``probability`` (``None``: all)."""
        if probability is None:
            return self
        keep = self.weights >= probability
        if keep.all():
            return self
        return Votes(self.classes[keep], self.points_zyx[keep], self.weights[keep], self.centre_depth()[keep])

    def of_class(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(points (M, 3), weights (M,))`` of class ``index``, in vote order."""
        keep = self.classes == index
        return self.points_zyx[keep], self.weights[keep]

    def __len__(self) -> int:
        return len(self.classes)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    x = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def centrality(coords: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
    """(...,) how deep inside its tile each coordinate ``coords`` (..., 3) crop voxels lies: the
    product over the axes of the distance to the nearer face of the tile, ``min(c + 0.5,
    size - 0.5 - c)``, over half the tile, ``size / 2``; 1 at the centre, 1/size per axis
    in the outermost voxel. An integral-regression coordinate is an expectation over the
    tile's voxels, so a vertebra cut by a face is pulled inwards: votes near a face are the
    least accurate."""
    size = np.asarray(crop_size, dtype=np.float64)
    c = np.asarray(coords, dtype=np.float64)
    depth = np.minimum(c + 0.5, size - 0.5 - c) / (size / 2.0)
    return np.clip(depth, 1e-6, 1.0).prod(axis=-1)


def collect_votes(
    coords: np.ndarray,
    probs: np.ndarray | None,
    origins_zyx: np.ndarray,
    crop_size: Sequence[int],
    threshold: float,
    volume_shape: Sequence[int] | None = None,
) -> Votes:
    """The votes of a batch of tiles.

    Args:
        coords: (B, 26, 3) predicted coordinates, crop voxels (z, y, x).
        probs: (B, 26) class probabilities in [0, 1] (sigmoid of the logits), or ``None`` for a
            localization-only model (every class votes, weight 1).
        origins_zyx: (B, 3) canonical (z, y, x) voxel of each tile's voxel 0.
        crop_size: tile shape (z, y, x) voxels.
        threshold: a class votes when its probability is ``>= threshold``.
        volume_shape: (Z, Y, X) of the volume, or ``None``. When given, a vote must also lie
            within half a voxel of the volume (a tile larger than the volume is padded; a
            centroid in the padding is not in the image).

    A vote also needs a finite coordinate inside the tile: ``0 <= c < size`` on every axis.
    Returns :class:`Votes` with points ``origin + c`` (canonical voxels) and their
    :func:`centrality`, ordered by tile, then class.
    """
    coords = np.asarray(coords, dtype=np.float64)
    batch = coords.shape[0]
    if coords.shape != (batch, NUM_CLASSES, 3):
        raise ValueError(f"coords must be (B, {NUM_CLASSES}, 3), got {coords.shape}")
    origins = np.asarray(origins_zyx, dtype=np.float64).reshape(batch, 3)
    size = np.asarray(crop_size, dtype=np.float64)
    inside = np.isfinite(coords).all(axis=2) & ((coords >= 0) & (coords < size)).all(axis=2)
    if probs is None:
        weights = np.ones((batch, NUM_CLASSES), dtype=np.float64)
        vote = inside
    else:
        weights = np.asarray(probs, dtype=np.float64).reshape(batch, NUM_CLASSES)
        vote = inside & (weights >= threshold)
    tile, cls = np.nonzero(vote)
    points = origins[tile] + coords[tile, cls]
    keep = np.ones(len(points), dtype=bool)
    if volume_shape is not None:
        shape = np.asarray(volume_shape, dtype=np.float64)
        keep = ((points >= -0.5) & (points <= shape - 0.5)).all(axis=1)
    depth = centrality(coords[tile, cls], crop_size)
    return Votes(cls[keep].astype(np.int64), points[keep], weights[tile[keep], cls[keep]], depth[keep])


# -- clustering ------------------------------------------------------------------------------
def choose_cluster(
    points: np.ndarray, weights: np.ndarray, merge_vox: float, random_state: int = KMEANS_RANDOM_STATE
) -> np.ndarray:
    """(N,) bool mask of the votes kept for one class (the rule in the module docstring).

    ``points`` (N >= 1, 3) voxels, ``weights`` (N,) > 0, ``merge_vox`` merge distance in the
    same voxel units. Deterministic for a given input order and ``random_state``.
    """
    from sklearn.cluster import KMeans

    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    keep_all = np.ones(len(points), dtype=bool)
    if len(points) < 2 or len(np.unique(points, axis=0)) < 2:
        return keep_all
    if np.linalg.norm(points.max(axis=0) - points.min(axis=0)) < merge_vox:
        return keep_all  # the whole cloud is smaller than the merge distance: any 2 centres are too
    km = KMeans(n_clusters=2, n_init=KMEANS_N_INIT, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-duplicate points: sklearn warns, the result is still valid
        labels = km.fit_predict(points, sample_weight=weights)
    centres = km.cluster_centers_
    if np.linalg.norm(centres[0] - centres[1]) < merge_vox:
        return keep_all
    totals = [(float(weights[labels == k].sum()), int((labels == k).sum()), -k) for k in (0, 1)]
    best = max((0, 1), key=lambda k: totals[k])
    return labels == best


def cluster_votes(
    points: np.ndarray,
    weights: np.ndarray,
    min_votes: int = 1,
    merge_vox: float = MERGE_MM / 2.0,
    random_state: int = KMEANS_RANDOM_STATE,
) -> np.ndarray | None:
    """One class's centroid: (3,) float64 in the units of ``points``, or ``None``.

    ``points`` (N, 3) votes (canonical (z, y, x) voxels), ``weights`` (N,) their probabilities
    (1 for loc-only). ``None`` when there are no votes or the kept cluster has fewer than
    ``min_votes``. ``merge_vox`` is the merge distance in voxels (``merge_mm / spacing_mm``;
    the default is 10 mm at 2 mm). See the module docstring for the rule.
    """
    result = cluster_class(points, weights, min_votes, merge_vox, random_state)
    return None if result is None else result.centre_zyx


@dataclass(frozen=True)
class ClassResult:
    """The clustered prediction of one class.

    ``centre_zyx`` (3,) float64 canonical (z, y, x) voxels; ``votes`` kept, ``outliers``
    dropped (the outlier cluster); ``weight`` sum of the kept weights; ``probability`` mean
    probability of the kept votes (``None`` for a loc-only model, whose weights are all 1).
    """

    centre_zyx: np.ndarray
    votes: int
    outliers: int
    weight: float
    probability: float | None


def cluster_class(
    points: np.ndarray,
    weights: np.ndarray,
    min_votes: int = 1,
    merge_vox: float = MERGE_MM / 2.0,
    random_state: int = KMEANS_RANDOM_STATE,
    loc_only: bool = False,
    position_weights: np.ndarray | None = None,
) -> ClassResult | None:
    """:func:`cluster_votes` with its bookkeeping (:class:`ClassResult`), or ``None``.

    ``position_weights`` (N,): the weights of the centroid's mean (:meth:`Votes.position_weights`);
    ``None``: ``weights``. Clustering, ``weight`` and ``probability`` use ``weights``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    pos = weights if position_weights is None else np.asarray(position_weights, dtype=np.float64).reshape(-1)
    if len(points) == 0:
        return None
    keep = choose_cluster(points, weights, merge_vox, random_state)
    n = int(keep.sum())
    if n < min_votes:
        return None
    w, pw = weights[keep], pos[keep]
    centre = (points[keep] * pw[:, None]).sum(axis=0) / pw.sum()
    return ClassResult(
        centre_zyx=centre,
        votes=n,
        outliers=int(len(points) - n),
        weight=float(w.sum()),
        probability=None if loc_only else float(w.mean()),
    )


def cluster_all(
    votes: Votes, min_votes: int, merge_vox: float, loc_only: bool = False, centre_weight: float = 0.0
) -> dict[int, ClassResult]:
    """:func:`cluster_class` for each of the 26 classes; only predicted classes are returned.

    ``merge_vox`` is the merge distance in the voxel units of ``votes``; ``centre_weight`` the
    power of :meth:`Votes.position_weights` (0: the paper's probability-weighted mean).
    """
    pos = votes.position_weights(centre_weight)
    from threadpoolctl import threadpool_limits

    out: dict[int, ClassResult] = {}
    # One thread for the tiny K-means problems: sklearn otherwise re-negotiates its thread pools
    # on every fit, which costs ~0.1 s per class on a small machine.
    with threadpool_limits(limits=1):
        for index in range(NUM_CLASSES):
            points, weights = votes.of_class(index)
            result = cluster_class(points, weights, min_votes, merge_vox, loc_only=loc_only,
                                   position_weights=pos[votes.classes == index])
            if result is not None:
                out[index] = result
    return out


def tile_votes(tiles: TileOutputs, crop_size: Sequence[int], threshold: float, volume_shape: Sequence[int]) -> Votes:
    """:func:`collect_votes` of every tile in ``tiles``."""
    if len(tiles.origins) == 0:
        return Votes.empty()
    return collect_votes(tiles.coords, tiles.probs, tiles.origins, crop_size, threshold, volume_shape)
