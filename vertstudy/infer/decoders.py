"""Spine-consistent decoding of tile votes: at most one centroid per class, in anatomical order,
with plausible spacing (beyond the paper, whose per-class K-means is in :mod:`vertstudy.infer.votes`).

The paper clusters each class's votes on its own, so two classes can land on one vertebra
and a class whose tiles disagree picks one cluster blindly. The strongest methods on CSI 2014
and VerSe instead take many candidates and choose a labelling that is consistent along the
spine (Payer et al.: a graph over heatmap candidates with learned inter-vertebra offsets,
solved as a shortest path; Wang et al. 2021: consecutive-index constraints along the
centreline). Here:

1. **Candidates** (:func:`candidate_points`). Each class's votes (canonical mm) are grouped by
   average-linkage clustering cut at ``radius_mm``; every group's weighted mean is a candidate
   point, whatever its class. Candidates of different classes closer than ``radius_mm / 2``
   are merged (one vertebra seen with different labels).

2. **Label scores** (:func:`label_scores`). For candidate ``c`` and class ``l``,
   ``a(c, l) = min(1, sum of the weights of class-l votes within radius_mm of c / T(c))``,
   where ``T(c)`` is the number of tiles that ran and contain ``c``: the mean probability,
   over the tiles that saw the point, that it is vertebra ``l``. Any class can be chosen for
   any candidate, so a few confident anchors can relabel their neighbours.

3. **Spacing prior** (:class:`SpinePrior`, fitted on the training split only by
   :func:`fit_spine_prior` and stored in the checkpoint; a checkpoint without one uses
   :func:`population_prior`, fitted on the shipped real spine shapes). For each pair of
   consecutive classes ``k -> k+1`` the mean and variance (per canonical axis z, y, x, mm) of
   the offset between their centroids over the training cases that hold both. Between
   classes ``k < l`` the offset is the sum of the consecutive ones (means and variances
   add), plus ``2 noise_mm^2`` per axis for the prediction error of the two ends.

4. **Dynamic programming** (:func:`decode_sequence`). A labelling is a chain of (candidate,
   class) nodes with strictly increasing classes; its score is the sum of the nodes'
   ``a(c, l) - min_score`` plus ``pair_weight`` times the Gaussian log-likelihood
   ``-0.5 sum_axis (d - mu)^2 / var`` of each consecutive pair's offset. Only nodes with
   ``a > min_score`` are considered, a candidate is used at most once along consecutive
   links, levels may be missing anywhere (no assumption that all 26 are in view) and the
   chain may start and end at any class. The best chain is exact (a longest path in a DAG
   ordered by class), found in ``O(nodes^2)``.

5. **Centroids**: a chosen node's centroid is the weighted mean of its class's votes within
   ``radius_mm`` of the candidate (the candidate itself when there are none), weighted by
   probability times centrality to the power ``infer.centre_weight``
   (:meth:`vertstudy.infer.votes.Votes.position_weights`).

Everything here is a pure numpy function of its inputs; units are canonical millimetres, axis
order (z, y, x), unless a name says voxels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import InferConfig
from vertstudy.infer.tiling import TileOutputs
from vertstudy.infer.votes import MERGE_MM, ClassResult, Votes, cluster_all
from vertstudy.model.prior import NOISE_MM, SpinePrior, population_prior


# -- candidates and their scores ---------------------------------------------------------------
def _groups(points: np.ndarray, cut: float) -> np.ndarray:
    """Average-linkage cluster labels (N,) of ``points`` (N, 3) cut at distance ``cut``."""
    if len(points) == 1:
        return np.zeros(1, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage

    return fcluster(linkage(points, method="average"), t=cut, criterion="distance").astype(np.int64)


def _weighted_means(points: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = []
    for g in np.unique(labels):
        sel = labels == g
        w = weights[sel]
        out.append((points[sel] * w[:, None]).sum(axis=0) / max(w.sum(), 1e-12))
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


def candidate_points(classes: np.ndarray, points_mm: np.ndarray, weights: np.ndarray, radius_mm: float) -> np.ndarray:
    """(C, 3) candidate points (mm) from votes ``classes`` (N,), ``points_mm`` (N, 3), ``weights`` (N,)."""
    cands, masses = [], []
    for k in np.unique(classes):
        sel = classes == k
        labels = _groups(points_mm[sel], radius_mm)
        cands.append(_weighted_means(points_mm[sel], weights[sel], labels))
        masses.append(np.array([weights[sel][labels == g].sum() for g in np.unique(labels)]))
    if not cands:
        return np.zeros((0, 3))
    pts, mass = np.concatenate(cands), np.concatenate(masses)
    return _weighted_means(pts, mass, _groups(pts, radius_mm / 2.0))


def tiles_containing(points_vox: np.ndarray, origins_zyx: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
    """(C,) number of tiles (origins (T, 3), size ``crop_size``) whose box holds each point (C, 3) voxels."""
    if len(origins_zyx) == 0 or len(points_vox) == 0:
        return np.zeros(len(points_vox), dtype=np.int64)
    rel = points_vox[:, None, :] - np.asarray(origins_zyx, dtype=np.float64)[None]
    inside = ((rel >= 0) & (rel < np.asarray(crop_size, dtype=np.float64))).all(axis=2)
    return inside.sum(axis=1)


def label_scores(
    cands_mm: np.ndarray, classes: np.ndarray, points_mm: np.ndarray, weights: np.ndarray, seen: np.ndarray,
    radius_mm: float,
) -> np.ndarray:
    """(C, 26) ``a(c, l)``: class-l vote weight within ``radius_mm`` of candidate c over ``seen`` (C,)
    tiles that contain it, clipped to [0, 1] (see the module docstring)."""
    scores = np.zeros((len(cands_mm), NUM_CLASSES))
    if len(cands_mm) == 0 or len(points_mm) == 0:
        return scores
    near = np.linalg.norm(cands_mm[:, None, :] - points_mm[None, :, :], axis=2) < radius_mm  # (C, N)
    onehot = np.zeros((len(points_mm), NUM_CLASSES))
    onehot[np.arange(len(points_mm)), classes] = weights
    scores = near.astype(np.float64) @ onehot
    return np.clip(scores / np.maximum(seen, 1)[:, None], 0.0, 1.0)


# -- the chain -----------------------------------------------------------------------------------
def best_chain(
    cands_mm: np.ndarray, scores: np.ndarray, prior: SpinePrior, min_score: float, pair_weight: float,
    noise_mm: float = NOISE_MM,
) -> list[tuple[int, int]]:
    """The best labelling as ``[(candidate, class), ...]`` in class order (module docstring, step 4)."""
    cand_idx, cls_idx = np.nonzero(scores > min_score)
    if len(cand_idx) == 0:
        return []
    order = np.lexsort((cand_idx, cls_idx))
    cand_idx, cls_idx = cand_idx[order], cls_idx[order]
    unary = scores[cand_idx, cls_idx] - min_score
    mean, var = prior.between(noise_mm)
    pts = cands_mm[cand_idx]
    best = unary.copy()
    prev = np.full(len(unary), -1, dtype=np.int64)
    for cls in np.unique(cls_idx):
        js = np.nonzero(cls_idx == cls)[0]
        is_ = np.nonzero(cls_idx < cls)[0]
        if len(is_) == 0:
            continue
        d = pts[js][None, :, :] - pts[is_][:, None, :]  # (I, J, 3)
        mu = mean[cls_idx[is_], cls][:, None, :]
        v = var[cls_idx[is_], cls][:, None, :]
        pair = -0.5 * pair_weight * (((d - mu) ** 2) / v).sum(axis=2)
        pair[cand_idx[is_][:, None] == cand_idx[js][None, :]] = -math.inf  # one candidate, one class
        total = best[is_][:, None] + pair  # (I, J)
        arg = total.argmax(axis=0)
        gain = total[arg, np.arange(len(js))]
        better = gain > 0
        best[js[better]] = unary[js[better]] + gain[better]
        prev[js[better]] = is_[arg[better]]
    node = int(best.argmax())
    chain = []
    while node >= 0:
        chain.append((int(cand_idx[node]), int(cls_idx[node])))
        node = int(prev[node])
    return chain[::-1]


@dataclass(frozen=True)
class DecodedClass:
    """One class chosen by :func:`decode_sequence`: ``centre_mm`` (3,), the class's votes kept
    near it and the others, their summed weight and the label score ``a(c, l)``."""

    centre_mm: np.ndarray
    votes: int
    outliers: int
    weight: float
    score: float


def decode_sequence(
    classes: np.ndarray,
    points_mm: np.ndarray,
    weights: np.ndarray,
    seen_fn,
    prior: SpinePrior,
    radius_mm: float,
    min_score: float,
    pair_weight: float,
    position_weights: np.ndarray | None = None,
) -> dict[int, DecodedClass]:
    """Decode votes into at most one centroid per class (module docstring).

    classes (N,) int64, points_mm (N, 3) canonical mm, weights (N,) > 0; ``seen_fn`` maps
    candidate points (C, 3) mm to the number of tiles that ran and contain them (C,).
    ``position_weights`` (N,) > 0: the weights of step 5's mean (default ``weights``; see
    :meth:`vertstudy.infer.votes.Votes.position_weights`); candidates and scores use ``weights``.
    Returns ``{class: DecodedClass}``.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    points_mm = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    pos = weights if position_weights is None else np.asarray(position_weights, dtype=np.float64).reshape(-1)
    if len(classes) == 0:
        return {}
    cands = candidate_points(classes, points_mm, weights, radius_mm)
    scores = label_scores(cands, classes, points_mm, weights, np.asarray(seen_fn(cands)), radius_mm)
    out: dict[int, DecodedClass] = {}
    for c, cls in best_chain(cands, scores, prior, min_score, pair_weight):
        own = classes == cls
        near = own & (np.linalg.norm(points_mm - cands[c], axis=1) < radius_mm)
        w, pw = weights[near], pos[near]
        centre = (points_mm[near] * pw[:, None]).sum(axis=0) / pw.sum() if near.any() else cands[c].copy()
        out[cls] = DecodedClass(centre, int(near.sum()), int(own.sum() - near.sum()), float(w.sum()),
                                float(scores[c, cls]))
    return out


