"""Tables I-IV of a report over real small studies, checked against figures computed here,
independently, from the Parquet tables with pandas (not with the report's own code)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REGIONS = ("cervical", "thoracic", "lumbar", "sacral")


# -- independent figures -------------------------------------------------------------------
def load(study_dirs, name: str) -> pd.DataFrame:
    frames = []
    for d in study_dirs.values():
        f = pd.read_parquet(d / f"{name}.parquet")
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    if "trial_id" in df:
        df["key"] = df["study"].astype(str) + "/" + df["trial_id"].astype(str)
    return df


def figures(rows: pd.DataFrame) -> dict:
    """The paper's figures of vertebra rows, from their definition (vertstudy.study.schema, Metrics)."""
    truth = rows[rows["in_truth"]]
    matched = truth[truth["predicted"]]
    return {
        "id_rate": truth["identified"].sum() / len(truth) if len(truth) else math.nan,
        "id_rate_verse": truth["identified_verse"].sum() / len(truth) if len(truth) else math.nan,
        "loc_error_mm_mean": matched["error_mm"].mean() if len(matched) else math.nan,
        "loc_error_mm_std": matched["error_mm"].std(ddof=0) if len(matched) else math.nan,
        "n_truth": len(truth),
    }


def spread(rows: pd.DataFrame, metric: str) -> float:
    per_trial = [figures(g)[metric] for _, g in rows.groupby("key")]
    per_trial = [v for v in per_trial if not math.isnan(v)]
    return float(np.std(per_trial, ddof=1)) if len(per_trial) >= 2 else math.nan


def close(got, want, tol=1e-9) -> bool:
    if got is None:
        return want is None or math.isnan(want)
    return want is not None and not math.isnan(want) and abs(got - want) <= tol * max(1.0, abs(want))


def keys_where(trials: pd.DataFrame, **fields) -> list[str]:
    sel = trials["status"] == "completed"
    for name, value in fields.items():
        sel &= trials[f"cfg.{name.replace('__', '.')}"].astype(str) == str(value)
    return sorted(trials.loc[sel, "key"])


def row_of(table: dict, value: str) -> dict:
    (row,) = [r for r in table["rows"] if r["value"] == value]
    return row


def check_row(row: dict, rows: pd.DataFrame, keys: list[str]) -> None:
    """A Table I / III / IV row against the figures of ``rows``."""
    f = row["figures"]
    assert sorted(row.get("trials", keys)) == keys
    assert f["n_trials"] == len(keys) and f["n_cases"] == rows["case"].nunique()
    want = figures(rows)
    assert f["n_vertebrae"] == want["n_truth"]
    per_case = {c: figures(g) for c, g in rows.groupby("case")}
    for metric in ("id_rate", "loc_error_mm_mean", "loc_error_mm_std", "id_rate_verse"):
        got = f[metric]
        assert close(got["value"], want[metric]), (metric, got, want)
        assert close(got["seed_sd"], spread(rows, metric)), metric
        lo, hi = got["ci95"]
        if got["value"] is not None:
            assert lo - 1e-9 <= got["value"] <= hi + 1e-9  # the interval holds the point estimate
        values = [v[metric] for v in per_case.values()]
        if metric != "loc_error_mm_std" and len(per_case) == 2 and not any(math.isnan(v) for v in values):
            # two cases: resampling gives AA, AB or BB; AA and BB (a quarter each of 1000
            # resamples) give the per-case figures, and a pooled rate or mean lies between
            # them, so they are the 2.5th / 97.5th percentiles (a pooled std may not: it adds
            # the spread between the cases)
            assert close(lo, min(values), 1e-6) and close(hi, max(values), 1e-6), (metric, lo, hi, values)


