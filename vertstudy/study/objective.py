"""The validation figures that rank trials: one home for ``study run`` and the report.

A study searches one ``search.metric`` (``trials.parquet`` records it per trial as
``search_metric`` / ``search_mode``), and ``study run`` names the trial that ranks first by it.
The report ranks a study's trials by the same rule, so its rank 1 is the trial ``study run``
printed; ties go to the other figure of the same kind (identification rate <-> localization
error, both on whole validation CTs or both on validation crops). Tables written before the
metric was recorded, and multi-objective studies, rank by the validation identification rate on
crops, ties by the lower crop error.

Across studies (Table IV's choice) there is no one search metric: configurations are compared on
the whole-CT validation figures when every candidate trial has them
(``train.whole_ct_every > 0``), else on the crop-level ones. Held-out figures never take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

#: (identification-rate column, error column, what they were measured on), per validation kind
CROPS = ("best_val_id_rate", "best_val_loc_error_mm", "validation crops")
WHOLE_CTS = ("best_val_ct_id_rate", "best_val_ct_loc_error_mm", "whole validation CTs")
HIGHER_IS_BETTER = {"best_val_id_rate", "best_val_ct_id_rate", "best_val_map"}


@dataclass(frozen=True)
class Objective:
    """What ranks trials: ``column`` first (``maximize`` or not), ties by ``tie``. ``rate`` and
    ``error`` are the identification-rate (0-1) and error (mm) columns shown beside the rank."""

    column: str
    maximize: bool
    tie: str
    tie_maximize: bool
    rate: str
    error: str
    measured_on: str

    def describe(self) -> str:
        """E.g. 'the highest validation identification rate on whole validation CTs, ties by the
        lower localization error'."""
        return (f"the {'highest' if self.maximize else 'lowest'} {_name(self.column)} "
                f"(best epoch, {self.measured_on}), ties by the "
                f"{'higher' if self.tie_maximize else 'lower'} {_name(self.tie)}")

    def row_key(self, row: dict) -> tuple[float, float]:
        """Sort key of one trial row (a dict): smaller is better, missing figures last."""
        out = []
        for col, up in ((self.column, self.maximize), (self.tie, self.tie_maximize)):
            v = row.get(col)
            v = float(v) if isinstance(v, (int, float)) and v == v else None
            out.append(float("inf") if v is None else (-v if up else v))
        return out[0], out[1]

    def order_key(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with :meth:`row_key` as two sort columns ``_o1``, ``_o2`` (ascending is best)."""
        keys = [self.row_key(row) for row in frame.to_dict("records")]
        return frame.assign(_o1=[k[0] for k in keys], _o2=[k[1] for k in keys])


def _name(column: str) -> str:
    base = column.removeprefix("best_").replace("val_ct_", "val_")
    return {"val_id_rate": "identification rate", "val_loc_error_mm": "localization error",
            "val_map": "mAP", "val_loss": "validation loss", "loss": "training loss"}.get(base, base)


def _pair(kind: tuple[str, str, str], primary: str, maximize: bool) -> Objective:
    rate, error, on = kind
    tie = error if primary == rate else rate
    return Objective(primary, maximize, tie, tie in HIGHER_IS_BETTER, rate, error, on)


def default_objective() -> Objective:
    """Crop-level identification rate, ties by the crop-level error."""
    return _pair(CROPS, CROPS[0], True)


def metric_objective(metric: str, mode: str) -> Objective:
    """The objective of a single-objective study searching ``metric`` (``mode``: min or max)."""
    column = f"best_{metric}"
    kind = WHOLE_CTS if metric.startswith("val_ct_") else CROPS
    if column in kind[:2]:
        return _pair(kind, column, mode == "max")
    rate, error, on = kind  # val_map, val_loss, loss: ties by the error
    return Objective(column, mode == "max", error, False, rate, error, on)


def study_objective(trials: pd.DataFrame) -> Objective:
    """The objective of one study's trials: its recorded single ``search_metric`` (and mode), else
    :func:`default_objective`."""
    if "search_metric" not in trials or not len(trials):
        return default_objective()
    metrics = {str(m) for m in trials["search_metric"].dropna() if str(m)}
    if len(metrics) != 1:
        return default_objective()
    metric = metrics.pop()
    if f"best_{metric}" not in trials:
        return default_objective()
    modes = {str(m) for m in trials.get("search_mode", pd.Series(dtype=object)).dropna() if str(m)}
    mode = modes.pop() if len(modes) == 1 else ("max" if f"best_{metric}" in HIGHER_IS_BETTER else "min")
    return metric_objective(metric, mode)


def comparison_objective(trials: pd.DataFrame) -> Objective:
    """Across studies: whole-CT validation figures when every trial in ``trials`` has them, else
    crop-level ones (identification rate first, ties by the lower error)."""
    col = WHOLE_CTS[0]
    if len(trials) and col in trials and trials[col].astype(float).notna().all():
        return _pair(WHOLE_CTS, col, True)
    return default_objective()
