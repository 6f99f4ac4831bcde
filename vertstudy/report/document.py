"""The report as a document: each section's blocks (see :mod:`vertstudy.report.render`) built
from the computed tables, and ``tables.tex``.

Number formats: identification rates in % and errors in mm, one decimal; a figure of a table row
reads ``value ± std over seeds [bootstrap 95% interval]`` (parts left out when undefined); a
dash marks a missing value.
"""

from __future__ import annotations

import math
import re

import numpy as np

from vertstudy.report import figures, published
from vertstudy.report.ablation import Choice, TableResult, baseline_rows, status_counts
from vertstudy.report.cost import cost_json, study_cost
from vertstudy.report.direction import direction_text, verdict_text
from vertstudy.report.load import Tables
from vertstudy.report.render import Block, Bullets, Heading, Image, Para, Table, latex_table
from vertstudy.report.robustness import GALLERY, condition_table, worst_cases
from vertstudy.report.search import TOP, SearchSummary, search_summary, short_name
from vertstudy.report.stats import Estimate

DASH = "—"
CONVENTION = ("Each of our figures reads **value ± std over seeds [bootstrap 95% interval over held-out cases]**: "
              "the value pools every vertebra row of the row's trials; the ± is the sample std of the same figure "
              "computed per trial (one per seed; absent with one trial); the interval resamples the held-out cases "
              "1000 times (seed 0). Identification rates in %, errors in mm.")


# -- formatting ----------------------------------------------------------------------------
def num(x, scale: float = 1.0, digits: int = 1) -> str:
    """``x * scale`` with ``digits`` decimals, or a dash when missing / not finite."""
    if x is None or not isinstance(x, (int, float, np.number)) or not math.isfinite(float(x)):
        return DASH
    return f"{float(x) * scale:.{digits}f}"


def est(e: Estimate | None, scale: float = 1.0) -> str:
    """``value ± seed sd [ci lo, ci hi]``, leaving out what is missing."""
    if e is None or not math.isfinite(e.value):
        return DASH
    text = num(e.value, scale)
    if math.isfinite(e.seed_sd):
        text += f" ± {num(e.seed_sd, scale)}"
    if all(math.isfinite(v) for v in e.ci95):
        text += f" [{num(e.ci95[0], scale)}, {num(e.ci95[1], scale)}]"
    return text


def value_text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "study"


# -- sections ------------------------------------------------------------------------------
# Each section function returns its blocks and its part of report.json; ``draw(name, fn, *args)``
# writes a figure ``fn(path, *args)`` under figures/ and returns its relative path.
def status_section(tables: Tables) -> tuple[list[Block], dict]:
    t = tables.trials
    blocks: list[Block] = [Heading(2, "Trials")]
    rows, status = [], {}
    for study in tables.studies:
        c = status_counts(t[t["study"] == study])
        status[study] = c | {"total": int(sum(c.values()))}
        rows.append([study, str(sum(c.values())), *(str(c[s]) for s in ("completed", "pruned", "error", "diverged"))])
    total = status_counts(t)
    status["all"] = total | {"total": int(sum(total.values()))}
    if len(tables.studies) > 1:
        rows.append(["**all**", str(sum(total.values())), *(str(total[s]) for s in
                                                              ("completed", "pruned", "error", "diverged"))])
    blocks.append(Table(["Study", "Trials", "Completed", "Pruned", "Error", "Diverged"], rows,
                        caption="Ended trials by status (running trials are not in the tables yet). Pruned trials "
                                "were stopped early by the scheduler and have no held-out evaluation; error and "
                                "diverged trials are counted here and left out of every figure."))
    if not len(t):
        blocks.append(Para("No trial has ended in these studies yet: the tables below are empty.", "missing"))
    bad = t[t["status"].isin(("error", "diverged"))]
    if len(bad):
        items = [f"`{r['key']}` {r['status']}: {(r['message'] or 'no message').splitlines()[0][:160]}"
                 for _, r in bad.head(20).iterrows()]
        if len(bad) > 20:
            items.append(f"... and {len(bad) - 20} more (see trials.parquet)")
        blocks += [Para("Failed and diverged trials:"), Bullets(items)]
    return blocks, status


def _published_table(key: str) -> Table | None:
    """The paper's printed rows of table ``key``; None for Table V (the paper decodes with K-means only)."""
    if key not in published.TABLES:
        return None
    p = published.TABLES[key]
    return Table(list(p["columns"]), [list(r) for r in p["rows"]], caption=f"{published.LABEL}. Not our data.",
                 kind="published")


