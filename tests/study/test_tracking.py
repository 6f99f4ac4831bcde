"""W&B trial runs, with real wandb in offline mode: what a trial writes is decoded back from the run files."""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
from pathlib import Path

import pytest

from vertstudy.study.tracking import TrialRun, WandbSettings, read_offline_runs, run_id

pytestmark = pytest.mark.timeout(120)  # offline runs must never wait on the network or a login

CONFIG = {"loss.balance_b": 3.0, "train.lr": 0.01}


def _offline(tmp_path: Path) -> WandbSettings:
    return WandbSettings(mode="offline", project="vertstudy-test", dir=tmp_path / "wb")


def _epoch(epoch: int, **extra: object) -> dict:
    return {"epoch": epoch, "loss": 2.0 / epoch, "val_loc_error_mm": 12.5 - epoch, "lr": 0.01, **extra}


def test_offline_run_records_config_epochs_and_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with TrialRun(_offline(tmp_path), "ablation/b", "trial_0001", CONFIG, tags=("smoke",)) as run:
        assert run.id == run_id("ablation/b", "trial_0001") == "ablation-b-trial_0001"
        run.log_epoch(_epoch(1, phase="epoch"))  # the str entry is not logged
        run.log_epoch(_epoch(2))
        run.log_epoch(_epoch(3, grad_norm=math.nan))  # non-finite floats are logged as is
        run.summary({"best_val_loc_error_mm": 9.5, "best_epoch": 3, "status": "completed", "rows": [1, 2]})
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
    with TrialRun(settings, "s1", "trial_a", CONFIG) as first:
        first.log_epoch(_epoch(1))
    # a config value longer than two 32 KiB datastore blocks: its record is split in first/middle/last chunks
    big = {**CONFIG, "train.lr": 0.1, "data.note": "x" * 70_000}
    with TrialRun(settings, "s1", "trial_b", big) as second:
        for epoch in range(1, 6):
            second.log_epoch(_epoch(epoch))

    runs = read_offline_runs(tmp_path, settle_s=30)
    assert [r.run_id for r in runs] == ["s1-trial_a", "s1-trial_b"] == [first.id, second.id]
    assert {r.group for r in runs} == {"s1"}
    assert runs[0].config == CONFIG
    assert runs[1].config == big
    assert [row["_step"] for row in runs[0].history] == [1]
    assert [row["loss"] for row in runs[1].history] == [2.0 / e for e in range(1, 6)]
    assert all(r.exit_code == 0 for r in runs)


def test_exception_propagates_and_the_run_is_still_finished(tmp_path):
    with pytest.raises(RuntimeError, match="diverged"):
        with TrialRun(_offline(tmp_path), "s2", "trial_x", CONFIG) as run:
            run.log_epoch(_epoch(1))
            raise RuntimeError("diverged")

    (decoded,) = read_offline_runs(tmp_path, settle_s=30)
    assert decoded.run_id == "s2-trial_x"
    assert decoded.exit_code == 1
    assert [row["epoch"] for row in decoded.history] == [1]


def test_disabled_mode_writes_nothing(tmp_path):
    settings = WandbSettings(mode="disabled", dir=tmp_path / "wb")
    with TrialRun(settings, "s3", "trial_0", CONFIG) as run:
        assert run.id is None
        run.log_epoch(_epoch(1))
        run.summary({"best_epoch": 1})
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
    with TrialRun(_offline(tmp_path), "s4", "trial_k", CONFIG) as run:
        run.log_epoch(_epoch(1))
        run.summary({"best_epoch": 1})

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".log" for p in files)
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []
