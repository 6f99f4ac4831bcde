"""Whole-CT inference (paper section III-B, test phase): tiles -> network -> votes -> K-means.

The paper crops the test CT into blocks, runs the network on each, and clusters with K-means
"the coordinates of the same type of vertebrae" to one centroid per type. Here:

1. **Tiling** (:func:`tile_origins`). The canonical volume (``(Z, Y, X)``, z-scored, isotropic,
   see :mod:`vertstudy.data.preprocess`) is covered by overlapping crops of the checkpoint's
   ``crop_size`` at ``stride`` voxels. Along each axis the origins are ``0, s, 2s, ...`` and
   the last tile is flush with the end of the volume (origin ``n - c``), so every voxel lies
   in at least one tile. An axis shorter than the crop gets a single tile centred on it
   (origin ``-((c - n) // 2)``); the voxels outside the volume are the case's ``pad_value``
   (z-scored air), as in training crops that leave the volume. A stride larger than the crop
   would leave voxels unseen and is refused (``ConfigError``).

2. **Network** (:func:`run_tiles`). Tiles go through the model in batches of ``batch_size``
   under ``torch.inference_mode``; ``coords`` ``(B, 26, 3)`` are crop voxels ``(z, y, x)``,
   ``logits`` ``(B, 26)`` pre-sigmoid (or ``None`` for a localization-only model).

3. **Votes** (:func:`collect_votes`). In each tile, class ``n`` votes when its probability
   ``sigmoid(logit)`` is ``>= threshold`` **and** its coordinate lies inside the tile
   (``0 <= c < size`` on every axis, the rule by which training crops mark a class present).
   The vote is the point ``origin + c`` in canonical voxels, weighted by its probability.
   A **localization-only** model (``logits is None``) has no classifier, so every class whose
   coordinate lies inside the tile votes with weight 1 — including the classes that are not
   in the tile at all, whose integral-regression coordinates still land somewhere inside it.
   Those false votes are why a loc-only model has a poor identification rate (paper table
   III: the classification branch "eliminates the false positives of localization").

4. **Clustering** (:func:`cluster_votes`), per class, on its votes ``(N, 3)`` with weights:

   - no vote: the class is not predicted;
   - one distinct point, or a cloud whose bounding-box diagonal is below ``merge_mm`` (no two
     K-means centres could be farther apart): one cluster, without running K-means;
   - else K-means with ``k = 2`` (scikit-learn, votes weighted by probability,
     ``n_init = 4``, ``random_state = 0``: deterministic). If the two weighted centres are
     closer than ``merge_mm`` (default 10 mm, about a third of a lumbar level; adjacent
     vertebrae are >= 15 mm apart) the two clusters are one scatter of the same vertebra and
     all votes are kept; else the cluster with the larger total weight (sum of
     probabilities; ties: more votes, then the first K-means label) is kept and the other is
     the **outlier cluster** (votes of tiles that mistook a neighbour for this class), dropped;
   - the kept cluster must hold at least ``min_votes`` votes, else the class is not
     predicted;
   - the centroid is the probability-weighted mean of the kept votes (the K-means centre).

   Each class is clustered independently, as in the paper: two classes may end up on the same
   vertebra (a shift like paper Fig. 9B); nothing here enforces the order of the spine.

Everything but :func:`run_tiles` (and the wrappers that call it) is a pure numpy function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vertstudy.anatomy import NAMES, NUM_CLASSES
from vertstudy.config import Config, InferConfig
from vertstudy.data.case import Case
from vertstudy.data.crops import extract_crop
from vertstudy.data.preprocess import Geometry, Prepared, preprocess
from vertstudy.errors import ConfigError

MERGE_MM = 10.0  # two K-means centres closer than this are one vertebra's scatter
KMEANS_N_INIT = 4
KMEANS_RANDOM_STATE = 0


# -- tiling ----------------------------------------------------------------------------------
def axis_origins(n: int, c: int, s: int) -> np.ndarray:
    """Tile origins along one axis of ``n`` voxels for tiles of ``c`` voxels at stride ``s``.

    ``n > c``: ``0, s, 2s, ...`` while the tile fits, then one tile flush with the end
    (``n - c``); every voxel is covered when ``s <= c``. ``n <= c``: one tile centred on the
    axis, origin ``-((c - n) // 2) <= 0``.
    Returns (T,) int64, strictly increasing.
    """
    if n <= 0 or c <= 0 or s <= 0:
        raise ValueError(f"axis length, tile size and stride must be > 0, got n={n}, c={c}, s={s}")
    if n <= c:
        return np.array([-((c - n) // 2)], dtype=np.int64)
    origins = list(range(0, n - c, s))
    origins.append(n - c)
    return np.unique(np.asarray(origins, dtype=np.int64))


def tile_origins(shape_zyx: Sequence[int], crop_size: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """(T, 3) int64 canonical (z, y, x) voxel origins of the tiles covering a volume.

    ``shape_zyx`` volume shape, ``crop_size`` tile shape, ``stride`` step per axis, all
    ``(z, y, x)`` voxels. Tiles are listed z-major (then y, then x); see :func:`axis_origins`.
    Raises ``ConfigError`` when a stride exceeds the crop (voxels between tiles never seen).
    """
    if any(int(s) > int(c) for s, c in zip(stride, crop_size)):
        raise ConfigError(
            f"infer.stride {tuple(int(s) for s in stride)} exceeds the model's crop size "
            f"{tuple(int(c) for c in crop_size)} on some axis; voxels between tiles would never be seen"
        )
    axes = [axis_origins(int(n), int(c), int(s)) for n, c, s in zip(shape_zyx, crop_size, stride, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


# -- votes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Votes:
    """Votes of many tiles: ``classes`` (N,) int64 class index, ``points_zyx`` (N, 3) float64
    canonical (z, y, x) voxels, ``weights`` (N,) float64 (probability, or 1 for loc-only)."""

    classes: np.ndarray
    points_zyx: np.ndarray
    weights: np.ndarray

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
        )

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
    Returns :class:`Votes` with points ``origin + c`` (canonical voxels), ordered by tile,
    then class.
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
    return Votes(cls[keep].astype(np.int64), points[keep], weights[tile[keep], cls[keep]])


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
) -> ClassResult | None:
    """:func:`cluster_votes` with its bookkeeping (:class:`ClassResult`), or ``None``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(points) == 0:
        return None
    keep = choose_cluster(points, weights, merge_vox, random_state)
    n = int(keep.sum())
    if n < min_votes:
        return None
    w = weights[keep]
    centre = (points[keep] * w[:, None]).sum(axis=0) / w.sum()
    return ClassResult(
        centre_zyx=centre,
        votes=n,
        outliers=int(len(points) - n),
        weight=float(w.sum()),
        probability=None if loc_only else float(w.mean()),
    )


def cluster_all(
    votes: Votes, min_votes: int, merge_vox: float, loc_only: bool = False
) -> dict[int, ClassResult]:
    """:func:`cluster_class` for each of the 26 classes; only predicted classes are returned.

    ``merge_vox`` is the merge distance in the voxel units of ``votes``.
    """
    from threadpoolctl import threadpool_limits

    out: dict[int, ClassResult] = {}
    # One thread for the tiny K-means problems: sklearn otherwise re-negotiates its thread pools
    # on every fit, which costs ~0.1 s per class on a small machine.
    with threadpool_limits(limits=1):
        for index in range(NUM_CLASSES):
            points, weights = votes.of_class(index)
            result = cluster_class(points, weights, min_votes, merge_vox, loc_only=loc_only)
            if result is not None:
                out[index] = result
    return out


# -- the network over the tiles --------------------------------------------------------------
def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def has_body(crop: np.ndarray, pad_value: float, body_fraction: float) -> bool:
    """Whether a tile ``crop`` (D, H, W) z-scored holds body: at least ``body_fraction`` of its
    voxels more than 0.5 z-score units (~200 HU in a CT) above ``pad_value`` (z-scored air)."""
    return float((crop > pad_value + 0.5).mean()) >= body_fraction


@dataclass(frozen=True)
class TileOutputs:
    """The network's raw outputs on the tiles that ran.

    ``origins`` (T, 3) int64 canonical (z, y, x) voxel of each tile's voxel 0; ``coords``
    (T, 26, 3) float64 crop voxels (z, y, x); ``probs`` (T, 26) float64 class probabilities, or
    ``None`` for a localization-only model; ``skipped`` tiles without body that did not run.
    """

    origins: np.ndarray
    coords: np.ndarray
    probs: np.ndarray | None
    skipped: int = 0

    @property
    def loc_only(self) -> bool:
        return self.probs is None

    def subset(self, keep: np.ndarray) -> TileOutputs:
        """The tiles where ``keep`` (T,) bool is True (the others count as skipped)."""
        keep = np.asarray(keep, dtype=bool)
        probs = None if self.probs is None else self.probs[keep]
        return TileOutputs(self.origins[keep], self.coords[keep], probs, self.skipped + int((~keep).sum()))


def run_network(
    model: torch.nn.Module,
    volume: np.ndarray,
    pad_value: float,
    crop_size: Sequence[int],
    origins_zyx: np.ndarray,
    batch_size: int,
    body_fraction: float | None = None,
) -> TileOutputs:
    """Run ``model`` (on its own device, put in eval mode) on the tiles at ``origins_zyx``.

    ``volume`` (Z, Y, X) float32 canonical, z-scored; ``pad_value`` fills tile voxels outside
    it. ``body_fraction``: skip tiles that fail :func:`has_body` (``None``: run every tile).
    """
    model.eval()
    device = _model_device(model)
    keep, coords, probs = [], [], []
    loc_only = False
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal loc_only
        if not pending:
            return
        x = torch.from_numpy(np.stack([c for _, c in pending]))[:, None].to(device)
        out = model(x)
        coords.append(out["coords"].float().cpu().numpy().astype(np.float64))
        logits = out.get("logits")
        loc_only = logits is None
        if logits is not None:
            probs.append(torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64))
        keep.extend(o for o, _ in pending)
        pending.clear()

    skipped = 0
    with torch.inference_mode():
        for origin in origins_zyx:
            crop = extract_crop(volume, origin, crop_size, pad_value)
            if body_fraction is not None and not has_body(crop, pad_value, body_fraction):
                skipped += 1
                continue
            pending.append((origin, crop))
            if len(pending) == batch_size:
                flush()
        flush()
    origins = np.asarray(keep, dtype=np.int64).reshape(-1, 3)
    coords_arr = np.concatenate(coords) if coords else np.zeros((0, NUM_CLASSES, 3))
    if loc_only:
        probs_arr = None
    else:
        probs_arr = np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES))
    return TileOutputs(origins, coords_arr, probs_arr, skipped)