def _ours_table(r: TableResult) -> Table | None:
    if not r.rows:
        return None
    if r.key == "table1":
        cols = ["Localization head", "Mean (mm)", "Std (mm)", "Trials", "Cases", "Vertebrae"]
        rows = [[x["label"], est(x["figures"]["loc_error_mm_mean"]), est(x["figures"]["loc_error_mm_std"]),
                 str(x["figures"]["n_trials"]), str(x["figures"]["n_cases"]), str(x["figures"]["n_vertebrae"])]
                for x in r.rows]
    elif r.key == "table2":
        cols = ["Method", "mAP (%)", "Trials", "Cases"]
        rows = [[x["label"], est(x["figures"]["map"], 100), str(x["figures"]["n_trials"]), DASH] for x in r.rows]
    elif r.key == "table3":
        cols = ["Network", "Id. rate (%)", "VerSe id. rate (%)", "Mean (mm)", "Std (mm)", "Trials", "Cases",
                "Vertebrae"]
        rows = [[x["label"], est(x["figures"]["id_rate"], 100), est(x["figures"]["id_rate_verse"], 100),
                 est(x["figures"]["loc_error_mm_mean"]), est(x["figures"]["loc_error_mm_std"]),
                 str(x["figures"]["n_trials"]), str(x["figures"]["n_cases"]), str(x["figures"]["n_vertebrae"])]
                for x in r.rows]
    elif r.key == "table5":
        cols = ["Decoder", "Id. rate (%)", "Mean (mm)", "False / case", "Trials", "Cases"]
        rows = [[x["label"], est(x["figures"]["id_rate"], 100), est(x["figures"]["loc_error_mm"]),
                 est(x["figures"]["false_per_case"]), str(x["figures"]["n_trials"]), str(x["figures"]["n_cases"])]
                for x in r.rows]
    else:
        cols = ["Region", "Id. rate (%)", "VerSe id. rate (%)", "Mean (mm)", "Std (mm)", "Trials", "Cases",
                "Vertebrae", "Baseline id. rate (%)", "Baseline VerSe id. rate (%)", "Baseline mean (std) (mm)"]
        rows = []
        for x in r.rows:
            f, b = x["figures"], x["baseline"]
            base_id = est(b["id_rate"], 100) if b else DASH
            base_verse = est(b["id_rate_verse"], 100) if b else DASH
            base_err = (f"{num(b['loc_error_mm_mean'].value)} ({num(b['loc_error_mm_std'].value)})"
                        if b and math.isfinite(b["loc_error_mm_mean"].value) else DASH)
            rows.append([x["label"], est(f["id_rate"], 100), est(f["id_rate_verse"], 100), est(f["loc_error_mm_mean"]),
                         est(f["loc_error_mm_std"]), str(f["n_trials"]), str(f["n_cases"]), str(f["n_vertebrae"]),
                         base_id, base_verse, base_err])
    return Table(cols, rows, caption=_caption(r))


_ID_RULES = ("Id. rate by the paper's rule (the predicted centroid closest to a true vertebra is its own and "
             "< 20 mm away); VerSe id. rate by the VerSe benchmark's (the true centroid closest to the vertebra's "
             "prediction is its own, and the prediction < 20 mm away).")


def _caption(r: TableResult) -> str:
    what = {
        "table1": "Held-out whole-CT localization error of the localization-only network by localization head. "
                  "Vertebrae: true vertebra rows (trials x cases x classes in the truth).",
        "table2": "Multi-label classification mAP of the best epoch on the validation crops (whole-CT inference "
                  "gives centroids, not class scores, so there is no per-case mAP and no interval over cases: "
                  "value ± std over seeds).",
        "table3": "Held-out identification rate and localization error without and with the classification "
                  "branch. " + _ID_RULES,
        "table4": "Held-out identification rate and localization error, overall and per region, of the chosen "
                  "configuration; beside it the mean-position baseline (each class's mean training position) on "
                  "the same cases [bootstrap 95% interval]. " + _ID_RULES,
        "table5": "Held-out whole-CT identification rate, mean localization error and false predictions per case "
                  "(predicted classes absent from the truth) of the chosen configuration's checkpoints, each "
                  "labelled by the paper's per-class K-means and by the sequence decoder: mean ± std over the "
                  "trials (one per seed) of each trial's figure on all its held-out cases; no interval over "
                  "cases (the vertebra rows hold the configured decoder's labels only); cases: held-out cases "
                  "per trial. Not in the paper.",
    }[r.key]
    return " ".join([f"**Table {r.number} (ours).** {what}", *r.notes])


