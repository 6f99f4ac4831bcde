"""W&B trial, study and report runs, with real wandb in offline mode: what a run writes is decoded back from the
run files (and the files of its tables and artifacts)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import secrets
from pathlib import Path

import pytest

from tests.study.conftest import tiny_spec
from vertstudy.study.tracking import (
    TrialRun,
    WandbSettings,
    log_report,
    log_study,
    read_offline_runs,
    run_id,
    study_run_id,
    trials_table_columns,
)

pytestmark = pytest.mark.timeout(120)  # offline runs must never wait on the network or a login

CONFIG = {"loss.balance_b": 3.0, "train.lr": 0.01}


def _offline(tmp_path: Path) -> WandbSettings:
    return WandbSettings(mode="offline", project="vertstudy-test", dir=tmp_path / "wb")


def _epoch(epoch: int, **extra: object) -> dict:
    return {"epoch": epoch, "loss": 2.0 / epoch, "val_loc_error_mm": 12.5 - epoch, "lr": 0.01, **extra}


def test_offline_run_records_config_epochs_and_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = TrialRun(_offline(tmp_path), "ablation/b", "trial_0001", CONFIG, tags=("smoke",))
    assert run.id is None  # not started yet
    run.start()
    assert run.id == run_id("ablation/b", "trial_0001") == "ablation-b-trial_0001"
    run.log_epoch(_epoch(1, phase="epoch"))  # the str entry is not logged
    run.log_epoch(_epoch(2))
    run.log_epoch(_epoch(3, grad_norm=math.nan))  # non-finite floats are logged as is
    run.summary({"best_val_loc_error_mm": 9.5, "best_epoch": 3, "status": "completed", "rows": [1, 2]})
    run.finish(0)
    assert "WANDB_MODE" not in os.environ  # only set for the duration of wandb.init
    assert run.id == "ablation-b-trial_0001"  # still known after the run finished

    (decoded,) = read_offline_runs(tmp_path, settle_s=30)
    assert decoded.run_id == run.id
    assert decoded.group == "ablation/b"
    assert decoded.config == CONFIG
    assert decoded.exit_code == 0
    assert decoded.path.name.startswith("offline-run-") and decoded.path.parent == tmp_path / "wb" / "wandb"
    assert [row["_step"] for row in decoded.history] == [1, 2, 3]
    assert [row["epoch"] for row in decoded.history] == [1, 2, 3]
    assert [row["loss"] for row in decoded.history] == [2.0, 1.0, pytest.approx(2.0 / 3)]
    assert [row["val_loc_error_mm"] for row in decoded.history] == [11.5, 10.5, 9.5]
    assert set(decoded.history[0]) == {"epoch", "loss", "val_loc_error_mm", "lr", "_step"}
    assert math.isnan(decoded.history[2]["grad_norm"])
    assert decoded.summary["best_val_loc_error_mm"] == 9.5
    assert decoded.summary["best_epoch"] == 3
    assert decoded.summary["status"] == "completed"
    assert "rows" not in decoded.summary
    assert decoded.summary["loss"] == pytest.approx(2.0 / 3)  # the last logged epoch is in the summary too


def test_two_trials_in_one_process_give_two_runs_of_one_study(tmp_path):
    settings = _offline(tmp_path)
    first = TrialRun(settings, "s1", "trial_a", CONFIG)
    first.start()
    first.log_epoch(_epoch(1))
    first.finish(0)
    # a config value longer than two 32 KiB datastore blocks: its record is split in first/middle/last chunks
    big = {**CONFIG, "train.lr": 0.1, "data.note": "x" * 70_000}
    second = TrialRun(settings, "s1", "trial_b", big)
    second.start()
    for epoch in range(1, 6):
        second.log_epoch(_epoch(epoch))
    second.finish(0)

    runs = read_offline_runs(tmp_path, settle_s=30)
    assert [r.run_id for r in runs] == ["s1-trial_a", "s1-trial_b"] == [first.id, second.id]
    assert {r.group for r in runs} == {"s1"}
    assert runs[0].config == CONFIG
    assert runs[1].config == big
    assert [row["_step"] for row in runs[0].history] == [1]
    assert [row["loss"] for row in runs[1].history] == [2.0 / e for e in range(1, 6)]
    assert all(r.exit_code == 0 for r in runs)


def test_a_failed_trial_run_finishes_with_exit_code_1_once(tmp_path):
    run = TrialRun(_offline(tmp_path), "s2", "trial_x", CONFIG)
    run.start()
    run.log_epoch(_epoch(1))
    run.finish(1)
    run.finish(0)  # a second finish (the trial's end seen twice) changes nothing

    (decoded,) = read_offline_runs(tmp_path, settle_s=30)
    assert decoded.run_id == "s2-trial_x"
    assert decoded.exit_code == 1
    assert [row["epoch"] for row in decoded.history] == [1]


def test_disabled_mode_writes_nothing(tmp_path):
    settings = WandbSettings(mode="disabled", dir=tmp_path / "wb")
    run = TrialRun(settings, "s3", "trial_0", CONFIG)
    run.start()
    assert run.id is None
    run.log_epoch(_epoch(1))
    run.summary({"best_epoch": 1})
    run.finish(0)
    assert run.id is None
    assert list(tmp_path.rglob("*")) == []
    assert read_offline_runs(tmp_path) == []


def test_run_id_is_sanitized_and_capped_deterministically():
    assert run_id("my study/v2", "trial_0001:a.b") == "my-study-v2-trial_0001-a-b"
    exact = run_id("s" * 40, "t" * 23)
    assert exact == "s" * 40 + "-" + "t" * 23 and len(exact) == 64

    study = "a very long study name, with punctuation! " * 3
    long_id = run_id(study, "trial_0001")
    full = f"{study}-trial_0001"
    assert len(long_id) == 64
    assert re.fullmatch(r"[A-Za-z0-9_-]{55}-[0-9a-f]{8}", long_id)
    assert long_id[:55] == re.sub(r"[^A-Za-z0-9_-]", "-", full)[:55]
    assert long_id.endswith(hashlib.sha1(full.encode()).hexdigest()[:8])
    assert run_id(study, "trial_0001") == long_id
    assert run_id(study, "trial_0002") != long_id  # same prefix, told apart by the hash


def test_api_key_from_the_environment_is_never_written(tmp_path, monkeypatch):
    secret = secrets.token_hex(20)  # 40 chars, like a W&B key
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run = TrialRun(_offline(tmp_path), "s4", "trial_k", CONFIG)
    run.start()
    run.log_epoch(_epoch(1))
    run.summary({"best_epoch": 1})
    run.finish(0)

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".log" for p in files)
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []


# -- the study's run and a report's run ------------------------------------------------------------------------------
ROWS = [  # trials.parquet rows, as read_table(...).to_pylist() gives them (columns as the schema names them)
    {"study": "s5", "trial_id": "t_a", "status": "completed", "seed": 0, "params": "{}", "cfg.loss.balance_b": 2.5,
     "cfg.train.lr": 0.01, "cfg.model.tasks": "loc+cls", "val_loss": 1.2, "best_val_loss": 1.1, "best_val_id_rate": 0.5,
     "test_id_rate": 0.75, "test_loc_error_mm_mean": 6.5, "test_id_rate_verse": 0.7, "epochs": 2, "best_epoch": 2,
     "wall_s": 12.0, "wandb_run": "s5-t_a", "message": "", "hostname": "h"},
    {"study": "s5", "trial_id": "t_b", "status": "diverged", "seed": 0, "params": "{}", "cfg.loss.balance_b": 3.5,
     "cfg.train.lr": 0.01, "cfg.model.tasks": "loc+cls", "val_loss": math.nan, "best_val_loss": math.nan,
     "best_val_id_rate": math.nan, "test_id_rate": None, "test_loc_error_mm_mean": None, "test_id_rate_verse": None,
     "epochs": 1, "best_epoch": 1, "wall_s": 3.0, "wandb_run": "s5-t_b", "message": "loss non-finite", "hostname": "h"},
]
COLUMNS = ["trial_id", "status", "seed", "loss.balance_b", "best_val_id_rate", "best_val_loss", "test_id_rate",
           "test_id_rate_verse", "test_loc_error_mm_mean", "epochs", "best_epoch", "wall_s", "wandb_run", "message"]


def _md5(data: bytes) -> str:
    """W&B's manifest digest: base64 of the MD5."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_trials_table_columns_put_the_trial_parameters_and_figures_in_order():
    names = sorted({k for r in ROWS for k in r})
    columns = trials_table_columns(names, ["loss.balance_b", "not.in.the.table"])
    assert [shown for _, shown in columns] == COLUMNS
    assert ("cfg.loss.balance_b", "loss.balance_b") in columns  # the sampled value, named as the search names it
    assert trials_table_columns(["trial_id", "status"], []) == [("trial_id", "trial_id"), ("status", "status")]