# -- tests ---------------------------------------------------------------------------------
def test_status_counts_include_failed_and_diverged(report_json, report_dir, study_dirs):
    trials = load(study_dirs, "trials")
    for study, group in trials.groupby("study"):
        counts = group["status"].value_counts().to_dict()
        got = report_json["status"][study]
        assert got["total"] == len(group)
        for status in ("completed", "pruned", "error", "diverged"):
            assert got[status] == counts.get(status, 0)
    assert report_json["status"]["all"]["diverged"] == 2 and report_json["status"]["all"]["error"] == 1
    # the failed trial's row says why (the exception Ray recorded), and so does the report
    message = trials.loc[trials["status"] == "error", "message"].iloc[0]
    assert message.startswith("vertstudy.study.trial.InjectedFailure") or "InjectedFailure" in message, message
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "InjectedFailure" in md
    c = report_json["status"]["cls"]
    assert f"| cls | {c['total']} | {c['completed']} | {c['pruned']} | {c['error']} | {c['diverged']} |" in md
    for key in trials.loc[trials["status"].isin(["error", "diverged"]), "key"]:
        assert f"`{key}`" in md  # each failed / diverged trial is listed
        for table in report_json["tables"].values():
            assert key not in table["trials"]  # and enters no figure


def test_table1_heads_of_the_localization_only_network(report_json, study_dirs):
    trials, verts = load(study_dirs, "trials"), load(study_dirs, "vertebrae")
    table = report_json["tables"]["table1"]
    assert table["missing"] is None
    assert [r["value"] for r in table["rows"]] == ["integral", "fc"]  # the paper's order; heatmap not run
    for head in ("integral", "fc"):
        keys = keys_where(trials, model__loc_head=head, model__tasks="loc")
        assert len(keys) == 2
        check_row(row_of(table, head), verts[verts["key"].isin(keys)], keys)


def test_table3_pools_comparable_trials_across_studies(report_json, study_dirs):
    trials, verts = load(study_dirs, "trials"), load(study_dirs, "vertebrae")
    table = report_json["tables"]["table3"]
    # the comparable group: integral head, Bi-LSTM, lr 0.01 (abl's 4 + cls's bilstm trial);
    # abl's fc trials and cls's none-lstm trial are left out as not comparable
    same = {"model__loc_head": "integral", "model__classifier": "bilstm", "train__lr": 0.01}
    loc, both = keys_where(trials, model__tasks="loc", **same), keys_where(trials, model__tasks="loc+cls", **same)
    assert len(loc) == 2 and len(both) == 3 and any(k.startswith("cls/") for k in both)
    check_row(row_of(table, "loc"), verts[verts["key"].isin(loc)], loc)
    check_row(row_of(table, "loc+cls"), verts[verts["key"].isin(both)], both)
    completed = (trials["status"] == "completed").sum()
    assert table["left_out"] == completed - 5
    assert f"{completed - 5} completed trial(s) with other settings left out" in " ".join(table["notes"])


def test_table2_uses_validation_map_with_seed_spread(report_json, study_dirs, report_dir):
    trials = load(study_dirs, "trials")
    table = report_json["tables"]["table2"]
    same = {"model__loc_head": "integral", "model__tasks": "loc+cls", "train__lr": 0.01}
    for value, n in (("bilstm", 3), ("none-lstm", 1)):
        keys = keys_where(trials, model__classifier=value, **same)
        assert len(keys) == n
        maps = trials.set_index("key").loc[keys, "best_val_map"].astype(float)
        got = row_of(table, value)["figures"]
        assert got["n_trials"] == n and close(got["map"]["value"], maps.mean())
        assert close(got["map"]["seed_sd"], maps.std(ddof=1) if n > 1 else math.nan)
        assert got["map"]["ci95"] == [None, None]  # no per-case mAP


def chosen_keys(trials: pd.DataFrame, verts: pd.DataFrame) -> list[str]:
    """Table IV's configuration, chosen here from its definition: among completed trials with
    held-out rows, grouped by the fields the fixture studies vary, the best mean validation
    identification rate, ties by the lower mean validation error."""
    done = trials[(trials["status"] == "completed") & trials["key"].isin(set(verts["key"]))]
    fields = ["cfg.model.loc_head", "cfg.model.tasks", "cfg.model.classifier", "cfg.train.lr"]
    groups = done.groupby(fields)
    scores = groups.agg(rate=("best_val_id_rate", "mean"), err=("best_val_loc_error_mm", "mean"))
    best = scores.sort_values(["rate", "err"], ascending=[False, True]).index[0]
    return sorted(groups.get_group(best)["key"])


