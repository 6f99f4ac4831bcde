"""The paper's Tables I-IV from the trials of one or more studies.

**Controlled grouping (Tables I-III).** A table ablates one config field (``model.loc_head``,
``model.classifier``, ``model.tasks``). Its rows' trials may differ from each other only in that
field and the seed: every completed trial gets a *signature*, all its ``cfg.*`` values except
the ablated field, the seed and the run-only fields (:data:`RUN_ONLY`: device, DataLoader
workers, mixed precision, inference batch size), and the table takes the trials of the
signature that covers the most values of the field (tie: most trials, then the signature's
text, so the choice is deterministic). Completed trials of other signatures are counted as
"left out, not comparable"; pruned, failed (``error``) and ``diverged`` trials of the chosen
signature are counted as "not in the figures" (a diverged trial's held-out rows describe a
network whose weights became non-finite, so they would only measure the divergence).

**Table IV** reports the *chosen configuration*: the signature (all ``cfg.*`` except seed and
run-only fields) whose completed trials have the highest mean validation identification rate
(the best epoch's: on whole validation CTs when every candidate trial labelled them,
``best_val_ct_id_rate``, else on validation crops, ``best_val_id_rate``; see
:func:`vertstudy.study.objective.comparison_objective`), ties broken by the lower mean
validation error of the same kind, then more trials. Held-out test figures never take part in
the choice. ``--chosen TRIAL`` picks that trial's configuration instead.

Figures: see :mod:`vertstudy.report.stats`. Table II's mAP has no per-case rows (whole-CT
inference yields points, not class scores), so it is the mean of the trials' ``best_val_map``
(validation crops) with its spread over seeds, and no interval over cases.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vertstudy.errors import ConfigError
from vertstudy.report.direction import Direction, table_direction
from vertstudy.report.load import Tables
from vertstudy.report.stats import REGIONS, Estimate, bootstrap, clean, estimates, estimates_json, pooled, seed_spread
from vertstudy.study.objective import Objective, comparison_objective, default_objective
from vertstudy.study.spec import RUN_ONLY_FIELDS

#: config fields that say where and how fast a trial ran, not what it learned (the study planner
#: leaves the same ones out when it finds configurations that several study files train)
RUN_ONLY = tuple(f"cfg.{name}" for name in RUN_ONLY_FIELDS)
#: the fields that describe a configuration in captions (others are in report.json)
SHOWN_FIELDS = ("model.loc_head", "model.classifier", "model.tasks", "loss.balance_b", "loss.reg_lambda",
                "train.lr", "train.schedule.kind", "data.crop.crop_size", "model.width", "train.epochs")


@dataclass(frozen=True)
class Ablation:
    """One of Tables I-III: the field it ablates and where its trials come from."""

    key: str
    number: str
    title: str
    field: str
    values: tuple[tuple[str, str], ...]  # (config value, row label) in the paper's order
    where: tuple[tuple[str, str], ...]  # other fields the trials must have, e.g. (("model.tasks", "loc"),)
    study_file: str
    study_does: str
    kind: str  # "vertebrae": held-out rows; "map": best_val_map of the trials


ABLATIONS = (
    Ablation(
        "table1", "I", "Localization error by localization head (localization-only network)", "model.loc_head",
        (("integral", "Integral regression"), ("heatmap", "Heat map + argmax"), ("fc", "Fully connected regression")),
        (("model.tasks", "loc"),), "studies/table1.yaml",
        "the three localization heads (integral, heatmap, fc) of the localization-only network, 3 seeds each",
        "vertebrae",
    ),
    Ablation(
        "table2", "II", "Classification mAP with and without the Bi-LSTM", "model.classifier",
        (("none-lstm", "Classification without Bi-LSTM"), ("bilstm", "Classification with Bi-LSTM")),
        (("model.tasks", "loc+cls"),), "studies/table2.yaml",
        "the classifier with and without the Bi-LSTM in the full network, 3 seeds each", "map",
    ),
    Ablation(
        "table3", "III", "Localization-only versus localization + classification network", "model.tasks",
        (("loc", "Localization network"), ("loc+cls", "Localization and classification network")),
        (), "studies/table3.yaml",
        "the localization-only and the localization + classification network (integral head, Bi-LSTM), "
        "3 seeds each", "vertebrae",
    ),
)
TABLE4_FILE = "studies/table4.yaml"
TABLE4_DOES = "the paper's configuration (B = 3, lambda = 0.4, Adam lr 0.01, plateau schedule), 3 seeds"


def _plain(v):
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def signatures(trials: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """Each trial's configuration as JSON text: its ``cfg.*`` values except :data:`RUN_ONLY` and
    ``exclude`` (dotted names with the ``cfg.`` prefix)."""
    cols = sorted(c for c in trials.columns if c.startswith("cfg.") and c not in RUN_ONLY and c not in exclude)
    if not len(trials):
        return pd.Series([], dtype=object)
    return pd.Series([json.dumps([[c, _plain(row[c])] for c in cols], default=str)
                      for _, row in trials[cols].iterrows()], index=trials.index, dtype=object)


def config_of(signature: str) -> dict:
    """``{dotted field: value}`` of a signature."""
    return {c.removeprefix("cfg."): v for c, v in json.loads(signature)}


def status_counts(trials: pd.DataFrame) -> dict[str, int]:
    """``{status: count}`` for the four statuses (zeros kept), in a fixed order."""
    counts = trials["status"].value_counts() if len(trials) else {}
    out = {s: int(counts.get(s, 0)) for s in ("completed", "pruned", "error", "diverged")}
    for s in sorted(set(counts.keys()) - set(out)) if len(trials) else []:
        out[s] = int(counts[s])
    return out


@dataclass
class TableResult:
    """A table's numbers and the words around them (rendered by :mod:`vertstudy.report.render`)."""

    key: str
    number: str
    title: str
    rows: list[dict] = field(default_factory=list)  # label, value, figures (Estimates and counts)
    notes: list[str] = field(default_factory=list)  # sentences for the caption
    missing: str | None = None  # what is missing and which study fills it
    trials: list[str] = field(default_factory=list)  # keys of the trials in the figures
    extra: dict = field(default_factory=dict)  # table-specific facts for report.json
    direction: Direction | None = None  # does the paper's direction hold (Tables I-IV, when filled)

    def to_json(self) -> dict:
        rows = [{k: (estimates_json(v) if k == "figures" or k == "baseline" else v) for k, v in r.items()}
                for r in self.rows]
        return {"number": self.number, "title": self.title, "rows": rows, "notes": self.notes,
                "missing": self.missing, "trials": self.trials, **self.extra,
                "direction": self.direction.to_json() if self.direction else None}