def test_study_run_logs_the_trials_table_and_a_second_one_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    settings = _offline(tmp_path)
    config = {"name": "s5", "num_samples": 2, "space": {"loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0}}}
    summary = {"best_trial": "t_a", "best_val_loss": 1.1, "n_trials": 2, "n_completed": 1, "n_diverged": 1,
               "skipped": [1]}
    assert log_study(settings, "s5", config, ROWS[:1], ["loss.balance_b"], summary) == "s5-study" == study_run_id("s5")
    assert log_study(settings, "s5", config, ROWS, ["loss.balance_b"], summary) == "s5-study"
    # the process's environment is as it was: no W&B service handed to processes started later, no staging dir
    assert {"WANDB_SERVICE", "WANDB_DATA_DIR", "WANDB_MODE"}.isdisjoint(os.environ)

    first, second = read_offline_runs(tmp_path, settle_s=30)  # one offline run per log_study, both of one W&B run
    assert first.run_id == second.run_id == "s5-study"
    assert {r.job_type for r in (first, second)} == {"study"}
    assert {r.group for r in (first, second)} == {"s5"}
    assert first.config == second.config == config
    assert first.exit_code == second.exit_code == 0
    tables = sorted([first.table("trials"), second.table("trials")], key=lambda t: len(t["data"]))
    assert [len(t["data"]) for t in tables] == [1, 2]
    table = tables[1]
    assert table["columns"] == COLUMNS
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["trial_id"], r["status"], r["loss.balance_b"]) for r in rows] == [("t_a", "completed", 2.5),
                                                                                  ("t_b", "diverged", 3.5)]
    assert rows[0]["test_id_rate"] == 0.75 and rows[0]["test_id_rate_verse"] == 0.7
    assert rows[0]["best_val_loss"] == 1.1 and rows[0]["wandb_run"] == "s5-t_a"
    assert math.isnan(rows[1]["best_val_loss"]) and rows[1]["test_id_rate"] is None
    assert rows[1]["message"] == "loss non-finite"
    for run in (first, second):
        assert {k: run.summary[k] for k in summary if k != "skipped"} == {k: v for k, v in summary.items()
                                                                          if k != "skipped"}
        assert "skipped" not in run.summary
        assert run.summary["trials"]["_type"] == "table-file"  # the summary keeps the table, not a count over it
    # the table's artifact is staged beside the offline runs (what `wandb sync` uploads)
    staged = [a for r in (first, second) for a in r.artifacts]
    assert [a.type for a in staged] == ["run_table", "run_table"]
    for artifact in staged:
        (copy,) = artifact.staged.values()
        assert copy.parent == tmp_path / "wb" / "wandb" / "artifacts" / "staging" and copy.is_file()
        assert artifact.digests["trials.table.json"] == _md5(copy.read_bytes())