def test_table4_chosen_configuration_overall_and_per_region(report_json, study_dirs, report_dir):
    trials, verts, base = load(study_dirs, "trials"), load(study_dirs, "vertebrae"), load(study_dirs, "baseline")
    keys = chosen_keys(trials, verts)
    table = report_json["tables"]["table4"]
    assert table["trials"] == keys and table["how"] == "validation"
    mine = verts[verts["key"].isin(keys)]
    cases = set(mine["case"])
    first = sorted({k.split("/")[0] for k in keys})[0]
    theirs = base[(base["study"] == first) & base["case"].isin(cases)]
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    tex = (report_dir / "tables.tex").read_text(encoding="utf-8")
    for region in ("all", *REGIONS):
        rows = mine if region == "all" else mine[mine["region"] == region]
        row = row_of(table, region)
        check_row({**row, "trials": keys}, rows, keys)
        b = theirs if region == "all" else theirs[theirs["region"] == region]
        want = figures(b)
        assert close(row["baseline"]["id_rate"]["value"], want["id_rate"])
        assert close(row["baseline"]["id_rate_verse"]["value"], want["id_rate_verse"])
        assert close(row["baseline"]["loc_error_mm_mean"]["value"], want["loc_error_mm_mean"])
        # the same numbers, formatted, in the Markdown and LaTeX rows of that region
        f = row["figures"]
        rate = f"{100 * f['id_rate']['value']:.1f}"
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {region} |"))
        tex_line = next(ln for ln in tex.splitlines() if ln.startswith(f"{region} &"))
        assert rate in line and rate in tex_line
        if len(b):  # the baseline's VerSe rate, in the column of that name
            header = next(ln for ln in md.splitlines() if ln.startswith("| Region |"))
            at = [c.strip() for c in header.strip("|").split("|")].index("Baseline VerSe id. rate (%)")
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[at].startswith(f"{100 * want['id_rate_verse']:.1f}"), (cells, want)
        if f["loc_error_mm_mean"]["value"] is not None:
            mean = f"{f['loc_error_mm_mean']['value']:.1f}"
            assert mean in line and mean in tex_line


def test_table5_decoders_of_the_chosen_configuration(report_json, study_dirs, report_dir):
    """Table V: both decoders on the chosen configuration's checkpoints, mean and std over its trials of
    each trial's test_dec_* figure, and the paired difference, from the trials table."""
    trials = load(study_dirs, "trials")
    keys = report_json["tables"]["table4"]["trials"]
    table = report_json["tables"]["table5"]
    assert table["missing"] is None and table["trials"] == keys and table["number"] == "V"
    chosen = trials[trials["key"].isin(keys)]

    def per_trial(column):
        v = chosen[column].astype(float)
        return v[np.isfinite(v)]

    for dec in ("kmeans", "sequence"):
        row = row_of(table, dec)
        for metric in ("id_rate", "loc_error_mm", "false_per_case"):
            v = per_trial(f"test_dec_{dec}_{metric}")
            assert close(row["figures"][metric]["value"], v.mean() if len(v) else math.nan), (dec, metric)
            assert close(row["figures"][metric]["seed_sd"], v.std(ddof=1) if len(v) >= 2 else math.nan)
        assert row["figures"]["n_trials"] == len(chosen) and row["figures"]["n_cases"] == 2  # 2 held out
    diff = per_trial("test_dec_sequence_id_rate") - per_trial("test_dec_kmeans_id_rate")
    assert close(table["paired"]["id_rate"]["value"], diff.mean())
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    tex = (report_dir / "tables.tex").read_text(encoding="utf-8")
    assert "## Tables I-V" in md and "### Table V. K-means (paper) versus sequence decoding" in md
    rate = f"{100 * row_of(table, 'kmeans')['figures']['id_rate']['value']:.1f}"
    assert rate in next(ln for ln in md.splitlines() if ln.startswith("| K-means (paper) |"))
    assert "tab:vertstudy-table5" in tex and tex.count("\\begin{table}") == 5


