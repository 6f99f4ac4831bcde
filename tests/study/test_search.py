"""The search as Optuna records it, read back from a real SQLite storage: a trial the scheduler
stopped is PRUNED with its intermediate values (not COMPLETE with an early value), a finished
trial COMPLETE, a failed one FAIL; TPE's start-up and constant liar fit the study."""

from __future__ import annotations

import optuna
import pytest

from tests.study.conftest import tiny_spec
from vertstudy.study.search import searcher, tpe_settings


def epoch(value: float, n: int, metric: str = "val_loc_error_mm") -> dict:
    return {"phase": "epoch", "epoch": n, "training_iteration": n, metric: value, "val_id_rate": 0.1 * n}


@pytest.fixture
def study_dir(tmp_path):
    path = tmp_path / "st" / "search"
    path.mkdir(parents=True)
    return path


def test_stopped_finished_and_failed_trials_are_recorded_as_such(tmp_path, study_dir):
    # Optuna told as each trial ends (reproducible off; a reproducible search defers its tells to
    # its virtual clock: test_reproducible)
    told_as_they_end = {"algorithm": "optuna-tpe", "reproducible": False}
    spec = tiny_spec("search", tmp_path / "st", num_samples=3, search=told_as_they_end)
    search = searcher(spec, str(study_dir))
    for tid in ("stopped", "finished", "failed"):
        search.suggest(tid)
    for n, v in ((1, 40.0), (2, 35.0)):
        search.on_trial_result("stopped", epoch(v, n))
    search.on_trial_complete("stopped", epoch(35.0, 2))  # ASHA stopped it after epoch 2
    for n, v in ((1, 30.0), (2, 22.0)):
        search.on_trial_result("finished", epoch(v, n))
    search.on_trial_complete("finished", {"phase": "final", "epoch": 2, "training_iteration": 3,
                                          "val_loc_error_mm": 22.0})
    search.on_trial_complete("failed", None, error=True)

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/optuna.db")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[0].intermediate_values == {1: 40.0, 2: 35.0}  # (Optuna gives a pruned trial its last one as value)
    assert trials[1].value == 22.0 and trials[1].intermediate_values == {1: 30.0, 2: 22.0}



@pytest.mark.parametrize("reproducible", [False, True])
def test_the_result_a_trial_was_stopped_at_is_among_its_intermediate_values(tmp_path, study_dir, reproducible):
    """Tune hands the result at which ASHA stops a trial to the searcher only in
    ``on_trial_complete``; it is recorded, so TPE and the dashboard see every pruned trial's last
    value (with a grace period of 1, the only one it has)."""
    spec = tiny_spec("search", tmp_path / "st", num_samples=2,
                     search={"algorithm": "optuna-tpe", "reproducible": reproducible})
    search = searcher(spec, str(study_dir))
    for tid in ("at_rung_3", "at_rung_1"):
        assert search.suggest(tid) is not None
    for n, v in ((1, 40.0), (2, 35.0)):
        search.on_trial_result("at_rung_3", epoch(v, n))
    search.on_trial_complete("at_rung_3", epoch(31.0, 3))  # stopped at epoch 3: never in on_trial_result
    search.on_trial_complete("at_rung_1", epoch(50.0, 1))  # stopped at its first report
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/optuna.db")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert trials[0].intermediate_values == {1: 40.0, 2: 35.0, 3: 31.0}
    assert trials[1].intermediate_values == {1: 50.0}

def test_a_stopped_multi_objective_trial_is_pruned_without_intermediate_values(tmp_path, study_dir):
    told_as_it_ends = {"algorithm": "optuna-multi", "reproducible": False}  # as above
    spec = tiny_spec("search", tmp_path / "st", num_samples=2, search=told_as_it_ends, scheduler={"kind": "none"})
    search = searcher(spec, str(study_dir))
    search.suggest("stopped")
    search.on_trial_result("stopped", epoch(40.0, 1))
    search.on_trial_complete("stopped", epoch(40.0, 1))
    (trial,) = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/optuna.db").get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {}


@pytest.mark.parametrize("fields, expected", [
    ({"num_samples": 6, "concurrency": 2}, {"n_startup_trials": 2, "constant_liar": True}),
    ({"num_samples": 60, "concurrency": 1}, {"n_startup_trials": 10, "constant_liar": False}),
    ({"num_samples": 12, "concurrency": 4}, {"n_startup_trials": 4, "constant_liar": True}),
    ({"num_samples": 12, "search": {"algorithm": "optuna-tpe", "startup_trials": 7, "constant_liar": False}},
     {"n_startup_trials": 7, "constant_liar": False}),
])
def test_tpe_starts_modelling_early_enough_for_the_study(tmp_path, fields, expected):
    assert tpe_settings(tiny_spec("search", tmp_path, **fields)) == expected


def test_a_trial_told_by_a_killed_driver_is_not_told_again(tmp_path, study_dir):
    """A driver killed after telling Optuna that a trial was pruned, but before saving its
    searcher's state: the resumed searcher (the older state) meets the trial's stop again and
    keeps Optuna's record instead of failing on the finished trial (CI once saw `study resume`
    die of UpdateFinishedTrialError this way)."""
    spec = tiny_spec("search", tmp_path / "st", num_samples=2, search={"algorithm": "optuna-tpe"})
    search = searcher(spec, str(study_dir))
    for tid in ("a", "b"):
        assert search.suggest(tid) is not None
    search.on_trial_result("a", epoch(40.0, 1))
    search.save(str(tmp_path / "searcher.pkl"))  # the state the killed driver saved
    search.on_trial_complete("a", epoch(35.0, 2))  # then told Optuna: pruned at epoch 2
    again = searcher(spec, str(study_dir))
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_complete("a", epoch(35.0, 2))  # the resumed trial is stopped at the same rung
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{study_dir}/optuna.db")
    a = min(study.get_trials(), key=lambda t: t.number)
    assert a.state == optuna.trial.TrialState.PRUNED and a.intermediate_values == {1: 40.0, 2: 35.0}
