"""Where identification is lost: an error decomposition of a checkpoint on cases with known centroids.

The network runs once over every tile of each case (tiles without body skipped as in
inference); the votes are then decoded four ways, each replacing one stage by the truth:

- ``shipped``: every tile, the classifier's probabilities (what inference does);
- ``near``: only tiles whose centre lies within ``near_mm`` (40 mm) of the true spine (the
  polyline through the true centroids in class order): the loss due to tiles far from the spine;
- ``oracle``: every tile, the classifier replaced by the truth (a class votes iff its true
  centroid lies inside the tile, with probability 1): the loss due to the classifier;
- ``both``: near tiles and the oracle classifier: what is left is the localization branch
  and the decoder.

Each variant is decoded by every decoder (``kmeans``, the paper's; ``sequence``, see
:mod:`vertstudy.infer.decoders`) and scored with
:func:`vertstudy.train.metrics.match_case` in canonical mm. Beside them, the crop-level view
on ``crops_per_case`` unaugmented crops centred on the spine (as the trainer's validation):
``crop_recall`` (present classes with probability >= threshold), ``crop_false_positive_rate``
(absent classes with probability >= threshold) and ``crop_loc_error_mm`` (mean and median of
present vertebrae), with ``crop_centre_error_mm``, the error of always predicting the crop
centre on the same crops (what the network must beat).

Figures are flat: ``{variant}_{decoder}_{id_rate | loc_error_mm | false_per_case}``,
``{variant}_tiles_per_case``, and the ``crop_*`` figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vertstudy.config import Config
from vertstudy.data.cache import CachedCase
from vertstudy.data.crops import crop_targets, extract_crop, spine_curve, validation_origins
from vertstudy.infer.evaluate import truth_mm
from vertstudy.train.metrics import match_case, summarize

VARIANTS = ("shipped", "near", "oracle", "both")
DECODERS = ("kmeans", "sequence")
NEAR_MM = 40.0


def distance_to_polyline(points: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """(N,) distance of each point (N, 3) to the polyline ``curve`` (M >= 1, 3), same units."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    curve = np.asarray(curve, dtype=np.float64).reshape(-1, 3)
    if len(curve) == 1:
        return np.linalg.norm(points - curve[0], axis=1)
    a, b = curve[:-1], curve[1:]
    ab = b - a
    t = ((points[:, None, :] - a[None]) * ab[None]).sum(axis=2) / np.maximum((ab**2).sum(axis=1), 1e-12)[None]
    t = np.clip(t, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None, :] - closest, axis=2).min(axis=1)


def oracle_probs(case: CachedCase, origins: np.ndarray, crop_size: Sequence[int]) -> np.ndarray:
    """(T, 26) float64: 1 where a class's true centroid lies inside the tile at ``origins`` (T, 3), else 0."""
    return np.stack([crop_targets(case.indices, case.zyx_vox, o, crop_size)[0] for o in origins]).astype(np.float64) \
        if len(origins) else np.zeros((0, 26))


def near_tiles(case: CachedCase, origins: np.ndarray, crop_size: Sequence[int], near_mm: float) -> np.ndarray:
    """(T,) bool: tiles whose centre is within ``near_mm`` of the case's true spine polyline."""
    if len(case.indices) == 0 or len(origins) == 0:
        return np.zeros(len(origins), dtype=bool)
    spacing = case.geometry.spacing_mm
    centres = (np.asarray(origins, dtype=np.float64) + (np.asarray(crop_size, dtype=np.float64) - 1) / 2) * spacing
    curve = spine_curve(case.indices, case.zyx_vox) * spacing
    return distance_to_polyline(centres, curve) <= near_mm