# -- decoding ----------------------------------------------------------------------------------
def decode_votes(
    votes: Votes,
    tiles: TileOutputs,
    crop_size: Sequence[int],
    infer_cfg: InferConfig,
    spacing_mm: float,
    prior=None,
    merge_mm: float = MERGE_MM,
) -> dict[int, ClassResult]:
    """Votes -> one :class:`ClassResult` per predicted class, by ``infer_cfg.decoder``.

    ``kmeans``: the paper's per-class clustering (:func:`cluster_all`) of the votes at least
    ``infer_cfg.kmeans_threshold`` likely, centres weighted by ``kmeans_centre_weight``. ``sequence``:
    :func:`vertstudy.infer.decoders.decode_sequence` with the checkpoint's spine ``prior``
    (:class:`vertstudy.model.prior.SpinePrior`; ``None``: the population prior of the shipped
    real spine shapes). Centres in canonical voxels.
    """
    if infer_cfg.decoder == "kmeans":  # its own vote threshold and centre weight (infer.kmeans_*)
        votes = votes.at_least(infer_cfg.kmeans_threshold)
        power = infer_cfg.centre_weight if infer_cfg.kmeans_centre_weight is None else infer_cfg.kmeans_centre_weight
        return cluster_all(votes, infer_cfg.min_votes, merge_mm / spacing_mm, tiles.loc_only, power)
    from vertstudy.infer.decoders import decode_sequence, tiles_containing

    prior = population_prior() if prior is None else prior
    decoded = decode_sequence(
        votes.classes, votes.points_zyx * spacing_mm, votes.weights,
        lambda pts_mm: tiles_containing(pts_mm / spacing_mm, tiles.origins, crop_size),
        prior, infer_cfg.seq_radius_mm, infer_cfg.seq_min_score, infer_cfg.seq_pair_weight,
        votes.position_weights(infer_cfg.centre_weight),
    )
    out = {}
    for k, d in decoded.items():
        if d.votes < infer_cfg.min_votes and d.votes > 0:
            continue
        out[k] = ClassResult(
            centre_zyx=d.centre_mm / spacing_mm, votes=d.votes, outliers=d.outliers, weight=d.weight,
            probability=None if tiles.loc_only else d.score,
        )
    return out
