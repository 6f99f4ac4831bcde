"""The report's files: a self-contained HTML, byte-identical rebuilds, old and empty studies,
missing tables naming the study file that fills them, and --chosen."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.report.conftest import REPORT_DATE
from vertstudy.cli import main
from vertstudy.report import build_report
from vertstudy.study.tables import build_tables, write_tables

pytestmark = pytest.mark.slow


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == len(list((report_dir / "figures").glob("*.png"))) > 5
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (report_dir / ref).is_file() and ref.startswith("figures/")


def test_same_tables_same_report_bytes(report_dir, study_dirs, tmp_path):
    """A rebuild over an earlier report (with a stale file) replaces it with identical bytes."""
    again = tmp_path / "again"
    shutil.copytree(report_dir, again)
    (again / "figures" / "stale.png").write_bytes(b"old")
    build_report([str(d) for d in reversed(list(study_dirs.values()))], again, date=REPORT_DATE)
    assert files_of(again) == files_of(report_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left behind


def old_copy(src: Path, dst: Path) -> Path:
    """``src``'s tables as an older vertstudy wrote them: no cases.parquet, no centroid columns,
    no start times or resources."""
    dst.mkdir(parents=True)
    drop = {"trials": ("started_at", "ended_at", "resources_cpu", "resources_gpu"),
            "vertebrae": tuple(f"{k}_{a}_mm" for k in ("true", "pred") for a in "zyx")}
    drop["baseline"] = drop["vertebrae"]
    for name in ("trials", "epochs", "vertebrae", "baseline"):
        table = pq.read_table(src / f"{name}.parquet")
        table = table.drop_columns([c for c in drop.get(name, ()) if c in table.column_names])
        pq.write_table(table, dst / f"{name}.parquet")
    return dst


def test_old_tables_and_an_empty_study_still_render(study_dirs, tmp_path):
    old = old_copy(study_dirs["abl"], tmp_path / "st" / "abl")
    empty = tmp_path / "st" / "fresh"
    empty.mkdir()
    write_tables(str(empty), build_tables("fresh", [], {}))  # what a study writes before a trial ends
    built = build_report([f"file://{old}", str(empty)], tmp_path / "rep", date=REPORT_DATE)  # a URI works too
    md = (built.out / "report.md").read_text(encoding="utf-8")
    assert "Pictures skipped: abl has no `cases.parquet`" in md and "no centroid columns" in md
    assert not list((built.out / "figures").glob("gallery-*.png"))
    assert "trial-id order (these tables have no start times)" in md
    assert "No per-trial resources in the tables of abl" in md
    assert "Study fresh has no ended trials yet." in md
    assert "| fresh | 0 | 0 | 0 | 0 | 0 |" in md
    data = json.loads((built.out / "report.json").read_text(encoding="utf-8"))
    assert data["tables"]["table1"]["missing"] is None  # the numbers do not need the new columns
    assert data["gallery"]  # the worst cases are still listed


def test_missing_tables_name_their_study_file_and_chosen_overrides(study_dirs, tmp_path, capsys):
    trials = pq.read_table(study_dirs["cls"] / "trials.parquet").to_pylist()
    (pick,) = [t for t in trials if t["cfg.model.classifier"] == "none-lstm" and t["status"] == "completed"]
    out = tmp_path / "rep"
    code = main(["report", str(study_dirs["cls"]), str(study_dirs["err"]), "--out", str(out), "--date",
                 REPORT_DATE, "--chosen", pick["trial_id"], "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "report.html", "tables.tex", "report.json"):
        assert f"wrote {out / name}" in printed
    assert "built in" in printed
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    t = data["tables"]
    assert "vertstudy study run studies/table1.yaml" in t["table1"]["missing"]
    assert "vertstudy study run studies/table3.yaml" in t["table3"]["missing"]
    assert t["table2"]["missing"] is None and len(t["table2"]["rows"]) == 2
    assert t["table4"]["how"] == "--chosen" and t["table4"]["trials"] == [f"cls/{pick['trial_id']}"]
    assert t["table4"]["config"]["model.classifier"] == "none-lstm"
    md = (out / "report.md").read_text(encoding="utf-8")
    tex = (out / "tables.tex").read_text(encoding="utf-8")
    assert "studies/table1.yaml" in md and "studies/table1.yaml" in tex
    assert "One trial: no spread over seeds" in md
    assert tex.count("\\begin{table}") == 5 and tex.count("\\caption{") == 5  # Tables I-V


def test_unknown_chosen_trial_is_one_clear_error(study_dirs, tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", str(study_dirs["cls"]), "--out", str(out), "--chosen", "nope_00000", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--chosen 'nope_00000'" in err
    assert not out.exists() and not list(tmp_path.iterdir())



def test_where_identification_is_lost_and_the_decoders_match_the_trials_table(report_dir, report_json, study_dirs):
    """Every completed trial wrote the decomposition and both decoders' figures; the report's two
    diagnosis sections are means of the chosen configuration's trial columns."""
    import pandas as pd

    trials = pd.concat([pq.read_table(study_dirs[n] / "trials.parquet").to_pandas() for n in study_dirs])
    done = trials[(trials["status"] == "completed") & trials["test_id_rate"].notna()]
    assert len(done)
    for dec in ("kmeans", "sequence"):
        for col in (f"test_diag_shipped_{dec}_id_rate", f"test_diag_both_{dec}_id_rate", f"test_dec_{dec}_id_rate"):
            assert done[col].between(0, 1).all(), col
        assert (done[f"test_dec_{dec}_false_per_case"] >= 0).all()
    # the configured decoder (the default, sequence) gives the plain figures and the rows
    assert (done["test_id_rate"] == done["test_dec_sequence_id_rate"]).all()
    assert (done["test_diag_shipped_sequence_id_rate"] == done["test_dec_sequence_id_rate"]).all()
    assert (done["test_diag_oracle_kmeans_false_per_case"] == 0).all()  # true classes vote only where present
    lost, decoders = report_json["where_lost"], report_json["decoders"]
    for key, col in (("near_sequence", "test_diag_near_sequence_id_rate"),
                     ("oracle_kmeans", "test_diag_oracle_kmeans_id_rate")):
        assert done[col].min() - 1e-12 <= lost[key]["id_rate"] <= done[col].max() + 1e-12
    assert done["test_dec_kmeans_id_rate"].min() - 1e-12 <= decoders["kmeans"]["id_rate"] <= \
        done["test_dec_kmeans_id_rate"].max() + 1e-12
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "## Where identification is lost" in md and "## K-means (paper) versus sequence decoding" in md
