"""Where identification is lost, and what the decoder contributes: two report sections built
from the trials table alone.

Every trial's held-out evaluation (:func:`vertstudy.study.trial.evaluate_held_out`) writes

- ``test_diag_<variant>_<decoder>_{id_rate, loc_error_mm, false_per_case}``,
  ``test_diag_<variant>_tiles_per_case`` and ``test_diag_crop_*``: the decomposition of
  :mod:`vertstudy.infer.diagnose` (every tile or only tiles near the true spine, the
  classifier or the truth's classes);
- ``test_dec_<decoder>_{id_rate, loc_error_mm, false_per_case, cases}[_fov_<value>]``: each
  decoder's held-out figures, overall and per field-of-view condition.

Both sections, and Table V (:func:`decoder_table`: the two decoders overall, with their paired
difference), read the chosen configuration's trials (Table IV's choice): a figure is the mean
over those trials (one per seed), ``± std`` over them when there are several. Studies written
before these columns existed get a one-line note instead.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vertstudy.report.ablation import TABLE4_FILE, Choice, TableResult, config_of, describe
from vertstudy.report.render import Block, Heading, Para, Table
from vertstudy.report.stats import Estimate, seed_spread

#: as in :mod:`vertstudy.infer.diagnose` (not imported: reports need no torch)
VARIANTS = ("shipped", "near", "oracle", "both")
DECODERS = ("kmeans", "sequence")
DASH = "—"
LABELS = {
    "shipped": "as shipped (every tile, the classifier)",
    "near": "only tiles within 40 mm of the true spine",
    "oracle": "classifier replaced by the truth",
    "both": "both",
}
DECODER_NAMES = {"kmeans": "K-means (paper)", "sequence": "sequence"}
FOV_ORDER = ("full", "long", "short")


def _mean_sd(values: pd.Series, scale: float = 1.0) -> tuple[float, float]:
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float) * scale
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def cell(trials: pd.DataFrame, column: str, scale: float = 1.0) -> str:
    """``mean ± sd`` of ``column`` over ``trials`` with one decimal, or a dash."""
    if column not in trials:
        return DASH
    mean, sd = _mean_sd(trials[column], scale)
    if not math.isfinite(mean):
        return DASH
    return f"{mean:.1f}" + (f" ± {sd:.1f}" if math.isfinite(sd) else "")


def _have(trials: pd.DataFrame, prefix: str) -> bool:
    return any(c.startswith(prefix) and trials[c].notna().any() for c in trials.columns)


def loss_section(choice: Choice) -> tuple[list[Block], dict]:
    """"Where identification is lost": the decomposition of the chosen configuration."""
    blocks: list[Block] = [Heading(2, "Where identification is lost")]
    trials = choice.trials
    if choice.signature is None or not len(trials) or not _have(trials, "test_diag_"):
        return blocks + [Para("No decomposition in these tables (no chosen configuration, or trials evaluated "
                              "before vertstudy wrote one).", "note")], {}
    decoders = [d for d in DECODERS if f"test_diag_shipped_{d}_id_rate" in trials]
    header = ["Inference"]
    for d in decoders:
        header += [f"{DECODER_NAMES[d]} id. rate (%)", f"{DECODER_NAMES[d]} mean error (mm)",
                   f"{DECODER_NAMES[d]} false / case"]
    header.append("Tiles / case")
    rows, js = [], {}
    for v in VARIANTS:
        row = [LABELS[v]]
        for d in decoders:
            row += [cell(trials, f"test_diag_{v}_{d}_id_rate", 100), cell(trials, f"test_diag_{v}_{d}_loc_error_mm"),
                    cell(trials, f"test_diag_{v}_{d}_false_per_case")]
            js[f"{v}_{d}"] = {k: _mean_sd(trials.get(f"test_diag_{v}_{d}_{k}", pd.Series(dtype=float)))[0]
                              for k in ("id_rate", "loc_error_mm", "false_per_case")}
        row.append(cell(trials, f"test_diag_{v}_tiles_per_case"))
        rows.append(row)
    blocks.append(Table(header, rows, caption=(
        f"The chosen configuration's held-out cases ({len(trials)} trial(s); ± std over them), labelled four "
        "ways: each row replaces one stage by the truth. The gap from 'as shipped' to 'only tiles near the spine' "
        "is lost in tiles away from the spine; to 'classifier replaced by the truth', in the classifier; what "
        "'both' still misses is lost in localization and decoding. False / case: predicted classes absent "
        "from the truth.")))
    crop = {k: cell(trials, f"test_diag_crop_{k}", s) for k, s in
            (("recall", 100), ("false_positive_rate", 100), ("loc_error_mm", 1), ("loc_error_median_mm", 1),
             ("centre_error_mm", 1))}
    blocks.append(Para(
        f"On crops centred on the spine of the same cases: recall {crop['recall']} %, false positives "
        f"{crop['false_positive_rate']} % of the absent classes, localization error of present vertebrae "
        f"{crop['loc_error_mm']} mm (median {crop['loc_error_median_mm']} mm; always predicting the crop centre: "
        f"{crop['centre_error_mm']} mm)."))
    js["crop"] = {k: _mean_sd(trials.get(f"test_diag_crop_{k}", pd.Series(dtype=float)))[0]
                  for k in ("recall", "false_positive_rate", "loc_error_mm", "loc_error_median_mm", "centre_error_mm")}
    return blocks, js


def decoder_section(choice: Choice) -> tuple[list[Block], dict]:
    """"K-means (paper) versus sequence decoding": both decoders on the same checkpoints,
    overall and per field-of-view condition."""
    blocks: list[Block] = [Heading(2, "K-means (paper) versus sequence decoding")]
    trials = choice.trials
    if choice.signature is None or not len(trials) or not _have(trials, "test_dec_"):
        return blocks + [Para("No per-decoder figures in these tables (no chosen configuration, or trials "
                              "evaluated before vertstudy wrote them).", "note")], {}
    decoders = [d for d in DECODERS if f"test_dec_{d}_id_rate" in trials]
    fovs = [f for f in FOV_ORDER if f"test_dec_{decoders[0]}_id_rate_fov_{f}" in trials]
    header = ["Cases", "N"]
    for d in decoders:
        header += [f"{DECODER_NAMES[d]} id. rate (%)", f"{DECODER_NAMES[d]} mean error (mm)",
                   f"{DECODER_NAMES[d]} false / case"]
    rows, js = [], {}
    for suffix, label in [("", "all held-out"), *((f"_fov_{f}", f"fov = {f}") for f in fovs)]:
        cases = _mean_sd(trials.get(f"test_dec_{decoders[0]}_cases{suffix}", pd.Series(dtype=float)))[0]
        row = [label, f"{cases:.0f}" if math.isfinite(cases) else DASH]
        for d in decoders:
            row += [cell(trials, f"test_dec_{d}_id_rate{suffix}", 100),
                    cell(trials, f"test_dec_{d}_loc_error_mm{suffix}"),
                    cell(trials, f"test_dec_{d}_false_per_case{suffix}")]
            js[f"{d}{suffix}"] = {k: _mean_sd(trials.get(f"test_dec_{d}_{k}{suffix}", pd.Series(dtype=float)))[0]
                                  for k in ("id_rate", "loc_error_mm", "false_per_case")}
        rows.append(row)
    blocks.append(Table(header, rows, caption=(
        f"The same checkpoints (the chosen configuration's {len(trials)} trial(s); ± std over them) decoded by the "
        "paper's per-class K-means and by the sequence decoder (one centroid per class in anatomical order with "
        "a spacing prior fitted on the training split). N: held-out cases per trial. Short views (2-4 levels) "
        "have few anchors. False / case counts predicted classes absent from the truth, which neither the id. "
        "rate nor the error counts against.")))
    return blocks, js


def _per_trial(trials: pd.DataFrame, column: str) -> list[float]:
    if column not in trials:
        return []
    return [float(v) for v in pd.to_numeric(trials[column], errors="coerce") if math.isfinite(v)]


def _estimate(values: list[float]) -> Estimate:
    return Estimate(float(np.mean(values)) if values else math.nan, seed_spread(values))


def decoder_table(choice: Choice) -> TableResult:
    """Table V: the chosen configuration's checkpoints decoded by the paper's K-means and by the
    sequence decoder, on all held-out cases: each decoder's identification rate, localization
    error and false predictions per case (mean ± std over the trials), and the per-trial paired
    difference sequence - K-means (``extra["paired"]``)."""
    result = TableResult("table5", "V", "K-means (paper) versus sequence decoding of the same checkpoints",
                         extra={"study_file": TABLE4_FILE})
    trials = choice.trials
    chosen = choice.signature is not None and len(trials) > 0
    decoders = [d for d in DECODERS if chosen and _per_trial(trials, f"test_dec_{d}_id_rate")]
    if not decoders:
        result.missing = ("No chosen configuration with per-decoder held-out figures (trials evaluated before "
                          f"vertstudy wrote `test_dec_*`, or none completed). `vertstudy study run {TABLE4_FILE}` "
                          "fills it.")
        return result
    for d in decoders:
        figures = {k: _estimate(_per_trial(trials, f"test_dec_{d}_{k}"))
                   for k in ("id_rate", "loc_error_mm", "false_per_case")}
        cases = _per_trial(trials, f"test_dec_{d}_cases")
        figures |= {"n_trials": len(_per_trial(trials, f"test_dec_{d}_id_rate")),
                    "n_cases": int(round(float(np.mean(cases)))) if cases else 0}
        result.rows.append({"value": d, "label": DECODER_NAMES[d], "figures": figures})
    result.trials = sorted(trials["key"])
    if set(decoders) == {"kmeans", "sequence"}:
        paired, n = {}, 0
        for k in ("id_rate", "loc_error_mm"):
            seq, km = (pd.to_numeric(trials[f"test_dec_{d}_{k}"], errors="coerce") for d in ("sequence", "kmeans"))
            diff = [float(v) for v in seq - km if math.isfinite(v)]
            paired[k], n = _estimate(diff), max(n, len(diff))
        result.extra["paired"] = paired
        rate, err = paired["id_rate"], paired["loc_error_mm"]
        if math.isfinite(rate.value) and math.isfinite(err.value):
            sd_rate = f" ± {rate.seed_sd * 100:.1f}" if math.isfinite(rate.seed_sd) else ""
            sd_err = f" ± {err.seed_sd:.1f}" if math.isfinite(err.seed_sd) else ""
            result.notes.append(f"Paired over the same {n} checkpoint(s), sequence - K-means: id. rate "
                                f"{rate.value * 100:+.1f}{sd_rate} points, mean error {err.value:+.1f}{sd_err} mm.")
        else:
            result.notes.append("No paired difference: a decoder left some checkpoint without a matched vertebra.")
    result.notes.append(f"Configuration (Table IV's): {describe(config_of(choice.signature))}.")
    return result