def tables_section(results: list[TableResult]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Tables I-V"), Para(CONVENTION, "note"),
                           Para(f"{published.NOTE} They stand in separate, shaded tables and enter no "
                                "computation. Table V (decoders) is ours alone.", "note")]
    judged = [r for r in results if r.direction is not None]
    if judged:
        blocks.append(Para("**The paper's directions on these data** (each table's paragraph gives the differences, "
                           "their 95% intervals over held-out cases and the seeds; *holds*: the interval excludes "
                           "no difference; *not sure*: it leans the paper's way, but the interval reaches zero or "
                           "beyond):"))
        blocks.append(Bullets([f"Table {r.number}: {r.direction.claim}: **{verdict_text(r.direction)}**"
                               for r in judged]))
    for r in results:
        blocks.append(Heading(3, f"Table {r.number}. {r.title}"))
        if r.missing:
            blocks.append(Para(f"**Missing trials.** {r.missing}", "missing"))
        ours = _ours_table(r)
        if ours is not None:
            blocks.append(ours)
        elif r.notes:
            blocks.append(Para(" ".join(r.notes), "note"))
        if r.direction is not None:
            blocks.append(Para(direction_text(r.direction), "note"))
        published_rows = _published_table(r.key)
        if published_rows is not None:
            blocks.append(published_rows)
    return blocks


def latex(results: list[TableResult], date: str, studies: list[str]) -> str:
    head = [f"% vertstudy report of {', '.join(studies)} ({date}): Tables I-V.",
            "% Needs \\usepackage{booktabs} and \\usepackage{graphicx} (wide tables are shrunk to the line).",
            "% Our rows: value \\pm std over seeds [bootstrap 95% CI over cases];",
            "% published rows (Qin et al., CSI 2014 data set) in a separate tabular under each table.", ""]
    parts = []
    for r in results:
        ours = _ours_table(r)
        caption = f"Table {r.number}: {r.title}. " + _caption(r).split("** ", 1)[1]
        parts.append(latex_table(f"tab:vertstudy-{r.key}", caption, ours, _published_table(r.key), r.missing))
    return "\n".join(head) + "\n\n".join(parts) + "\n"


def search_section(tables: Tables, draw) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading(2, "Search summary")]
    found = {}
    for study in tables.studies:
        s = search_summary(tables.trials, study)
        found[study] = s.to_json()
        blocks.append(Heading(3, f"Study {study}"))
        if not len(s.history):
            blocks.append(Para(f"Study {study} has no ended trials yet.", "note"))
            continue
        blocks += _best_trials(s)
        safe = _safe(study)
        if s.importances:
            blocks.append(Para(s.importance_note, "note"))
            blocks.append(Table(["Parameter", "Importance"], [[f"`{k}`", f"{v:.3f}"] for k, v in
                                                              s.importances.items()]))
            src = draw(f"search-{safe}-importances.png", figures.importances, s.importances,
                       {p: short_name(p) for p in s.importances}, s.importance_target, study)
            blocks.append(Image(src, f"parameter importances of {study}"))
        else:
            blocks.append(Para(s.importance_note, "note"))
        src = draw(f"search-{safe}-history.png", figures.history, s.history, s.order_note, study)
        blocks.append(Image(src, f"optimization history of {study}",
                            "Validation figures of each trial (best epoch) and the best so far, "
                            f"{s.order_note}."))
        ranked = s.ranked
        if s.params and len(ranked) >= 2 and ranked["best_val_loc_error_mm"].notna().any():
            src = draw(f"search-{safe}-parallel.png", figures.parallel, ranked, s.params,
                       {p: short_name(p) for p in s.params}, study)
            blocks.append(Image(src, f"parallel coordinates of {study}",
                                "One line per ranked trial across its sampled parameters "
                                f"({', '.join(f'`{p}`' for p in s.params)}); colour: validation localization "
                                "error (mm)."))
        else:
            blocks.append(Para("Parallel coordinates skipped: fewer than 2 ranked trials with sampled parameters.",
                               "note"))
        with_epochs = [k for k in s.top_keys if (tables.epochs["key"] == k).any()] if len(tables.epochs) else []
        if with_epochs:
            labels = [f"#{i + 1}: {k.split('/', 1)[1]}" for i, k in enumerate(s.top_keys) if k in with_epochs]
            src = draw(f"search-{safe}-curves.png", figures.curves, tables.epochs, with_epochs, labels, study)
            blocks.append(Image(src, f"learning curves of the top trials of {study}",
                                "Validation loss and localization error per epoch of the top trials (rank by "
                                "the objective)."))
    return blocks, found