def test_report_run_logs_the_report_folder_as_an_artifact_of_type_report(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    folder = tmp_path / "rep"
    (folder / "figures").mkdir(parents=True)
    files = {"report.html": b"<html><body><h1>vertstudy report</h1></body></html>", "report.json": b'{"a": 1}\n',
             "figures/loss.png": b"\x89PNG fake", "figures/cost.png": b"\x89PNG other"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    settings = _offline(tmp_path)
    first = log_report(settings, "my study", folder, {"studies": ["my study", "b"], "date": "2025-01-31"},
                       tags=["my study", "b"])
    (folder / "report.html").write_bytes(b"<html>rebuilt</html>")  # a later report: a new run, a new version
    second = log_report(settings, "my study", folder, {"studies": ["my study"], "date": "2025-02-01"})
    assert first and second and first != second

    runs = {r.run_id: r for r in read_offline_runs(tmp_path, settle_s=30)}
    assert set(runs) == {first, second}
    run = runs[first]
    assert (run.job_type, run.group, run.exit_code) == ("report", "my study", 0)
    assert run.config == {"studies": ["my study", "b"], "date": "2025-01-31"}
    (artifact,) = run.artifacts
    assert (artifact.name, artifact.type) == ("report-my-study", "report")
    assert artifact.digests == {name: _md5(data) for name, data in files.items()}
    assert {name: path.read_bytes() for name, path in artifact.staged.items()} == files  # what `wandb sync` uploads
    (later,) = runs[second].artifacts
    assert later.name == "report-my-study"
    assert later.digests["report.html"] == _md5(b"<html>rebuilt</html>")
    assert later.staged["report.html"].read_bytes() == b"<html>rebuilt</html>"


def test_a_wandb_error_in_a_study_or_report_run_is_one_warning_line(tmp_path, caplog):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("x", encoding="utf-8")  # wandb cannot write its runs under a file
    settings = WandbSettings(mode="offline", dir=blocked)
    with caplog.at_level(logging.WARNING, logger="vertstudy.study.tracking"):
        assert log_study(settings, "s6", {}, ROWS, [], {}) is None
        assert log_report(settings, "s6", tmp_path, {}) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert lines[0].startswith("W&B: the study run of s6 not logged (FileExistsError: "), lines[0]
    assert lines[1].startswith("W&B: the report run of s6 not logged (FileExistsError: "), lines[1]
    assert "WANDB_DATA_DIR" not in os.environ


def test_disabled_study_and_report_runs_write_nothing(tmp_path):
    settings = WandbSettings(mode="disabled", dir=tmp_path / "wb")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.html").write_text("<html/>", encoding="utf-8")
    assert log_study(settings, "s7", {}, ROWS, [], {"n_trials": 2}) is None
    assert log_report(settings, "s7", tmp_path / "rep", {}) is None
    assert not (tmp_path / "wb").exists()


# -- end to end: a real study on a real local Ray cluster, its resume and its report --------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_its_resume_and_its_report_each_log_their_run(ray_cluster, storage, tmp_path, capsys):
    """A grid of two trials (one completes, one diverges) with W&B offline (the default): the study's own run logs
    the final trials table; `study resume` of the ended study logs it again under the same run id; `vertstudy
    report --wandb` adds a report run in the study's group with the report's files as an artifact."""
    import pyarrow.parquet as pq

    from vertstudy.cli import main
    from vertstudy.study.runner import resume_study, run_study

    spec = tiny_spec("wbs", storage, num_samples=1, search={"algorithm": "grid"}, wandb={"mode": "offline"},
                     space={"train.lr": {"type": "choice", "values": [0.003, 1.0e30]}})
    assert spec.wandb.mode == "offline"
    result = run_study(spec, progress=False)
    study_dir = Path(result.study_dir)
    trials = {t["trial_id"]: t for t in pq.read_table(study_dir / "trials.parquet").to_pylist()}
    assert sorted(t["status"] for t in trials.values()) == ["completed", "diverged"]

    runs = read_offline_runs(study_dir / "wandb", settle_s=30)
    (study,) = [r for r in runs if r.job_type == "study"]
    assert {r.job_type for r in runs} == {"trial", "study"} and len(runs) == 3  # two trials, one study
    assert (study.run_id, study.group, study.exit_code) == ("wbs-study", "wbs", 0)
    assert study.config["name"] == "wbs" and study.config["space"]["train.lr"]["values"] == [0.003, 1.0e30]
    assert study.config["wandb"] == {"mode": "offline", "project": "vertstudy", "entity": None}
    table = study.table("trials")
    columns = table["columns"]
    assert columns[:4] == ["trial_id", "status", "seed", "train.lr"]
    for name in ("best_val_loss", "best_val_id_rate", "test_id_rate", "test_loc_error_mm_mean", "test_id_rate_verse",
                 "epochs", "wandb_run", "message"):
        assert name in columns, name
    rows = {r["trial_id"]: r for r in (dict(zip(columns, row, strict=True)) for row in table["data"])}
    assert set(rows) == set(trials)  # one row per trial
    for trial_id, row in rows.items():
        parquet = trials[trial_id]
        assert row["status"] == parquet["status"]
        assert row["train.lr"] == parquet["cfg.train.lr"]
        assert row["wandb_run"] == parquet["wandb_run"]
        if row["status"] == "completed":
            assert 0.0 <= row["test_id_rate"] <= 1.0
            for name in ("test_id_rate", "test_id_rate_verse", "test_loc_error_mm_mean", "best_val_loss"):
                assert row[name] == pytest.approx(parquet[name], nan_ok=True), name  # NaN: no vertebra found
    completed = next(t for t in trials.values() if t["status"] == "completed")
    assert study.summary["best_trial"] == completed["trial_id"] == result.best["trial_id"]
    assert study.summary["search_metric"] == spec.search.metric
    assert study.summary[f"best_{spec.search.metric}"] == pytest.approx(completed[f"best_{spec.search.metric}"])
    assert study.summary["best_trial_test_id_rate"] == pytest.approx(completed["test_id_rate"], nan_ok=True)
    assert {k: study.summary[k] for k in ("n_trials", "n_completed", "n_diverged", "n_pruned", "n_error")} == {
        "n_trials": 2, "n_completed": 1, "n_diverged": 1, "n_pruned": 0, "n_error": 0}

    # resuming the ended study logs its run again under the same id (W&B resumes that run: no second study run)
    resumed = resume_study(str(study_dir), progress=False)
    assert not resumed.interrupted
    again = read_offline_runs(study_dir / "wandb", settle_s=30)
    studies = [r for r in again if r.job_type == "study"]
    assert len(again) == 4 and [r.run_id for r in studies] == ["wbs-study", "wbs-study"]
    assert {r.run_id for r in again} == {r.run_id for r in runs}
    assert all(r.table("trials") == table for r in studies)

    # the report, and its run
    out = tmp_path / "report"
    assert main(["report", str(study_dir), "--out", str(out), "--date", "2025-01-31", "--quiet", "--wandb"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("W&B: report run ") and f"(offline in {study_dir / 'wandb'}; " in printed, printed
    (report,) = [r for r in read_offline_runs(study_dir / "wandb", settle_s=30) if r.job_type == "report"]
    assert printed.split()[3] == report.run_id
    assert (report.group, report.exit_code) == ("wbs", 0)
    assert report.config["studies"] == ["wbs"] and report.config["date"] == "2025-01-31"
    (artifact,) = report.artifacts
    assert (artifact.name, artifact.type) == ("report-wbs", "report")
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"report.html", "report.json", "report.md", "tables.tex"} <= set(written)
    assert any(name.startswith("figures/") and name.endswith(".png") for name in written)
    assert artifact.digests == {name: _md5(data) for name, data in written.items()}
    assert artifact.staged["report.html"].read_bytes() == written["report.html"]
    assert json.loads(artifact.staged["report.json"].read_bytes())["studies"] == ["wbs"]

    # --wandb MODE overrides the study's: disabled logs nothing, and says so
    assert main(["report", str(study_dir), "--out", str(tmp_path / "quiet"), "--quiet", "--wandb", "disabled"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "W&B: nothing logged (--wandb disabled)"
    assert len(read_offline_runs(study_dir / "wandb")) == 5  # 2 trials, the study twice, 1 report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_wandb_error_in_a_study_is_one_warning_line_per_trial_and_the_study_completes(ray_cluster, storage,
                                                                                          caplog):
    """The trials' runs are the driver's (study.live.TrackingCallback): when W&B cannot write (its folder in the study
    directory is a file), each trial gives one warning line, trains to the end, and its row names no run."""
    import pyarrow.parquet as pq

    from vertstudy.study.runner import run_study

    spec = tiny_spec("wberr", storage, num_samples=1, search={"algorithm": "grid"}, wandb={"mode": "offline"},
                     space={"train.lr": {"type": "choice", "values": [0.003, 0.002]}})
    study_dir = Path(spec.storage) / spec.name
    study_dir.mkdir(parents=True)
    (study_dir / "wandb").write_text("not a folder", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="vertstudy.study.tracking"):
        result = run_study(spec, progress=False)
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["completed", "completed"] and not result.interrupted
    lines = [r.getMessage() for r in caplog.records if r.name == "vertstudy.study.tracking"]
    for t in trials:  # one line per trial, and its row names no run
        mine = [line for line in lines if line.startswith(f"W&B: the run of trial {t['trial_id']} not logged ")]
        assert len(mine) == 1 and re.search(r" not logged \((NotADirectory|FileExists)Error: .+\)$", mine[0]), lines
        assert t["wandb_run"] == ""
    assert all("\n" not in line for line in lines)
    assert any(line.startswith("W&B: the study run of wberr not logged") for line in lines), lines


def test_report_help_mentions_wandb(capsys):
    from vertstudy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--wandb [MODE]" in text and "job type report" in text and "artifact of type report" in text
