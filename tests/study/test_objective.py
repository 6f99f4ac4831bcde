"""The ranking rule shared by `study run` and the report (vertstudy.study.objective): a study's
own search metric first, ties by the other figure of the same kind, whole-CT validation figures
for whole-CT metrics; crop-level identification rate for tables that do not record a metric."""

from __future__ import annotations

import math

import pandas as pd

from vertstudy.report.search import objective_order
from vertstudy.study.objective import comparison_objective, metric_objective, study_objective

NAN = math.nan


def trials(metric: str = "val_ct_id_rate", mode: str = "max") -> pd.DataFrame:
    # a: best crop figures, worst whole-CT rate; b and c tie on the whole-CT rate, c has the lower CT error
    rows = [
        ("a", "completed", 0.90, 5.0, 0.30, 12.0),
        ("b", "completed", 0.40, 9.0, 0.60, 11.0),
        ("c", "completed", 0.30, 9.5, 0.60, 8.0),
        ("d", "error", 0.99, 1.0, 0.99, 1.0),  # failed trials are never ranked
        ("e", "pruned", NAN, NAN, NAN, NAN),  # no figure at all: not ranked
    ]
    frame = pd.DataFrame(rows, columns=["key", "status", "best_val_id_rate", "best_val_loc_error_mm",
                                        "best_val_ct_id_rate", "best_val_ct_loc_error_mm"])
    frame["trial_id"] = frame["key"]
    frame["search_metric"], frame["search_mode"] = metric, mode
    return frame


def runner_pick(frame: pd.DataFrame, metric: str, mode: str) -> str:
    """What `study run` prints as the best trial (runner.summarize_study's rule)."""
    objective = metric_objective(metric, mode)
    rows = [r for r in frame.to_dict("records") if r["status"] == "completed"]
    return min(rows, key=lambda r: (*objective.row_key(r), r["trial_id"]))["trial_id"]


def test_a_whole_ct_metric_ranks_by_whole_ct_figures_with_ties_by_the_ct_error():
    frame = trials()
    objective = study_objective(frame)
    assert (objective.column, objective.maximize, objective.tie, objective.tie_maximize) == (
        "best_val_ct_id_rate", True, "best_val_ct_loc_error_mm", False)
    assert objective.measured_on == "whole validation CTs"
    assert list(objective_order(frame, objective)["key"]) == ["c", "b", "a"]
    assert runner_pick(frame, "val_ct_id_rate", "max") == "c"


def test_the_default_metric_ranks_by_the_lowest_crop_error_and_agrees_with_study_run():
    frame = trials("val_loc_error_mm", "min")
    objective = study_objective(frame)
    assert (objective.column, objective.tie, objective.tie_maximize) == ("best_val_loc_error_mm", "best_val_id_rate",
                                                                         True)
    assert list(objective_order(frame, objective)["key"]) == ["a", "b", "c"]
    assert runner_pick(frame, "val_loc_error_mm", "min") == "a"
    frame = trials("val_ct_loc_error_mm", "min")
    assert list(objective_order(frame, study_objective(frame))["key"]) == ["c", "b", "a"]


def test_tables_without_a_recorded_metric_rank_by_the_crop_identification_rate():
    frame = trials().drop(columns=["search_metric", "search_mode"])
    assert list(objective_order(frame, study_objective(frame))["key"]) == ["a", "b", "c"]
    frame = trials("", "")  # a multi-objective study records no single metric
    assert study_objective(frame).column == "best_val_id_rate"


def test_configurations_are_compared_on_whole_cts_only_when_every_trial_has_them():
    frame = trials()
    assert comparison_objective(frame[frame["status"] == "completed"]).rate == "best_val_ct_id_rate"
    assert comparison_objective(frame).rate == "best_val_id_rate"  # trial e has no whole-CT figure


def test_a_pruned_trial_s_best_epoch_follows_its_own_selection_rule():
    from vertstudy.study.schema import fallback_best_epoch

    nan = math.nan
    epochs = [  # whole-CT validation at epochs 1 and 3, carried forward in between
        {"epoch": 1, "val_loss": 9.0, "val_ct_id_rate": nan, "val_ct_loc_error_mm": nan},
        {"epoch": 2, "val_loss": 5.0, "val_ct_id_rate": nan, "val_ct_loc_error_mm": nan},
        {"epoch": 3, "val_loss": 7.0, "val_ct_id_rate": 0.4, "val_ct_loc_error_mm": 12.0},
        {"epoch": 4, "val_loss": 6.0, "val_ct_id_rate": 0.4, "val_ct_loc_error_mm": 12.0},
    ]
    assert fallback_best_epoch(epochs, "val_loss") == 2
    assert fallback_best_epoch(epochs, "val_ct") == 3
    assert fallback_best_epoch([{"epoch": 1, "val_loss": 3.0}], "val_ct") == 1  # no whole-CT figure: val_loss