def _best_trials(s: SearchSummary) -> list[Block]:
    top = s.ranked.head(TOP)
    if not len(top):
        return [Para("No completed or pruned trial with validation figures to rank.", "note")]
    o = s.objective
    on = "CTs" if o.measured_on.startswith("whole") else "crops"
    cols = ["Rank", "Trial", "Status", f"Val. id. rate, {on} (%)", f"Val. error, {on} (mm)", "Held-out id. rate (%)",
            "Held-out error (mm)", *(f"`{p}`" for p in s.params)]
    rows = []
    for i, (_, r) in enumerate(top.iterrows()):
        rows.append([str(i + 1), f"`{r['trial_id']}`", r["status"], num(r.get(o.rate), 100),
                     num(r.get(o.error)), num(r["test_id_rate"], 100), num(r["test_loc_error_mm_mean"]),
                     *(value_text(r[f"param:{p}"]) for p in s.params)])
    return [Table(cols, rows, caption=f"Best trials of {len(s.ranked)} ranked by {o.describe()}. "
                                      "Held-out: whole-CT figures of completed trials; they take no part in the "
                                      "ranking.")]


def robustness_section(tables: Tables, choice: Choice, draw) -> tuple[list[Block], list[dict]]:
    blocks: list[Block] = [Heading(2, "Robustness by phantom condition")]
    if choice.signature is None or not len(choice.trials):
        return blocks + [Para("No chosen configuration (no completed trial with held-out results).", "note")], []
    rows = tables.vertebrae[tables.vertebrae["key"].isin(set(choice.trials["key"]))]
    base = baseline_rows(tables, sorted(choice.trials["study"].unique()), sorted(rows["case"].unique()))
    found = condition_table(rows, base)
    if not found:
        return blocks + [Para("The held-out cases carry no condition tags (fov, metal, curvature, noise): "
                              "robustness by condition needs phantom cases or tagged data.", "note")], []
    blocks.append(Table(
        ["Condition", "Value", "Cases", "Vertebrae", "Id. rate (%)", "Mean error (mm)", "Baseline id. rate (%)",
         "Baseline mean error (mm)"],
        [[r["tag"], r["value"], str(r["n_cases"]), str(r["n_vertebrae"]), num(r["id_rate"], 100),
          num(r["loc_error_mm_mean"]), num(r["baseline_id_rate"], 100), num(r["baseline_loc_error_mm_mean"])]
         for r in found],
        caption=f"Held-out figures of the chosen configuration's {len(choice.trials)} trial(s), pooled, by the "
                "condition tags of the cases (fov: field of view; metal: implants; curvature; noise), with the "
                "mean-position baseline on the same cases. Few cases per value: read as a pointer to failures, "
                "not as an estimate."))
    src = draw("robustness.png", figures.robustness, found)
    blocks.append(Image(src, "identification rate and error by condition"))
    return blocks, found