def _in_where(trials: pd.DataFrame, where) -> pd.Series:
    keep = pd.Series(True, index=trials.index)
    for name, value in where:
        col = f"cfg.{name}"
        keep &= trials[col].astype(str).eq(value) if col in trials else False
    return keep


def _eligible(trials: pd.DataFrame, tables: Tables, kind: str) -> pd.Series:
    completed = trials["status"].eq("completed")
    if kind == "map":
        return completed & np.isfinite(trials["best_val_map"].astype(float))
    with_rows = set(tables.vertebrae["key"]) if len(tables.vertebrae) else set()
    return completed & trials["key"].isin(with_rows)


def _excluded_note(counts: dict[str, int]) -> str | None:
    parts = [f"{n} {s}" for s, n in counts.items() if n and s != "completed"]
    if not parts:
        return None
    return (f"Not in the figures: {', '.join(parts)} trial(s) of the same settings (pruned trials were not "
            "evaluated; failed and diverged trials are kept out, a diverged network's held-out rows measure "
            "only its divergence).")


def ablation_table(tables: Tables, ab: Ablation) -> TableResult:
    """Table I, II or III (see the module docstring)."""
    result = TableResult(ab.key, ab.number, ab.title, extra={"field": ab.field, "where": dict(ab.where),
                                                             "study_file": ab.study_file})
    trials = tables.trials
    col = f"cfg.{ab.field}"
    pool = trials[_in_where(trials, ab.where)] if col in trials else trials.iloc[:0]
    eligible = pool[_eligible(pool, tables, ab.kind)] if len(pool) else pool
    where_text = "".join(f" with {n} = {v}" for n, v in ab.where)
    fill = f"`vertstudy study run {ab.study_file}` ({ab.study_does}) fills it."
    if not len(eligible):
        result.missing = (f"No completed trial{where_text} to compare {ab.field} values. {fill}")
        return result
    sigs = signatures(eligible, exclude=(col,))
    values = eligible[col].astype(str)
    best = sorted((-values[sigs == s].nunique(), -int((sigs == s).sum()), s) for s in sorted(set(sigs)))[0][2]
    chosen = eligible[sigs == best]
    left_out = len(eligible) - len(chosen)
    pool_sigs = signatures(pool, exclude=(col,))
    same = pool[pool_sigs == best]
    counts = status_counts(same)
    order = [v for v, _ in ab.values] + sorted(set(chosen[col].astype(str)) - {v for v, _ in ab.values})
    labels = dict(ab.values)
    for value in order:
        sel = chosen[chosen[col].astype(str) == value]
        if not len(sel):
            continue
        keys = sorted(sel["key"])
        if ab.kind == "map":
            per_trial = sel["best_val_map"].astype(float).tolist()
            figures = {"map": Estimate(float(np.mean(per_trial)), seed_spread(per_trial)),
                       "n_trials": len(sel)}
        else:
            rows = tables.vertebrae[tables.vertebrae["key"].isin(keys)]
            figures = estimates(rows)
        result.rows.append({"value": value, "label": labels.get(value, value), "figures": figures, "trials": keys})
        result.trials += keys
    present = [r["value"] for r in result.rows]
    if len(present) < 2:
        want = ", ".join(v for v, _ in ab.values)
        result.missing = (f"Only {ab.field} = {', '.join(present)} among comparable completed trials{where_text} "
                          f"(the table compares {want}). {fill}")
    result.notes.append(
        f"Rows: {len(chosen)} completed trial(s) that differ only in {ab.field} and the seed"
        + (f"; {left_out} completed trial(s){where_text} with other settings left out as not comparable."
           if left_out else ".")
    )
    note = _excluded_note(counts)
    if note:
        result.notes.append(note)
    result.extra.update(left_out=left_out, same_settings=counts, config=config_of(best))
    result.direction = table_direction(result, tables.vertebrae, tables.trials)
    return result


