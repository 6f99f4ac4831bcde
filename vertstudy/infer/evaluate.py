"""Whole-CT evaluation of a checkpoint on held-out cached cases, and the mean-position baseline.

Held-out cases are labelled on the *whole* CT by :mod:`vertstudy.infer` and scored by
:func:`vertstudy.train.metrics.match_case` in canonical millimetres (``zyx_vox * spacing_mm``,
axis order (z, y, x)); the mapping to the scanner's space is rigid per case, so distances are
the same. Baseline: every class present in a case is predicted at that class's mean canonical
position (mm) over the training cases that contain it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import Config
from vertstudy.data.cache import CachedCase
from vertstudy.train.metrics import VertebraRow, match_case


def truth_mm(case: CachedCase) -> dict[int, np.ndarray]:
    """``{class: (3,) canonical (z, y, x) mm}`` of a cached case's centroids."""
    spacing = case.geometry.spacing_mm
    return {int(i): np.asarray(p, dtype=np.float64) * spacing for i, p in zip(case.indices, case.zyx_vox)}


def mean_positions_mm(cases: list[CachedCase]) -> dict[int, np.ndarray]:
    """Per class, the mean canonical (z, y, x) position in mm over the cases that contain it."""
    sums, counts = np.zeros((NUM_CLASSES, 3)), np.zeros(NUM_CLASSES)
    for case in cases:
        for label, point in truth_mm(case).items():
            sums[label] += point
            counts[label] += 1
    return {k: sums[k] / counts[k] for k in range(NUM_CLASSES) if counts[k]}


def baseline_case_rows(train: list[CachedCase], test: list[CachedCase]) -> list[tuple[CachedCase, list[VertebraRow]]]:
    """Per test case, the rows of the mean-position baseline (every class in the truth is predicted)."""
    means = mean_positions_mm(train)
    out = []
    for case in test:
        truth = truth_mm(case)
        out.append((case, match_case({k: means[k] for k in truth if k in means}, truth)))
    return out


def model_case_rows(
    model, cfg, cases: list[CachedCase], prior=None, infer_cfg=None
) -> list[tuple[CachedCase, list[VertebraRow]]]:
    """Per case, the rows of ``model``'s whole-CT predictions (``infer_cfg``, default ``cfg.infer``)."""
    from vertstudy.infer.whole import predict_volume

    out = []
    for case in cases:
        spacing = case.geometry.spacing_mm
        volume = np.asarray(case.volume(mmap=False), dtype=np.float32)
        pred = predict_volume(model, volume, case.pad_value, cfg.data.crop.crop_size, infer_cfg or cfg.infer, spacing,
                              prior=prior)
        out.append((case, match_case({k: np.asarray(v, dtype=np.float64) * spacing for k, v in pred.items()},
                                     truth_mm(case))))
    return out


def checkpoint_case_rows(
    checkpoint: Path, test: list[CachedCase], device: str = "cpu", infer_cfg=None
) -> tuple[list[tuple[CachedCase, list[VertebraRow]]], float]:
    """Per test case, the rows of ``checkpoint``'s whole-CT predictions; and seconds per case."""
    from vertstudy.model.load import load_model
    from vertstudy.model.prior import load_spine_prior

    model, cfg = load_model(checkpoint, device=device)
    t0 = time.perf_counter()
    out = model_case_rows(model, cfg, test, load_spine_prior(checkpoint), infer_cfg)
    return out, (time.perf_counter() - t0) / max(len(test), 1)


def validation_infer(cfg: Config):
    """The :class:`~vertstudy.config.InferConfig` of the whole-CT validations during training:
    ``cfg.infer`` with tiles every ``crop_size / train.whole_ct_tiles_per_crop`` voxels (0: as is)."""
    from vertstudy.config import derived_stride

    if cfg.train.whole_ct_tiles_per_crop == 0:
        return cfg.infer
    stride = derived_stride(cfg.data.crop.crop_size, cfg.train.whole_ct_tiles_per_crop)
    return cfg.infer.model_copy(update={"stride": stride})


def whole_ct_figures(model, cfg: Config, val_cases: list[CachedCase], prior) -> dict[str, float]:
    """Whole-CT labelling of the validation cases with the current weights (tiled as
    :func:`validation_infer` says): ``val_ct_id_rate``, ``val_ct_loc_error_mm`` (mean over
    matched vertebrae) and ``val_ct_false_per_case`` (predicted classes absent from the truth,
    per case)."""
    from vertstudy.train.metrics import summarize

    per_case = model_case_rows(model, cfg, val_cases, prior, validation_infer(cfg))
    s = summarize([r for _, rows in per_case for r in rows])
    return {
        "val_ct_id_rate": float(s["id_rate"]),
        "val_ct_loc_error_mm": float(s["loc_error_mm_mean"]),
        "val_ct_false_per_case": float(s["n_false"]) / max(len(val_cases), 1),
    }
