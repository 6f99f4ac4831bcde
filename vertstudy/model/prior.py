"""The spine prior: offsets between consecutive vertebrae, fitted on a study's training cases and
stored in its checkpoints (see :mod:`vertstudy.infer.decoders`, which uses it)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.checkpoint import load_checkpoint
from vertstudy.data.cache import CachedCase

#: prediction error assumed at each end of an offset (mm, per axis) on top of the anatomical spread
NOISE_MM = 4.0

#: floor of a consecutive offset's variance per axis (mm^2), for pairs seen in few training cases
MIN_VAR_MM2 = 4.0


@dataclass(frozen=True)
class SpinePrior:
    """Offsets between consecutive classes ``k -> k + 1`` in canonical (z, y, x) mm.

    ``mean`` (25, 3) and ``var`` (25, 3) per axis; ``count`` (25,) training cases that held
    both classes (pairs never seen borrow the median of the seen ones, with a wide variance).
    """

    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray

    def to_state(self) -> dict:
        """Plain lists, for a checkpoint (read back with :meth:`from_state`)."""
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count.tolist()}

    @staticmethod
    def from_state(state: dict) -> SpinePrior:
        return SpinePrior(
            np.asarray(state["mean"], dtype=np.float64).reshape(NUM_CLASSES - 1, 3),
            np.asarray(state["var"], dtype=np.float64).reshape(NUM_CLASSES - 1, 3),
            np.asarray(state["count"], dtype=np.int64).reshape(NUM_CLASSES - 1),
        )

    def between(self, noise_mm: float = NOISE_MM) -> tuple[np.ndarray, np.ndarray]:
        """Offset mean and variance between every pair of classes ``k < l``: two (26, 26, 3)
        arrays (entries with ``k >= l`` are NaN)."""
        cum_mean = np.concatenate([np.zeros((1, 3)), np.cumsum(self.mean, axis=0)])
        cum_var = np.concatenate([np.zeros((1, 3)), np.cumsum(self.var, axis=0)])
        mean = cum_mean[None, :, :] - cum_mean[:, None, :]
        var = cum_var[None, :, :] - cum_var[:, None, :] + 2.0 * noise_mm**2
        upper = np.triu(np.ones((NUM_CLASSES, NUM_CLASSES), dtype=bool), k=1)
        mean[~upper] = np.nan
        var[~upper] = np.nan
        return mean, var


def fit_spine_prior(cases: Sequence[tuple[np.ndarray, np.ndarray]]) -> SpinePrior:
    """Fit :class:`SpinePrior` on training cases given as ``(indices (N,), zyx_mm (N, 3))``.

    Pairs never seen get the median mean of the seen pairs and a variance of (20 mm)^2.
    Raises ``ValueError`` when no case holds any consecutive pair.
    """
    offsets: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES - 1)]
    for indices, zyx_mm in cases:
        points = {int(i): np.asarray(p, dtype=np.float64) for i, p in zip(indices, np.reshape(zyx_mm, (-1, 3)))}
        for k in range(NUM_CLASSES - 1):
            if k in points and k + 1 in points:
                offsets[k].append(points[k + 1] - points[k])
    seen = [k for k in range(NUM_CLASSES - 1) if offsets[k]]
    if not seen:
        raise ValueError("spine prior: no training case holds two consecutive vertebrae")
    fallback = np.median(np.stack([np.mean(offsets[k], axis=0) for k in seen]), axis=0)
    mean = np.zeros((NUM_CLASSES - 1, 3))
    var = np.zeros((NUM_CLASSES - 1, 3))
    count = np.zeros(NUM_CLASSES - 1, dtype=np.int64)
    for k in range(NUM_CLASSES - 1):
        if offsets[k]:
            d = np.stack(offsets[k])
            mean[k], count[k] = d.mean(axis=0), len(d)
            var[k] = np.maximum(d.var(axis=0) if len(d) > 1 else MIN_VAR_MM2, MIN_VAR_MM2)
        else:
            mean[k], var[k] = fallback, 400.0
    return SpinePrior(mean, var, count)


@functools.lru_cache(maxsize=1)
def population_prior() -> SpinePrior:
    """The prior of the 1,947 real spines shipped in :mod:`vertstudy.data.shapes` (C1..L5; the
    sacral pairs borrow the median step), for checkpoints that carry no prior of their own.
    LPS (x, y, z) steps are the canonical (z, y, x) ones reversed."""
    from vertstudy.data.shapes import load_shapes

    shapes = load_shapes()
    cases = []
    for spine in shapes.points:
        have = ~np.isnan(spine[:, 0])
        cases.append((np.nonzero(have)[0], spine[have][:, ::-1]))
    return fit_spine_prior(cases)


def load_spine_prior(path: Path):
    """The :class:`~vertstudy.model.prior.SpinePrior` a checkpoint stores (fitted on its training
    cases), or ``None`` for a checkpoint written before priors were stored."""
    from vertstudy.model.prior import SpinePrior

    state = load_checkpoint(path)
    return SpinePrior.from_state(state["spine_prior"]) if state.get("spine_prior") else None


def training_prior(cases: list[CachedCase]):
    """The spine prior of the training cases (canonical mm), or ``None`` when they hold no
    two consecutive vertebrae."""
    from vertstudy.model.prior import fit_spine_prior

    try:
        return fit_spine_prior([(c.indices, np.asarray(c.zyx_vox) * c.geometry.spacing_mm) for c in cases])
    except ValueError:
        return None