def gallery_section(tables: Tables, choice: Choice, draw) -> tuple[list[Block], list[dict]]:
    blocks: list[Block] = [Heading(2, "Failure gallery")]
    if choice.signature is None or not len(choice.trials):
        return blocks + [Para("No chosen configuration (no completed trial with held-out results).", "note")], []
    rows = tables.vertebrae[tables.vertebrae["key"].isin(set(choice.trials["key"]))]
    worst = worst_cases(rows, GALLERY)
    blocks.append(Table(
        ["Case", "Trial", "Identified", "Id. rate (%)", "Mean error (mm)", "Conditions"],
        [[f"`{w['case']}`", f"`{w['key']}`", f"{w['n_identified']}/{w['n_truth']}", num(w["id_rate"], 100),
          num(w["loc_error_mm_mean"]), ", ".join(f"{k}={v}" for k, v in w["conditions"].items()) or DASH]
         for w in worst],
        caption=f"The {len(worst)} worst held-out cases of the chosen configuration (lowest identification rate, "
                "ties by the higher mean error; each case once, with its worst trial)."))
    why = {"cases": "no `cases.parquet` (the sagittal and coronal views of the held-out cases)",
           "points": "no centroid columns (`true_*_mm`, `pred_*_mm`) in `vertebrae.parquet`"}
    lacking = [f"{s} has {' and '.join(why[k] for k in sorted(tables.lacks.get(s, set()) & set(why)))}"
               for s in sorted(set(w["study"] for w in worst)) if tables.lacks.get(s, set()) & set(why)]
    if lacking or not tables.has_points():
        blocks.append(Para(
            f"Pictures skipped: {'; '.join(lacking) or 'the vertebra rows have no centroid columns'}. These tables "
            "were written by an older vertstudy; a study run with the current version has both.", "note"))
        return blocks, worst
    for i, w in enumerate(worst):
        case = tables.cases[(tables.cases["study"] == w["study"]) & (tables.cases["case"] == w["case"])]
        if not len(case):
            blocks.append(Para(f"No view of case `{w['case']}` in {w['study']}'s cases.parquet.", "note"))
            continue
        mine = rows[(rows["key"] == w["key"]) & (rows["case"] == w["case"])]
        title = (f"{w['case']} ({w['key']}): {w['n_identified']}/{w['n_truth']} identified, mean error "
                 f"{num(w['loc_error_mm_mean'])} mm")
        src = draw(f"gallery-{i + 1}.png", figures.gallery, case.iloc[0].to_dict(), mine, title.replace(": ", "\n"))
        blocks.append(Image(src, f"failure case {w['case']}",
                            f"{title}. Circles: true centroids (green identified, orange not); red crosses: "
                            "predicted centroids; dashed: prediction to the truth of the same class. Sagittal and "
                            "coronal maximum-intensity slabs around the spine, canonical mm."))
    return blocks, worst


def cost_section(tables: Tables, draw) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading(2, "Cost")]
    costs = [study_cost(tables.trials, s) for s in tables.studies]
    rows = []
    for c in costs:
        n = c["counts"]
        best = c["best_error_mm"]
        rows.append([c["study"], str(c["trials"]), str(n["completed"]), str(n["pruned"]), str(n["error"]),
                     str(n["diverged"]), num(c["wall_h"], digits=3), num(c["cpu_h"], digits=3),
                     num(c["gpu_h"], digits=3), num(c["mean_trial_s"]),
                     f"{num(best)} ({c['series']['error_kind']})" if best is not None else DASH])
    blocks.append(Table(
        ["Study", "Trials", "Completed", "Pruned", "Error", "Diverged", "Trial wall (h)", "CPU (h)", "GPU (h)",
         "Mean trial (s)", "Best error (mm)"], rows,
        caption="Trial wall time summed over trials; CPU and GPU hours weight each trial's wall time by the CPUs "
                "and GPUs it held (a dash: the tables predate the resources columns). Best error: the lowest "
                "held-out mean localization error of a completed trial (validation when none has one)."))
    no_res = [s for s in tables.studies if "resources" in tables.lacks.get(s, set())]
    if no_res:
        blocks.append(Para(f"No per-trial resources in the tables of {', '.join(no_res)}: compute is shown as "
                           "trial wall hours.", "note"))
    if any(c["trials"] for c in costs):
        src = draw("cost.png", figures.cost, [c for c in costs if c["trials"]])
        blocks.append(Image(src, "best error against compute",
                            "Best error reached so far against the compute spent, trials in start order "
                            "(trial-id order for tables without start times)."))
    return blocks, {c["study"]: cost_json(c) for c in costs}


def definitions() -> list[Block]:
    return [Heading(2, "Definitions"), Bullets([
        "**Localization error**: distance (mm) between a predicted centroid and the true centroid of the same "
        "class, over the vertebrae in the truth that were predicted; mean and population std.",
        "**Identification rate**: identified / vertebrae in the truth; a vertebra is identified when the closest "
        "predicted centroid is of its class and less than 20 mm away (paper III-C).",
        "**Held-out**: whole-CT inference of each trial's best checkpoint on the study's test cases "
        "(`vertebrae.parquet`); **validation**: the trainer's per-epoch figures on fixed validation crops.",
        "**Seeds and cases**: ± is the sample std over trials (seeds) of the per-trial figure; the bracket is a "
        "bootstrap 95% percentile interval over held-out cases (1000 resamples, numpy default_rng(0)).",
        "**Comparable trials**: a table's rows differ only in the ablated field and the seed; run-only fields "
        "(device, workers, mixed precision, inference batch size) are ignored.",
    ])]