def crop_view(model, cfg: Config, cases: list[CachedCase], crops_per_case: int) -> dict[str, float]:
    """Crop-level recall, false-positive rate and localization error on spine-centred crops."""
    crop = tuple(int(c) for c in cfg.data.crop.crop_size)
    thr = cfg.infer.threshold
    hits = present_n = fp = absent_n = 0
    errors, centre_errors = [], []
    device = next(model.parameters()).device
    centre = (np.asarray(crop, dtype=np.float64) - 1) / 2
    with torch.inference_mode():
        for case in cases:
            volume = case.volume(mmap=True)
            spacing = case.geometry.spacing_mm
            for origin in validation_origins(case, crop, crops_per_case):
                present, coords = crop_targets(case.indices, case.zyx_vox, origin, crop)
                x = torch.from_numpy(extract_crop(volume, origin, crop, case.pad_value))[None, None].to(device)
                out = model(x)
                pred = out["coords"].float().cpu().numpy()[0]
                on = present > 0
                errors.extend((np.linalg.norm(pred[on] - coords[on], axis=1) * spacing).tolist())
                centre_errors.extend((np.linalg.norm(centre - coords[on], axis=1) * spacing).tolist())
                if out.get("logits") is not None:
                    p = torch.sigmoid(out["logits"].float()).cpu().numpy()[0]
                    hits += int((p[on] >= thr).sum())
                    fp += int((p[~on] >= thr).sum())
                present_n += int(on.sum())
                absent_n += int((~on).sum())
    nan = float("nan")
    return {
        "crop_recall": hits / present_n if present_n else nan,
        "crop_false_positive_rate": fp / absent_n if absent_n else nan,
        "crop_loc_error_mm": float(np.mean(errors)) if errors else nan,
        "crop_loc_error_median_mm": float(np.median(errors)) if errors else nan,
        "crop_centre_error_mm": float(np.mean(centre_errors)) if centre_errors else nan,
    }


@dataclass
class Diagnosis:
    """:func:`diagnose_cases`: the flat ``figures``, and per decoder the per-case rows of the
    ``shipped`` variant (what inference gives), ``[(case, [VertebraRow, ...]), ...]``;
    ``infer_s_per_case``: seconds of the network and the configured decoder per case."""

    figures: dict[str, float]
    case_rows: dict[str, list]
    infer_s_per_case: float


def diagnose(
    model: torch.nn.Module,
    cfg: Config,
    cases: list[CachedCase],
    prior=None,
    near_mm: float = NEAR_MM,
    crops_per_case: int = 4,
    decoders: Sequence[str] = DECODERS,
) -> dict[str, float]:
    """The decomposition of the module docstring for ``model`` (config ``cfg``) on ``cases``.

    ``prior``: the checkpoint's spine prior (``None``: the population prior).
    Returns the flat figures (NaN where nothing could be measured).
    """
    return diagnose_cases(model, cfg, cases, prior, near_mm, crops_per_case, decoders).figures


def diagnose_cases(
    model: torch.nn.Module,
    cfg: Config,
    cases: list[CachedCase],
    prior=None,
    near_mm: float = NEAR_MM,
    crops_per_case: int = 4,
    decoders: Sequence[str] = DECODERS,
) -> Diagnosis:
    """:func:`diagnose` with the per-case rows of every decoder (see :class:`Diagnosis`)."""
    from vertstudy.infer.decoders import decode_votes
    from vertstudy.infer.tiling import run_network, tile_origins
    from vertstudy.infer.votes import tile_votes

    crop = tuple(int(c) for c in cfg.data.crop.crop_size)
    rows: dict[tuple[str, str], list] = {(v, d): [] for v in VARIANTS for d in decoders}
    case_rows: dict[str, list] = {d: [] for d in decoders}
    tiles_used = {v: 0 for v in VARIANTS}
    infer_s = 0.0
    for case in cases:
        spacing = case.geometry.spacing_mm
        volume = np.asarray(case.volume(mmap=False), dtype=np.float32)
        t0 = time.perf_counter()
        origins = tile_origins(volume.shape, crop, cfg.infer.stride)
        body = cfg.infer.body_fraction if cfg.infer.skip_empty_tiles else None
        tiles = run_network(model, volume, case.pad_value, crop, origins, cfg.infer.batch_size, body)
        infer_s += time.perf_counter() - t0
        near = near_tiles(case, tiles.origins, crop, near_mm)
        truth = truth_mm(case)
        oracle = type(tiles)(tiles.origins, tiles.coords, oracle_probs(case, tiles.origins, crop), tiles.skipped)
        variants = {"shipped": tiles, "near": tiles.subset(near), "oracle": oracle, "both": oracle.subset(near)}
        for name, t in variants.items():
            tiles_used[name] += len(t.origins)
            votes = tile_votes(t, crop, cfg.infer.threshold, volume.shape)
            for dec in decoders:
                infer = cfg.infer.model_copy(update={"decoder": dec})
                t0 = time.perf_counter()
                classes = decode_votes(votes, t, crop, infer, spacing, prior)
                if name == "shipped" and dec == cfg.infer.decoder:
                    infer_s += time.perf_counter() - t0
                pred = {k: r.centre_zyx * spacing for k, r in classes.items()}
                matched = match_case(pred, truth)
                rows[(name, dec)].extend(matched)
                if name == "shipped":
                    case_rows[dec].append((case, matched))
    n = max(len(cases), 1)
    out: dict[str, float] = {}
    for (name, dec), rs in rows.items():
        s = summarize(rs)
        out[f"{name}_{dec}_id_rate"] = float(s["id_rate"])
        out[f"{name}_{dec}_loc_error_mm"] = float(s["loc_error_mm_mean"])
        out[f"{name}_{dec}_false_per_case"] = float(s["n_false"]) / n
    for name in VARIANTS:
        out[f"{name}_tiles_per_case"] = tiles_used[name] / n
    out.update(crop_view(model, cfg, cases, crops_per_case))
    return Diagnosis(out, case_rows, infer_s / n)


