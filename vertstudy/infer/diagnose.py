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

The decoder sweep (:func:`sweep_decoders`, ``vertstudy diagnose --sweep``) reuses the same
single network pass per case to label the cases under every combination of the inference
fields that act after the network (:data:`SWEEP_FIELDS`: vote threshold, decoder, K-means vote
threshold and centre weight, the sequence decoder's radius, score and spacing weight): how the
K-means setting ``infer.kmeans_threshold`` 0.9 / ``kmeans_centre_weight`` 8 was chosen, on
training and validation phantoms, never on the held-out ones.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vertstudy.config import Config, InferConfig
from vertstudy.data.cache import CachedCase
from vertstudy.data.crops import crop_targets, extract_crop, spine_curve, validation_origins
from vertstudy.errors import ConfigError
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
    from vertstudy.infer.tiling import tile_volume
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
        tiles = tile_volume(model, volume, case.pad_value, crop, cfg.infer)
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


#: the inference fields a decoder sweep varies: they act on the network's outputs (votes and
#: decoding), so one pass of the network over a case serves every combination
SWEEP_FIELDS = ("decoder", "threshold", "min_votes", "centre_weight", "kmeans_threshold", "kmeans_centre_weight",
                "seq_radius_mm", "seq_min_score", "seq_pair_weight")
#: the most combinations one sweep decodes
MAX_SWEEP = 1000


def sweep_configs(infer: InferConfig, grid: dict[str, Sequence]) -> list[tuple[dict, InferConfig]]:
    """Every combination of ``grid`` (field of :data:`SWEEP_FIELDS`, with or without ``infer.``,
    -> values) as ``(combination, infer with it)``, in the grid's order. Raises ``ConfigError``
    naming the field and value that is not accepted, or a grid of more than :data:`MAX_SWEEP`."""
    from vertstudy.config import validated

    fields = {}
    for key, values in grid.items():
        name = key.removeprefix("infer.")
        if name not in SWEEP_FIELDS:
            raise ConfigError(f"--sweep {key}: a sweep varies only inference fields that act after the network (one "
                              f"pass of it serves every combination); accepted: "
                              f"{', '.join('infer.' + f for f in SWEEP_FIELDS)}")
        if not values:
            raise ConfigError(f"--sweep {key}: no value given; e.g. --sweep infer.{name}=A,B,C")
        fields[name] = list(values)
    combos = [dict(zip(fields, vals)) for vals in itertools.product(*fields.values())]
    if len(combos) > MAX_SWEEP:
        raise ConfigError(f"--sweep: {len(combos)} combinations; at most {MAX_SWEEP} (fewer values per field)")
    base = infer.model_dump()
    return [(c, validated(InferConfig, "--sweep", **{**base, **c})) for c in combos]


def sweep_decoders(model: torch.nn.Module, cfg: Config, cases: list[CachedCase], grid: dict[str, Sequence],
                   prior=None, progress: bool = False) -> list[dict]:
    """Label ``cases`` whole once per combination of inference fields in ``grid`` (see
    :func:`sweep_configs`; the rest as in ``cfg.infer``), the network run once per case, and
    score each in canonical mm (:func:`vertstudy.train.metrics.match_case`). Returns one row per
    combination: its fields (``infer.`` names), ``id_rate`` (0-1), ``loc_error_mm``,
    ``false_per_case`` and ``as_configured`` (the combination is the checkpoint's own
    setting), best first (highest id rate, then lowest error). Choose on cases the figures you
    report never saw (training or validation CTs), as an issue would choose a hyperparameter."""
    from vertstudy.infer.decoders import decode_votes
    from vertstudy.infer.tiling import tile_volume
    from vertstudy.infer.votes import tile_votes
    from vertstudy.progress import progress_counter

    configs = sweep_configs(cfg.infer, grid)
    crop = tuple(int(c) for c in cfg.data.crop.crop_size)
    rows: list[list] = [[] for _ in configs]
    with progress_counter(progress, len(cases), f"decoding {len(configs)} ways") as advance:
        for case in cases:
            spacing = case.geometry.spacing_mm
            volume = np.asarray(case.volume(mmap=False), dtype=np.float32)
            tiles = tile_volume(model, volume, case.pad_value, crop, cfg.infer)
            truth = truth_mm(case)
            votes_at: dict[float, object] = {}
            for i, (_, infer) in enumerate(configs):
                if infer.threshold not in votes_at:
                    votes_at[infer.threshold] = tile_votes(tiles, crop, infer.threshold, volume.shape)
                classes = decode_votes(votes_at[infer.threshold], tiles, crop, infer, spacing, prior)
                rows[i].extend(match_case({k: r.centre_zyx * spacing for k, r in classes.items()}, truth))
            advance()
    n = max(len(cases), 1)
    out = []
    for (combo, _), rs in zip(configs, rows):
        s = summarize(rs)
        own = all(getattr(cfg.infer, k) == v for k, v in combo.items())
        out.append({**{f"infer.{k}": v for k, v in combo.items()}, "id_rate": float(s["id_rate"]),
                    "loc_error_mm": float(s["loc_error_mm_mean"]), "false_per_case": float(s["n_false"]) / n,
                    "as_configured": own})
    return sorted(out, key=lambda r: (-np.nan_to_num(r["id_rate"], nan=-1.0), np.nan_to_num(r["loc_error_mm"],
                                                                                               nan=np.inf)))


def format_sweep(rows: list[dict]) -> str:
    """The sweep's rows as a Markdown table, best first; ``*`` marks the checkpoint's own setting."""
    fields = [k for k in rows[0] if k.startswith("infer.")] if rows else []
    lines = ["| " + " | ".join([*fields, "id rate", "mean error", "false / case", ""]) + " |",
             "|---" * (len(fields) + 4) + "|"]
    for r in rows:
        cells = [("null" if r[f] is None else f"{r[f]:g}" if isinstance(r[f], float) else str(r[f])) for f in fields]
        cells += [f"{100 * r['id_rate']:.1f} %", f"{r['loc_error_mm']:.2f} mm", f"{r['false_per_case']:.2f}",
                  "* as configured" if r["as_configured"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepared_cases(cfg: Config, data_dir, cache_dir, fmt: str = "auto", progress: bool = False) -> list[CachedCase]:
    """The cases under ``data_dir`` that have landmarks, prepared into ``cache_dir`` at the
    preprocessing of ``cfg`` (a checkpoint's), by case id. Raises ``InputError`` naming the folder
    when it is not one or no case has landmarks."""
    from pathlib import Path

    from vertstudy.data.prepare import prepare_dataset
    from vertstudy.errors import InputError

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "not a folder; expected a folder of CTs with landmark files")
    result = prepare_dataset(data_dir, Path(cache_dir), fmt=fmt, prep=cfg.data.prep, progress=progress)
    cases = [c for c in sorted(result.cases, key=lambda c: c.case_id) if len(c.indices)]
    if not cases:
        raise InputError(data_dir, "no case with landmarks; scoring needs the true centroids")
    return cases


def diagnose_checkpoint(checkpoint, data_dir, cache_dir, fmt: str = "auto", device: str = "auto",
                        near_mm: float = NEAR_MM, progress: bool = False, sweep: dict | None = None) -> dict:
    """``vertstudy diagnose``: prepare the cases under ``data_dir`` (with landmarks) into
    ``cache_dir`` at the checkpoint's preprocessing (:func:`prepared_cases`), then
    :func:`diagnose` them, or with ``sweep`` (field -> values) :func:`sweep_decoders` instead.

    Returns the figures (or ``sweep``: the sweep's rows) plus ``checkpoint``, ``cases`` and
    ``vertebrae``. Raises ``InputError`` naming the checkpoint or the folder when either is
    unusable, and ``ConfigError`` for a bad ``sweep`` before any case is prepared.
    """
    from pathlib import Path

    from vertstudy.model.load import load_checkpoint_model
    from vertstudy.model.prior import load_spine_prior

    checkpoint = Path(checkpoint)
    model, cfg = load_checkpoint_model(checkpoint, device)
    if sweep is not None:
        sweep_configs(cfg.infer, sweep)  # a bad field or value fails before the cases are prepared
    cases = prepared_cases(cfg, data_dir, cache_dir, fmt, progress)
    head = {"checkpoint": str(checkpoint), "cases": len(cases), "vertebrae": int(sum(len(c.indices) for c in cases))}
    if sweep is not None:
        return {**head, "sweep": sweep_decoders(model, cfg, cases, sweep, load_spine_prior(checkpoint), progress)}
    return {**head, **diagnose(model, cfg, cases, load_spine_prior(checkpoint), near_mm=near_mm)}
