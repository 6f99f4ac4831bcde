"""Studies end to end on a real local Ray cluster, with a real Optuna storage, real W&B offline
runs and the real network: tables, resume after faults, every shipped study at --smoke."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import torch

from tests.study.conftest import tiny_spec
from vertstudy.checkpoint import load_checkpoint
from vertstudy.config import Config, flat_config
from vertstudy.study.runner import export_tables, run_study, study_status
from vertstudy.study.spec import load_study, smoke, total_trials
from vertstudy.study.tracking import read_offline_runs
from vertstudy.train.trainer import training_precision

STUDIES = Path(__file__).resolve().parents[2] / "studies"
STATUSES = {"completed", "pruned", "error", "diverged"}

pytestmark = pytest.mark.slow


def table(study_dir, name):
    return pq.read_table(Path(study_dir) / f"{name}.parquet").to_pylist()


def results_of(study_dir, trial_id):
    text = (Path(study_dir) / "ray" / trial_id / "result.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_consistent(study_dir, spec, expected_trials: int) -> list[dict]:
    """The three tables agree with each other, with Ray's trial directories and with Optuna."""
    trials = table(study_dir, "trials")
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == expected_trials
    assert set(ids) == {p.name for p in (Path(study_dir) / "ray").iterdir() if p.is_dir()}
    assert {t["status"] for t in trials} <= STATUSES
    epochs = table(study_dir, "epochs")
    keys = [(e["trial_id"], e["epoch"]) for e in epochs]
    assert len(keys) == len(set(keys))
    for t in trials:
        mine = sorted(e["epoch"] for e in epochs if e["trial_id"] == t["trial_id"])
        assert mine == list(range(1, t["epochs"] + 1))
    split = json.loads((Path(study_dir) / "split.json").read_text())
    assert json.loads((Path(study_dir) / "defaults.json").read_text()) == flat_config(Config())  # what it began with
    test_cases = {Path(p).name for p in split["test"]}
    verts = table(study_dir, "vertebrae")
    for t in trials:
        rows = [v for v in verts if v["trial_id"] == t["trial_id"]]
        if t["status"] == "completed":
            assert len(rows) == 26 * len(test_cases)
            assert not math.isnan(t["test_id_rate"])
            assert (Path(t["checkpoint"]) / "best.pt").exists()
            # the rows travel as a Parquet file in the final checkpoint; Ray got only scalars
            held_out = pq.read_table(Path(t["checkpoint"]) / "held_out.parquet").to_pylist()
            assert [(r["case"], r["label"]) for r in held_out] == [(r["case"], r["label"]) for r in rows]
            final = [r for r in results_of(study_dir, t["trial_id"]) if r.get("phase") == "final"][-1]
            assert all(not isinstance(v, (str, list, dict)) or k in ("phase", "status", "message", "node", "hostname",
                       "device", "precision", "wandb_run", "checkpoint_dir_name", "date", "trial_id", "pid", "node_ip",
                       "experiment_tag", "config") for k, v in final.items()), final
    if spec.search.algorithm != "grid":
        from vertstudy.study.search import open_optuna_storage

        study = optuna.load_study(study_name=spec.name, storage=open_optuna_storage(spec, str(study_dir)))
        states = [tr.state for tr in study.get_trials()]
        assert optuna.trial.TrialState.RUNNING not in states
        assert len(states) == expected_trials
    return trials