def test_formatted_numbers_in_markdown_and_latex(report_json, report_dir):
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    tex = (report_dir / "tables.tex").read_text(encoding="utf-8")
    for key, label_metrics in (("table1", ("loc_error_mm_mean", "loc_error_mm_std")),
                               ("table3", ("id_rate", "id_rate_verse", "loc_error_mm_mean", "loc_error_mm_std"))):
        for row in report_json["tables"][key]["rows"]:
            line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row['label']} |"))
            tex_line = next(ln for ln in tex.splitlines() if ln.startswith(f"{row['label']} &"))
            for metric in label_metrics:
                e = row["figures"][metric]
                scale = 100 if metric.startswith("id_rate") else 1
                text = f"{scale * e['value']:.1f}"
                if e["seed_sd"] is not None:
                    text += f" ± {scale * e['seed_sd']:.1f}"
                text += f" [{scale * e['ci95'][0]:.1f}, {scale * e['ci95'][1]:.1f}]"
                assert text in line, (text, line)
                assert text.replace("±", "$\\pm$") in tex_line, (text, tex_line)
            assert f"| {row['figures']['n_trials']} | {row['figures']['n_cases']} |" in line


def test_published_rows_stand_apart(report_dir):
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    tex = (report_dir / "tables.tex").read_text(encoding="utf-8")
    assert md.count("published (Qin et al., CSI 2014 data set)") == 4  # Tables I-IV; Table V is ours alone
    assert tex.count("published (Qin et al., CSI 2014 data set)") == 4
    for text in (md, tex):
        assert text.count("\\begin{table}") in (0, 5)
    assert tex.count("\\toprule") == tex.count("\\bottomrule") == tex.count("\\midrule") >= 8
    # the paper's Table III row is in a published table, never in ours
    ours = md.split("### Table III")[1].split("*published")[0]
    assert "62.7" not in ours and "89.0" not in ours
    assert "| Localization network | 62.7 | 2.9 | 3.1 |" in md


def test_robustness_and_gallery_of_the_chosen_configuration(report_json, report_dir, study_dirs):
    trials, verts = load(study_dirs, "trials"), load(study_dirs, "vertebrae")
    mine = verts[verts["key"].isin(chosen_keys(trials, verts))]
    for entry in report_json["robustness"]:
        rows = mine[mine[entry["tag"]].astype(str) == entry["value"]]
        want = figures(rows)
        assert entry["n_cases"] == rows["case"].nunique() and entry["n_vertebrae"] == want["n_truth"]
        assert close(entry["id_rate"], want["id_rate"])
    assert {e["tag"] for e in report_json["robustness"]} == {"fov", "metal", "curvature", "noise"}
    per = []
    for (key, case), g in mine.groupby(["key", "case"]):
        f = figures(g)
        err = f["loc_error_mm_mean"]  # undefined (nothing located) ranks as the worst error
        per.append((f["id_rate"], -err if math.isfinite(err) else -math.inf, case, key))
    worst_case = sorted(per)[0]
    assert (report_json["gallery"][0]["case"], report_json["gallery"][0]["key"]) == worst_case[2:], sorted(per)[:3]
    pictures = sorted(p.name for p in (report_dir / "figures").glob("gallery-*.png"))
    assert pictures == [f"gallery-{i + 1}.png" for i in range(len(report_json["gallery"]))]


def test_search_summary_and_cost(report_json, study_dirs):
    trials = load(study_dirs, "trials")
    abl = trials[trials["study"] == "abl"].copy()
    # ranked by the study's own search metric (the default: lowest crop error), as `study run` ranks
    assert set(abl["search_metric"]) == {"val_loc_error_mm"} and set(abl["search_mode"]) == {"min"}
    abl["r"] = -abl["best_val_id_rate"]
    best = abl.sort_values(["best_val_loc_error_mm", "r", "key"]).iloc[0]
    search = report_json["search"]["abl"]
    assert search["best"][0]["trial"] == best["key"]
    assert search["objective"].startswith("the lowest localization error (best epoch, validation crops)")
    assert set(search["importances"]) == {"model.loc_head", "model.tasks", "seed"}
    assert abs(sum(search["importances"].values()) - 1) < 1e-6
    assert report_json["search"]["cls"]["importances"] is None  # 2 completed trials: skipped
    for study, group in trials.groupby("study"):
        cost = report_json["cost"][study]
        assert close(cost["wall_h"], group["wall_s"].sum() / 3600)
        assert close(cost["cpu_h"], (group["wall_s"] * group["resources_cpu"]).sum() / 3600)
        assert cost["counts"] == {k: v for k, v in report_json["status"][study].items() if k != "total"}
        assert cost["trials"] == len(group)


def test_json_numbers_are_plain(report_json):
    text = json.dumps(report_json)
    assert "NaN" not in text and "Infinity" not in text