@dataclass
class Choice:
    """Table IV's configuration and the trials behind it."""

    signature: str | None
    trials: pd.DataFrame
    how: str  # "validation" | "--chosen"
    score: dict = field(default_factory=dict)  # mean validation figures of the chosen configuration
    candidates: int = 0
    same_settings: dict = field(default_factory=dict)  # status counts of all trials of that configuration
    objective: Objective = field(default_factory=default_objective)  # what "validation" chose by


def choose(tables: Tables, chosen: str | None = None) -> Choice:
    """The configuration of Table IV (module docstring); ``chosen``: a trial id (or
    ``study/trial_id``) whose configuration to use. ``ConfigError`` when it names no trial."""
    trials = tables.trials
    empty = Choice(None, trials.iloc[:0], "validation")
    if not len(trials):
        if chosen:
            raise ConfigError(f"--chosen {chosen!r}: the studies have no trials")
        return empty
    sigs = signatures(trials)
    ok = _eligible(trials, tables, "vertebrae")
    if chosen:
        hit = trials[(trials["key"] == chosen) | (trials["trial_id"] == chosen)]
        if len(hit) != 1:
            why = "names no trial" if not len(hit) else f"is ambiguous ({', '.join(sorted(hit['key']))})"
            raise ConfigError(f"--chosen {chosen!r} {why} of the studies {', '.join(tables.studies)}; give a "
                              "trial_id from trials.parquet, or study/trial_id")
        best = sigs[hit.index[0]]
        how, objective = "--chosen", default_objective()
        candidates = int(sigs[ok].nunique())
    else:
        cand = sorted(set(sigs[ok]))
        if not cand:
            return Choice(None, trials.iloc[:0], "validation")

        objective = comparison_objective(trials[ok])

        def rank(s):
            sel = trials[ok & (sigs == s)]
            rate = sel[objective.rate].astype(float)
            err = sel[objective.error].astype(float)
            r = float(rate.mean()) if rate.notna().any() else -math.inf
            e = float(err.mean()) if err.notna().any() else math.inf
            return (-r, e, -len(sel), s)

        best = sorted(cand, key=rank)[0]
        how = "validation"
        candidates = len(cand)
    sel = trials[ok & (sigs == best)]
    score = {c: clean(sel[c].astype(float).mean()) if len(sel) and c in sel else None
             for c in dict.fromkeys(("best_val_id_rate", "best_val_loc_error_mm", objective.rate, objective.error))}
    return Choice(best, sel, how, score, candidates, status_counts(trials[sigs == best]), objective)