def test_quickstart_smoke_writes_tables_wandb_and_optuna(ray_cluster, storage):
    spec = smoke(load_study(STUDIES / "quickstart.yaml")).model_copy(update={"storage": str(storage)})
    result = run_study(spec, progress=False)
    trials = check_consistent(result.study_dir, spec, expected_trials=2)
    assert sum(result.counts.values()) == 2
    assert any(t["status"] == "completed" for t in trials)
    # the sampled values are in the table, and are the ones Optuna recorded for the trial
    for t in trials:
        assert 2.0 <= t["cfg.loss.balance_b"] <= 4.0
        assert t["cfg.train.schedule.kind"] in ("plateau", "cosine", "step")
        assert len(t["node"]) > 20 and t["hostname"] and t["device"] == "cpu"  # where it ran, pruned or not
        assert t["precision"] == training_precision(torch.device("cpu"), t["cfg.train.amp"])  # and how
        sampled = json.loads(t["params"])  # only what the search sampled: conditionals follow the kind
        assert set(sampled) <= set(spec.space)
        assert ("train.schedule.patience" in sampled) == (sampled["train.schedule.kind"] == "plateau")
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{result.study_dir}/optuna.db")
    assert sorted(round(tr.params["loss.balance_b"], 9) for tr in study.trials) == sorted(
        round(t["cfg.loss.balance_b"], 9) for t in trials
    )
    # one W&B offline run per trial, grouped by study, with its per-epoch history (beside the study's own run)
    every = read_offline_runs(Path(result.study_dir) / "wandb", settle_s=10)
    assert [r.run_id for r in every if r.job_type == "study"] == [f"{spec.name}-study"]
    runs = {r.run_id: r for r in every if r.job_type != "study"}
    assert {t["wandb_run"] for t in trials} == set(runs)
    for t in trials:  # the driver writes them, so a pruned trial's run is whole and finished too
        run = runs[t["wandb_run"]]
        assert (run.group, run.job_type, run.exit_code) == (spec.name, "trial", 0)
        assert run.config["loss.balance_b"] == pytest.approx(t["cfg.loss.balance_b"])
        assert sorted(h["epoch"] for h in run.history if "epoch" in h) == list(range(1, t["epochs"] + 1))
        if t["status"] == "pruned":  # stopped by ASHA: no final result, so no summary of one
            assert "status" not in run.summary
        else:
            assert run.summary["status"] == t["status"] and run.summary["epoch"] == t["epochs"]
    # the baseline sits beside the tables, and status lists every trial
    assert len(table(result.study_dir, "baseline")) == 26
    _, rows, baseline = study_status(result.study_dir)
    assert {r["trial_id"] for r in rows} == {t["trial_id"] for t in trials}
    assert baseline["n_truth"] > 0

    # export rebuilds the same tables from Ray's results alone
    before = {name: table(result.study_dir, name) for name in ("trials", "epochs", "vertebrae")}
    for name in before:
        (Path(result.study_dir) / f"{name}.parquet").unlink()
    export_tables(result.study_dir)
    after = {name: table(result.study_dir, name) for name in before}
    assert json.dumps(after, sort_keys=True, default=str) == json.dumps(before, sort_keys=True, default=str)


def test_trial_failing_once_resumes_from_its_checkpoint(ray_cluster, storage):
    spec = tiny_spec("fault-once", storage, num_samples=1, inject_failure_at_epoch=1, wandb={"mode": "offline"})
    result = run_study(spec, progress=False)
    (trial,) = check_consistent(result.study_dir, spec, expected_trials=1)
    assert trial["status"] == "completed" and trial["epochs"] == 2
    reports = results_of(result.study_dir, trial["trial_id"])
    # epoch 1 was reported once: the retry continued from its checkpoint instead of starting over
    assert [r["epoch"] for r in reports if r.get("phase") == "epoch"] == [1, 2]
    assert "fault drill" in (Path(result.study_dir) / "ray" / trial["trial_id"] / "error.txt").read_text()
    # the driver's W&B run of the trial: the failed attempt finished with exit code 1 after epoch 1,
    # the retry resumed the same run id, logged epoch 2 and the final summary, and finished with 0
    attempts = [r for r in read_offline_runs(Path(result.study_dir) / "wandb", settle_s=30) if r.job_type == "trial"]
    assert [r.run_id for r in attempts] == [trial["wandb_run"]] * 2
    assert sorted(r.exit_code for r in attempts) == [0, 1]
    failed = next(r for r in attempts if r.exit_code == 1)
    finished = next(r for r in attempts if r.exit_code == 0)
    assert [h["epoch"] for h in failed.history] == [1]
    assert [h["epoch"] for h in finished.history] == [2]
    assert finished.summary["status"] == "completed" and finished.summary["test_id_rate"] == trial["test_id_rate"]
    assert failed.config == finished.config and finished.config["train.epochs"] == 2
    assert not any(k in h for h in failed.history + finished.history for k in ("training_iteration", "pid", "done"))