def format_decomposition(figures: dict, decoders: Sequence[str] = DECODERS, prefix: str = "") -> str:
    """The decomposition as a Markdown table: one row per variant, id rate / error per decoder."""
    decoders = [d for d in decoders if f"{prefix}shipped_{d}_id_rate" in figures]
    head = "| inference | " + " | ".join(f"{d} id rate | {d} mean error | {d} false / case" for d in decoders)
    lines = [head + " | tiles / case |", "|---" * (1 + 3 * len(decoders) + 1) + "|"]
    label = {
        "shipped": "as shipped",
        "near": "only tiles near the true spine",
        "oracle": "classifier replaced by the truth",
        "both": "both",
    }
    for v in VARIANTS:
        cells = []
        for d in decoders:
            cells += [
                f"{100 * figures[f'{prefix}{v}_{d}_id_rate']:.1f} %",
                f"{figures[f'{prefix}{v}_{d}_loc_error_mm']:.1f} mm",
                f"{figures[f'{prefix}{v}_{d}_false_per_case']:.1f}",
            ]
        lines.append(f"| {label[v]} | " + " | ".join(cells) + f" | {figures[f'{prefix}{v}_tiles_per_case']:.0f} |")
    lines.append("")
    lines.append(
        f"Spine-centred crops: recall {100 * figures[prefix + 'crop_recall']:.1f} %, false positives "
        f"{100 * figures[prefix + 'crop_false_positive_rate']:.1f} %, localization error of present vertebrae "
        f"{figures[prefix + 'crop_loc_error_mm']:.1f} mm (median {figures[prefix + 'crop_loc_error_median_mm']:.1f}; "
        f"crop centre: {figures[prefix + 'crop_centre_error_mm']:.1f} mm)."
    )
    return "\n".join(lines)


def diagnose_checkpoint(checkpoint, data_dir, cache_dir, fmt: str = "auto", device: str = "auto",
                        near_mm: float = NEAR_MM, progress: bool = False) -> dict:
    """``vertstudy diagnose``: prepare the cases under ``data_dir`` (with landmarks) into
    ``cache_dir`` at the checkpoint's preprocessing, then :func:`diagnose` them.

    Returns the figures plus ``checkpoint``, ``cases`` and ``vertebrae``. Raises ``InputError``
    naming the checkpoint or the folder when either is unusable or no case has landmarks.
    """
    from pathlib import Path

    from vertstudy.data.prepare import prepare_dataset
    from vertstudy.errors import InputError
    from vertstudy.model.load import load_checkpoint_model
    from vertstudy.model.prior import load_spine_prior

    checkpoint, data_dir = Path(checkpoint), Path(data_dir)
    model, cfg = load_checkpoint_model(checkpoint, device)
    if not data_dir.is_dir():
        raise InputError(data_dir, "not a folder; expected a folder of CTs with landmark files")
    result = prepare_dataset(data_dir, Path(cache_dir), fmt=fmt, prep=cfg.data.prep, progress=progress)
    cases = [c for c in sorted(result.cases, key=lambda c: c.case_id) if len(c.indices)]
    if not cases:
        raise InputError(data_dir, "no case with landmarks; the decomposition needs the true centroids")
    figures = diagnose(model, cfg, cases, load_spine_prior(checkpoint), near_mm=near_mm)
    return {"checkpoint": str(checkpoint), "cases": len(cases),
            "vertebrae": int(sum(len(c.indices) for c in cases)), **figures}