def baseline_rows(tables: Tables, studies, cases) -> pd.DataFrame:
    """The mean-position baseline's rows of ``studies`` on ``cases``; a (case, class) held by
    several studies is taken from the first study by name."""
    base = tables.baseline
    if not len(base):
        return base
    base = base[base["study"].isin(list(studies)) & base["case"].isin(list(cases))]
    return base.sort_values(["study", "case", "label"], kind="mergesort").drop_duplicates(["case", "label"])


def _baseline_figures(rows: pd.DataFrame) -> dict:
    if not len(rows):
        return {}
    p, ci = pooled(rows), bootstrap(rows)
    return {m: Estimate(p[m], math.nan, ci[m]) for m in ci} | {"n_cases": int(rows["case"].nunique()),
                                                                "n_vertebrae": p["n_truth"]}


def describe(config: dict) -> str:
    """A short text of the fields in :data:`SHOWN_FIELDS` (floats to 4 significant digits)."""
    def text(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"`{k}` = {text(config[k])}" for k in SHOWN_FIELDS if k in config)


def table4(tables: Tables, choice: Choice) -> TableResult:
    """Table IV: overall and per-region figures of the chosen configuration, baseline beside."""
    result = TableResult("table4", "IV", "Identification rate and localization error of the chosen configuration, "
                                         "overall and per region", extra={"study_file": TABLE4_FILE})
    fill = f"`vertstudy study run {TABLE4_FILE}` ({TABLE4_DOES}) fills it."
    if choice.signature is None or not len(choice.trials):
        which = " of that configuration" if choice.how != "validation" else ""
        result.missing = f"No completed trial with held-out results{which}. {fill}"
        return result
    keys = sorted(choice.trials["key"])
    rows = tables.vertebrae[tables.vertebrae["key"].isin(keys)]
    base = baseline_rows(tables, sorted(choice.trials["study"].unique()), sorted(rows["case"].unique()))
    for region in ("all", *REGIONS):
        mine = rows if region == "all" else rows[rows["region"] == region]
        theirs = base if region == "all" or not len(base) else base[base["region"] == region]
        result.rows.append({"value": region, "label": region, "figures": estimates(mine),
                            "baseline": _baseline_figures(theirs)})
    result.trials = keys
    config = config_of(choice.signature)
    how = ("chosen with --chosen" if choice.how == "--chosen" else
           f"chosen among {choice.candidates} configuration(s) by the highest mean validation identification rate "
           f"(best epoch, {choice.objective.measured_on}), ties by the lower validation error; held-out figures "
           "take no part")
    result.notes.append(f"Configuration: {describe(config)}; {how}.")
    if len(keys) < 2:
        result.notes.append(f"One trial: no spread over seeds. {fill.replace('fills it', 'gives 3 seeds')}")
    note = _excluded_note(choice.same_settings)
    if note:
        result.notes.append(note)
    if not len(base):
        result.notes.append("No baseline.parquet in the studies: the mean-position baseline is not shown.")
    result.extra.update(config=config, how=choice.how, validation=choice.score, candidates=choice.candidates,
                        same_settings=choice.same_settings)
    result.direction = table_direction(result, tables.vertebrae, tables.trials, base)
    return result


def all_tables(tables: Tables, choice: Choice) -> list[TableResult]:
    """Tables I-IV, in order."""
    return [*(ablation_table(tables, ab) for ab in ABLATIONS), table4(tables, choice)]