def tile_votes(tiles: TileOutputs, crop_size: Sequence[int], threshold: float, volume_shape: Sequence[int]) -> Votes:
    """:func:`collect_votes` of every tile in ``tiles``."""
    if len(tiles.origins) == 0:
        return Votes.empty()
    return collect_votes(tiles.coords, tiles.probs, tiles.origins, crop_size, threshold, volume_shape)


def run_tiles(
    model: torch.nn.Module,
    volume: np.ndarray,
    pad_value: float,
    crop_size: Sequence[int],
    origins_zyx: np.ndarray,
    batch_size: int,
    threshold: float,
) -> tuple[Votes, bool]:
    """The votes of every tile at ``origins_zyx`` (no tile skipped), and whether the model is loc-only."""
    tiles = run_network(model, volume, pad_value, crop_size, origins_zyx, batch_size)
    return tile_votes(tiles, crop_size, threshold, volume.shape), tiles.loc_only


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

    ``kmeans``: the paper's per-class clustering (:func:`cluster_all`). ``sequence``:
    :func:`vertstudy.train.decode.decode_sequence` with the checkpoint's spine ``prior``
    (:class:`vertstudy.train.decode.SpinePrior`; ``None``: the population prior of the shipped
    real spine shapes). Centres in canonical voxels.
    """
    if infer_cfg.decoder == "kmeans":
        return cluster_all(votes, infer_cfg.min_votes, merge_mm / spacing_mm, tiles.loc_only)
    from vertstudy.train.decode import decode_sequence, population_prior, tiles_containing

    prior = population_prior() if prior is None else prior
    decoded = decode_sequence(
        votes.classes, votes.points_zyx * spacing_mm, votes.weights,
        lambda pts_mm: tiles_containing(pts_mm / spacing_mm, tiles.origins, crop_size),
        prior, infer_cfg.seq_radius_mm, infer_cfg.seq_min_score, infer_cfg.seq_pair_weight,
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


@dataclass(frozen=True)
class VolumeResult:
    """:func:`predict_volume_details`: per predicted class its :class:`ClassResult`, plus the
    number of tiles that ran, of tiles skipped (no body) and of votes before decoding."""

    classes: dict[int, ClassResult]
    tiles: int
    votes: int
    loc_only: bool
    skipped: int = 0


def predict_volume_details(
    model: torch.nn.Module,
    volume: np.ndarray,
    pad_value: float,
    crop_size: Sequence[int],
    infer_cfg: InferConfig,
    spacing_mm: float,
    prior=None,
    merge_mm: float = MERGE_MM,
) -> VolumeResult:
    """Tile, run, vote and decode one canonical volume; see the module docstring.

    ``volume`` (Z, Y, X) float32 z-scored canonical voxels at ``spacing_mm``; ``crop_size``
    the model's training crop (z, y, x), each divisible by 8; the model runs on its own device.
    ``prior``: the checkpoint's :class:`~vertstudy.train.decode.SpinePrior` (sequence decoder).
    """
    origins = tile_origins(volume.shape, crop_size, infer_cfg.stride)
    body = infer_cfg.body_fraction if infer_cfg.skip_empty_tiles else None
    tiles = run_network(model, volume, pad_value, crop_size, origins, infer_cfg.batch_size, body)
    votes = tile_votes(tiles, crop_size, infer_cfg.threshold, volume.shape)
    classes = decode_votes(votes, tiles, crop_size, infer_cfg, spacing_mm, prior, merge_mm)
    return VolumeResult(classes=classes, tiles=len(tiles.origins), votes=len(votes), loc_only=tiles.loc_only,
                        skipped=tiles.skipped)


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    pad_value: float,
    crop_size: Sequence[int],
    infer_cfg: InferConfig,
    spacing_mm: float,
    device: str | torch.device | None = None,
    prior=None,
    merge_mm: float = MERGE_MM,
) -> dict[int, np.ndarray]:
    """Predicted centroids of one canonical volume: ``{class index: (3,) float64 (z, y, x) voxels}``.

    ``device``: move the model there first (``None``: leave it where it is).
    """
    if device is not None:
        model.to(device)
    result = predict_volume_details(model, volume, pad_value, crop_size, infer_cfg, spacing_mm, prior, merge_mm)
    return {k: r.centre_zyx for k, r in result.classes.items()}


# -- a whole case ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictedVertebra:
    """One predicted centroid in every coordinate system a user needs.

    ``zyx_vox``: canonical (z, y, x) voxels; ``xyz_mm``: ITK/LPS physical (x, y, z) mm;
    ``index_xyz``: continuous voxel index (x, y, z) of the original image (SimpleITK order,
    voxel centres at integers); ``probability``: mean class probability of its votes (``None``
    for a loc-only model); ``votes`` / ``outliers``: votes kept / dropped by the clustering.
    """

    index: int
    zyx_vox: tuple[float, float, float]
    xyz_mm: tuple[float, float, float]
    index_xyz: tuple[float, float, float]
    probability: float | None
    votes: int
    outliers: int

    @property
    def name(self) -> str:
        return NAMES[self.index]


@dataclass
class Prediction:
    """The prediction for one case: vertebrae sorted by class, the geometry that maps them, the
    number of tiles and votes, and the preprocessed case (for pictures; not serialised)."""

    case_id: str
    vertebrae: list[PredictedVertebra]
    geometry: Geometry
    tiles: int
    votes: int
    loc_only: bool
    prepared: Prepared | None = field(default=None, repr=False)
    skipped: int = 0

    def by_index(self) -> dict[int, PredictedVertebra]:
        return {v.index: v for v in self.vertebrae}

    def points_mm(self) -> np.ndarray:
        """(N, 3) float64 LPS (x, y, z) mm, in ``vertebrae`` order."""
        return np.array([v.xyz_mm for v in self.vertebrae], dtype=np.float64).reshape(-1, 3)


def to_vertebrae(classes: dict[int, ClassResult], geometry: Geometry) -> list[PredictedVertebra]:
    """Map clustered canonical centroids to LPS mm and original voxel indices, sorted by class."""
    out = []
    for index in sorted(classes):
        r = classes[index]
        zyx = np.asarray(r.centre_zyx, dtype=np.float64).reshape(1, 3)
        xyz_mm = geometry.canonical_to_physical(zyx)[0]
        idx = geometry.physical_to_original_index(xyz_mm[None])[0]
        out.append(
            PredictedVertebra(
                index=int(index),
                zyx_vox=tuple(float(v) for v in zyx[0]),
                xyz_mm=tuple(float(v) for v in xyz_mm),
                index_xyz=tuple(float(v) for v in idx),
                probability=r.probability,
                votes=r.votes,
                outliers=r.outliers,
            )
        )
    return out


def predict_prepared(
    model: torch.nn.Module,
    cfg: Config,
    prepared: Prepared,
    case_id: str = "",
    infer_cfg: InferConfig | None = None,
    prior=None,
    merge_mm: float = MERGE_MM,
) -> Prediction:
    """:func:`predict_case` on an already preprocessed case (preprocessed with ``cfg.data.prep``)."""
    infer_cfg = infer_cfg or cfg.infer
    crop_size = tuple(int(c) for c in cfg.data.crop.crop_size)
    spacing = prepared.geometry.spacing_mm
    if not math.isclose(spacing, cfg.data.prep.spacing_mm, rel_tol=1e-6):
        raise ValueError(f"case preprocessed at {spacing} mm, model trained at {cfg.data.prep.spacing_mm} mm")
    result = predict_volume_details(
        model, prepared.volume, prepared.pad_value, crop_size, infer_cfg, spacing, prior, merge_mm
    )
    return Prediction(
        case_id=case_id,
        vertebrae=to_vertebrae(result.classes, prepared.geometry),
        geometry=prepared.geometry,
        tiles=result.tiles,
        votes=result.votes,
        loc_only=result.loc_only,
        prepared=prepared,
        skipped=result.skipped,
    )


def predict_case(
    model: torch.nn.Module,
    cfg: Config,
    case: Case,
    infer_cfg: InferConfig | None = None,
    prior=None,
    merge_mm: float = MERGE_MM,
) -> Prediction:
    """Label one CT: preprocess with the checkpoint's ``cfg.data.prep``, tile with its
    ``cfg.data.crop.crop_size``, and infer with ``infer_cfg`` (default ``cfg.infer``).

    The model runs on its own device. The case's landmarks (if any) are ignored here. ``prior``:
    the checkpoint's spine prior (:func:`vertstudy.train.trainer.load_spine_prior`), which the
    sequence decoder needs.
    """
    prepared = preprocess(case, cfg.data.prep)
    return predict_prepared(model, cfg, prepared, case.case_id, infer_cfg, prior, merge_mm)