def test_a_trial_whose_latest_checkpoint_is_corrupt_resumes_from_an_older_one(ray_cluster, storage):
    """Epoch 2's checkpoint reaches the storage with a truncated last.pt and the trial fails: the
    retry passes it over for epoch 1's checkpoint (one line in the trial's message) and completes."""
    spec = tiny_spec("corrupt-ckpt", storage, num_samples=1, inject_corrupt_checkpoint_at_epoch=2,
                     config={"train.epochs": 3})
    result = run_study(spec, progress=False)
    (trial,) = check_consistent(result.study_dir, spec, expected_trials=1)
    assert trial["status"] == "completed" and trial["epochs"] == 3
    assert "resumed from checkpoint_000000: checkpoint_000001 unusable (last.pt: not a readable checkpoint" \
        in trial["message"], trial["message"]
    reports = [r["epoch"] for r in results_of(result.study_dir, trial["trial_id"]) if r.get("phase") == "epoch"]
    assert reports == [1, 2, 2, 3]  # epoch 2 trained again from epoch 1's checkpoint
    epochs = table(result.study_dir, "epochs")
    assert sorted(e["epoch"] for e in epochs) == [1, 2, 3]  # the tables count it once
    # Tune keeps the newest keep_checkpoints (the final report's and the one before), not the best-scoring
    kept = sorted(int(p.name.split("_")[1]) for p in (Path(result.study_dir) / "ray" / trial["trial_id"]).glob(
        "checkpoint_*"))
    reported = len(results_of(result.study_dir, trial["trial_id"]))  # one checkpoint per report
    assert spec.keep_checkpoints == 2 and kept == [reported - 2, reported - 1], (kept, reported)
    # the trial ended for good, so its checkpoints keep best.pt (it loads) and not the resume state
    tdir = Path(result.study_dir) / "ray" / trial["trial_id"]
    assert sorted(p.name for p in tdir.glob("checkpoint_*/*/*.pt")) == ["best.pt", "best.pt"]
    for best in tdir.glob("checkpoint_*/*/best.pt"):
        assert "model" in load_checkpoint(best)


def test_diverging_trial_ends_diverged_and_the_study_goes_on(ray_cluster, storage):
    spec = tiny_spec(
        "diverge", storage, num_samples=1, search={"algorithm": "grid"},
        space={"train.lr": {"type": "choice", "values": [0.003, 1.0e30]}},
    )
    result = run_study(spec, progress=False)
    trials = check_consistent(result.study_dir, spec, expected_trials=2)
    status = {t["cfg.train.lr"]: t["status"] for t in trials}
    assert status == {0.003: "completed", 1.0e30: "diverged"}
    diverged = next(t for t in trials if t["status"] == "diverged")
    assert "non-finite" in diverged["message"] or "nan" in diverged["message"].lower()


@pytest.mark.parametrize("name", ["search", "table1", "table2", "table3", "table4"])
def test_every_gpu_study_runs_at_smoke_scale(ray_cluster, storage, name):
    spec = smoke(load_study(STUDIES / f"{name}.yaml")).model_copy(update={"storage": str(storage)})
    expected = total_trials(spec)
    if spec.search.algorithm == "grid":
        assert expected == math.prod(len(p.values) for p in spec.space.values()) * spec.repeats * spec.num_samples
    result = run_study(spec, progress=False)
    assert not result.interrupted
    trials = check_consistent(result.study_dir, spec, expected_trials=expected)
    if spec.scheduler.kind == "none":
        assert {t["status"] for t in trials} == {"completed"}
    for pname, p in spec.space.items():
        if p.type == "choice" and spec.search.algorithm == "grid":
            seen = {json.dumps(t[f"cfg.{pname}"]) for t in trials}
            assert len(seen) == len(p.values)


@pytest.mark.parametrize("algorithm", ["random", "optuna-multi"])
def test_random_and_multi_objective_searches(ray_cluster, storage, algorithm):
    spec = tiny_spec(f"algo-{algorithm}", storage, search={"algorithm": algorithm})
    result = run_study(spec, progress=False)
    check_consistent(result.study_dir, spec, expected_trials=2)
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{result.study_dir}/optuna.db")
    assert len(study.directions) == (2 if algorithm == "optuna-multi" else 1)


def test_optuna_journal_storage(ray_cluster, storage):
    """journal:<path>: Optuna's JournalStorage in a file (the many-writer choice on a shared file system)."""
    journal = storage / "journal" / "optuna.log"
    journal.parent.mkdir()
    spec = tiny_spec("journal", storage, search={"algorithm": "optuna-tpe", "optuna_storage": f"journal:{journal}"})
    result = run_study(spec, progress=False)
    check_consistent(result.study_dir, spec, expected_trials=2)
    assert not (Path(result.study_dir) / "optuna.db").exists()
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=spec.name,
                              storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]


def test_storage_given_as_a_uri(ray_cluster, storage):
    """Results go through pyarrow's filesystems: a file:// URI works like a directory."""
    spec = tiny_spec("uri", storage, num_samples=1, storage=f"file://{storage}/uri-store")
    result = run_study(spec, progress=False)
    assert result.study_dir.startswith("file://")
    local = storage / "uri-store" / "uri"
    check_consistent(local, spec, expected_trials=1)
    assert result.counts == {"completed": 1}
