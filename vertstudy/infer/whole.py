"""Whole-case prediction: preprocess, tile, run, vote, decode, and map the centroids back to the
image. The two public entry points of inference are :func:`predict_case` (a raw case) and
:func:`predict_prepared` (a case already preprocessed with the checkpoint's settings)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vertstudy.anatomy import NAMES
from vertstudy.config import Config, InferConfig
from vertstudy.data.case import Case
from vertstudy.data.preprocess import Geometry, Prepared, preprocess
from vertstudy.infer.decoders import decode_votes
from vertstudy.infer.tiling import tile_volume
from vertstudy.infer.votes import MERGE_MM, ClassResult, tile_votes

#: the public entry points; the rest serve them and the other inference modules
__all__ = ["PredictedVertebra", "Prediction", "predict_case", "predict_prepared"]


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
    ``prior``: the checkpoint's :class:`~vertstudy.model.prior.SpinePrior` (sequence decoder).
    """
    tiles = tile_volume(model, volume, pad_value, crop_size, infer_cfg)
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
