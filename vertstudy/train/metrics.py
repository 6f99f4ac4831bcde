"""Evaluation metrics of the paper (III-C) as pure numpy functions, overall and per region.

Whole-CT metrics (the contract in :mod:`vertstudy.study.schema`), on predicted and true centroids in millimetres:

- Localization error: Euclidean distance (mm) between a predicted centroid and the truth of the
  same class; mean and std over the vertebrae present in the truth that were predicted.
- Identification: a true vertebra is identified when the predicted centroid closest to it (over
  all predicted centroids of the case, any class) is of its class and less than ``radius_mm``
  (20 mm; the paper: "less than 20mm") away. A tie between its own prediction and another
  class's equally close one counts as identified. Identification rate = identified / vertebrae
  in the truth; a vertebra without a prediction is not identified.
- Identification, VerSe rule (the VerSe benchmark's ``get_hits``, ``anjany/verse``
  ``utils/eval_utilities.py``): a vertebra in both the truth and the prediction is identified
  when, among the true centroids of the vertebrae in both, the one closest to its *prediction*
  is its own (a tie goes to the lowest class index, as numpy's ``argmin``), and that prediction
  is at most ``radius_mm`` from its truth. ``id_rate_verse`` = identified / vertebrae in the
  truth. It differs from the paper's rule when predictions cluster or shift: the paper looks
  from each truth to all predictions, VerSe from each prediction to the truths both hold.
- Classification: mAP, the mean over classes of sklearn's ``average_precision_score``.

:func:`match_case` gives one :class:`VertebraRow` per class and case (the rows of
``vertebrae.parquet``); :func:`summarize` pools rows of any number of cases.

Crop-level metrics (:func:`crop_metrics`) are the trainer's per-epoch validation figures on
fixed validation crops, in crop voxels scaled to mm. They are *not* the whole-CT metrics:
each crop is one "case", its truth is the vertebrae whose centroid lies inside the crop, and
every class's coordinate output counts as a prediction (or only those with probability above
the threshold, for identification).

Arrays: ``K = 26`` classes in the order of ``vertstudy.anatomy``; points ``(..., 3)`` in one
consistent axis order (any, as long as prediction and truth agree; crops use ``(z, y, x)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vertstudy.anatomy import NUM_CLASSES, REGIONS, region_of

ID_RADIUS_MM = 20.0


@dataclass(frozen=True)
class VertebraRow:
    """The evaluation of one class in one case: a row of ``vertebrae.parquet``.

    label: class index 0..25. region: its region name. in_truth / predicted: whether the class
    has a true / predicted centroid. error_mm: distance between the two, NaN unless both.
    identified: see the module docstring (always False when not in the truth).
    """

    label: int
    region: str
    in_truth: bool
    predicted: bool
    error_mm: float
    identified: bool
    #: identified by the VerSe rule (module docstring); False when not in the truth
    identified_verse: bool = False
    #: the true / predicted centroid, (3,) in the caller's millimetres (canonical (z, y, x) mm for
    #: the study tables); None when absent. Not part of equality: rows compare by their figures.
    true_mm: tuple[float, float, float] | None = field(default=None, compare=False)
    pred_mm: tuple[float, float, float] | None = field(default=None, compare=False)


def region_mask(region: str) -> np.ndarray:
    """``(26,)`` bool, True for the classes of ``region`` (a key of ``anatomy.REGIONS``)."""
    mask = np.zeros(NUM_CLASSES, dtype=bool)
    mask[list(REGIONS[region])] = True
    return mask


def identified_mask(
    true_pts: np.ndarray,
    pred_pts: np.ndarray,
    in_truth: np.ndarray,
    predicted: np.ndarray,
    radius_mm: float = ID_RADIUS_MM,
    rule: str = "paper",
) -> np.ndarray:
    """Which true vertebrae are identified, for ``N`` independent cases at once.

    true_pts, pred_pts: ``(N, K, 3)`` mm (entries of absent classes are ignored and may be NaN).
    in_truth, predicted: ``(N, K)`` bool. Returns ``(N, K)`` bool. ``rule="paper"``: class ``k``
    of case ``n`` is in the truth, predicted, its own prediction is closer than ``radius_mm``
    and no predicted centroid of another class of that case is closer to the truth than its
    own. ``rule="verse"``: the VerSe benchmark's (module docstring).
    """
    true_pts = np.asarray(true_pts, dtype=np.float64)
    pred_pts = np.asarray(pred_pts, dtype=np.float64)
    in_truth = np.asarray(in_truth, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    if rule == "verse":
        return _verse_hits(true_pts, pred_pts, in_truth & predicted, radius_mm)
    # dist[n, i, j]: truth of class i to prediction of class j; unpredicted j are infinitely far.
    dist = np.linalg.norm(true_pts[:, :, None, :] - pred_pts[:, None, :, :], axis=-1)
    dist = np.where(predicted[:, None, :], dist, np.inf)
    own = np.diagonal(dist, axis1=1, axis2=2)
    closest = dist.min(axis=2)
    with np.errstate(invalid="ignore"):
        return in_truth & predicted & (own < radius_mm) & (own <= closest)


def _verse_hits(true_pts: np.ndarray, pred_pts: np.ndarray, both: np.ndarray, radius_mm: float) -> np.ndarray:
    # dist[n, i, j]: prediction of class i to truth of class j, over classes in both only
    dist = np.linalg.norm(pred_pts[:, :, None, :] - true_pts[:, None, :, :], axis=-1)
    dist = np.where(both[:, None, :], dist, np.inf)
    closest = np.argmin(np.where(np.isnan(dist), np.inf, dist), axis=2)  # first index on ties
    own = np.diagonal(dist, axis1=1, axis2=2)
    with np.errstate(invalid="ignore"):
        return both & (closest == np.arange(true_pts.shape[1])[None, :]) & (own <= radius_mm)


def _points_array(points: Mapping[int, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
    """``{class: (3,) mm}`` -> ``(K, 3)`` points (NaN where absent) and ``(K,)`` presence."""
    pts = np.full((NUM_CLASSES, 3), np.nan)
    has = np.zeros(NUM_CLASSES, dtype=bool)
    for label, point in points.items():
        label = int(label)
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"{what}: class index must be in 0..{NUM_CLASSES - 1}, got {label}")
        point = np.asarray(point, dtype=np.float64)
        if point.shape != (3,):
            raise ValueError(f"{what}: class {label} point must have shape (3,), got {point.shape}")
        pts[label], has[label] = point, True
    return pts, has


def match_case(
    pred: Mapping[int, np.ndarray], truth: Mapping[int, np.ndarray], radius_mm: float = ID_RADIUS_MM
) -> list[VertebraRow]:
    """Evaluate one case: 26 rows, one per class in index order.

    pred, truth: ``{class index: (3,) point in mm}`` (e.g. physical LPS mm); classes missing
    from a dict are not predicted / not in the truth.
    """
    pred_pts, predicted = _points_array(pred, "pred")
    true_pts, in_truth = _points_array(truth, "truth")
    error = np.linalg.norm(pred_pts - true_pts, axis=-1)  # NaN unless both
    identified = identified_mask(true_pts[None], pred_pts[None], in_truth[None], predicted[None], radius_mm)[0]
    verse = identified_mask(true_pts[None], pred_pts[None], in_truth[None], predicted[None], radius_mm, "verse")[0]
    return [
        VertebraRow(
            label=k,
            region=region_of(k),
            in_truth=bool(in_truth[k]),
            predicted=bool(predicted[k]),
            error_mm=float(error[k]),
            identified=bool(identified[k]),
            identified_verse=bool(verse[k]),
            true_mm=tuple(float(v) for v in true_pts[k]) if in_truth[k] else None,
            pred_mm=tuple(float(v) for v in pred_pts[k]) if predicted[k] else None,
        )
        for k in range(NUM_CLASSES)
    ]


def _column(rows: Sequence[VertebraRow | Mapping], name: str, dtype) -> np.ndarray:
    return np.array([row[name] if isinstance(row, Mapping) else getattr(row, name) for row in rows], dtype=dtype)


def _summary(in_truth: np.ndarray, predicted: np.ndarray, error: np.ndarray, identified: np.ndarray,
             verse: np.ndarray | None) -> dict:
    matched = in_truth & predicted
    errors = error[matched]
    n_truth = int(in_truth.sum())
    out = {
        "loc_error_mm_mean": float(errors.mean()) if errors.size else float("nan"),
        "loc_error_mm_std": float(errors.std()) if errors.size else float("nan"),
        "id_rate": float((identified & in_truth).sum() / n_truth) if n_truth else float("nan"),
        "n_truth": n_truth,
        "n_predicted": int(predicted.sum()),
        "n_matched": int(matched.sum()),
        "n_false": int((predicted & ~in_truth).sum()),
    }
    if verse is not None:
        out["id_rate_verse"] = float((verse & in_truth).sum() / n_truth) if n_truth else float("nan")
    return out


def summarize(rows: Iterable[VertebraRow | Mapping]) -> dict[str, float | int]:
    """Pool rows (of one or many cases) into the paper's figures, overall and per region.

    rows: :class:`VertebraRow` s or mappings with the same keys (e.g. Parquet records).
    Keys: ``loc_error_mm_mean``, ``loc_error_mm_std`` (population std, ddof 0) over rows in the
    truth and predicted; ``id_rate`` = identified / ``n_truth``; ``id_rate_verse`` by the VerSe rule (only when the rows
    carry ``identified_verse``: tables written before it existed do not); ``n_truth`` (rows in the truth),
    ``n_predicted`` (rows predicted, in the truth or not), ``n_matched`` (both), ``n_false``
    (predicted but not in the truth: false predictions, which neither the id rate nor the
    error counts against); and each of
    these with the suffix ``_<region>`` (``id_rate_thoracic``, ``loc_error_mm_mean_lumbar``,
    ...). A figure with nothing to average over is NaN.
    """
    rows = list(rows)
    in_truth = _column(rows, "in_truth", bool)
    predicted = _column(rows, "predicted", bool)
    error = _column(rows, "error_mm", np.float64)
    identified = _column(rows, "identified", bool)
    has_verse = all(isinstance(r, VertebraRow) or "identified_verse" in r for r in rows)
    verse = _column(rows, "identified_verse", bool) if has_verse else None
    region = _column(rows, "region", object)
    out: dict[str, float | int] = dict(_summary(in_truth, predicted, error, identified, verse))
    for name in REGIONS:
        sel = region == name
        part = None if verse is None else verse[sel]
        for key, value in _summary(in_truth[sel], predicted[sel], error[sel], identified[sel], part).items():
            out[f"{key}_{name}"] = value
    return out


def per_class_average_precision(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Average precision of each class: ``(K,)``, NaN for a class without any positive.

    probs: ``(N, K)`` predicted probabilities (or any scores); present: ``(N, K)`` {0, 1}.
    A class with no positive sample has no defined precision-recall curve (sklearn warns and
    returns a meaningless value), so it is left out as NaN rather than counted as 0 or 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    present = np.asarray(present).astype(bool)
    if probs.shape != present.shape or probs.ndim != 2:
        raise ValueError(f"probs and present must both be (N, K), got {probs.shape} and {present.shape}")
    from sklearn.metrics import average_precision_score  # here: importing sklearn costs a driver ~1 s

    ap = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        if present[:, k].any():
            ap[k] = average_precision_score(present[:, k], probs[:, k])
    return ap


def mean_average_precision(probs: np.ndarray, present: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """mAP in [0, 1]: mean of :func:`per_class_average_precision` over ``classes`` (default all)
    that have at least one positive; NaN when none has.

    probs, present: ``(N, 26)``, one row per sample (crop or case).
    """
    return _mean_ap(per_class_average_precision(probs, present), classes)


def _mean_ap(ap: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """Mean of the per-class APs ``ap`` ``(K,)`` over ``classes``, skipping NaN; NaN if none left."""
    if classes is not None:
        ap = ap[list(classes)]
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def _nan_mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def crop_metrics(
    coords_pred: np.ndarray,
    coords_true: np.ndarray,
    present_true: np.ndarray,
    probs: np.ndarray | None,
    spacing_mm: float | Sequence[float],
    threshold: float = 0.5,
    radius_mm: float = ID_RADIUS_MM,
) -> dict[str, float]:
    """Crop-level validation metrics (not the whole-CT metrics; see the module docstring).

    coords_pred, coords_true: ``(N, 26, 3)`` crop voxels ``(z, y, x)`` (numpy or CPU tensors
    without grad). present_true: ``(N, 26)`` {0, 1}. probs: ``(N, 26)`` class probabilities
    (after the sigmoid) or None when the network has no classifier. spacing_mm: voxel size, one
    number (isotropic) or ``(z, y, x)``.

    - ``loc_error_mm``: mean over all truly present vertebrae of all crops of the distance
      between the predicted coordinate of that class and the truth (whatever its probability).
    - ``id_rate``: identified / truly present, pooled over crops; in each crop the predicted
      classes are those with ``probs > threshold`` (all 26 when ``probs`` is None), and a present
      vertebra is identified when the closest predicted coordinate is of its class and
      closer than ``radius_mm``.
    - ``map``: mAP of ``probs`` vs ``present_true`` over the crops; NaN when ``probs`` is None.

    Each also per region: ``loc_error_mm_<region>``, ``id_rate_<region>``, ``map_<region>``.
    NaN where there is nothing to average over.
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    pred_mm = np.asarray(coords_pred, dtype=np.float64) * spacing
    true_mm = np.asarray(coords_true, dtype=np.float64) * spacing
    present = np.asarray(present_true).astype(bool)
    if probs is None:
        predicted = np.ones_like(present)
    else:
        probs = np.asarray(probs, dtype=np.float64)
        predicted = probs > threshold
    error = np.linalg.norm(pred_mm - true_mm, axis=-1)  # (N, 26)
    identified = identified_mask(true_mm, pred_mm, present, predicted, radius_mm)
    ap = np.full(NUM_CLASSES, np.nan) if probs is None else per_class_average_precision(probs, present)

    def figures(classes: np.ndarray, suffix: str) -> dict[str, float]:
        sel = present[:, classes]
        n = int(sel.sum())
        return {
            f"loc_error_mm{suffix}": _nan_mean(error[:, classes][sel]),
            f"id_rate{suffix}": float(identified[:, classes][sel].sum() / n) if n else float("nan"),
            f"map{suffix}": _mean_ap(ap, np.flatnonzero(classes)),
        }

    out = figures(np.ones(NUM_CLASSES, dtype=bool), "")
    for name in REGIONS:
        out.update(figures(region_mask(name), f"_{name}"))
    return out
