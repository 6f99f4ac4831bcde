"""Driver-side Tune callbacks: rebuild the tables when a trial ends, the trials' W&B runs, and a
live trials table.

All are pickled into Ray's ``tuner.pkl``; the rich display and the open W&B runs are created
lazily and never pickled.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from vertstudy.config import flat_config
from vertstudy.study.space import trial_config
from vertstudy.study.spec import StudySpec
from vertstudy.study.tracking import TrialRun, WandbSettings, warn_not_logged


class TablesCallback(tune.Callback):
    """Calls ``refresh({trial_id: "complete" | "error"})`` after every trial that ends.

    A refresh that fails (e.g. the storage is briefly unreachable) is logged and does not stop
    the study: the next trial's end, the end of the study and ``study export`` rebuild the same
    tables from Ray's results."""

    def __init__(self, refresh: Callable[[dict[str, str], dict[str, list[dict]]], Any]):
        self._refresh = refresh
        self._ended: dict[str, str] = {}
        self._results: dict[str, list[dict]] = {}  # what this driver received, ahead of Ray's copy to storage

    def _safe_refresh(self) -> None:
        try:
            self._refresh(dict(self._ended), {k: list(v) for k, v in self._results.items()})
        except Exception as exc:  # one line: a full disk or a storage hiccup is not a bug of ours
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            logging.getLogger("vertstudy").warning(
                "could not rewrite the study tables (%s: %s); they are rebuilt when the next trial ends, "
                "at the end of the study, or by `vertstudy study export`", type(exc).__name__, first)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._results.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended[trial.trial_id] = "complete"
        self._safe_refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended[trial.trial_id] = "error"
        self._safe_refresh()


class TrackingCallback(tune.Callback):
    """One W&B run per trial (:class:`vertstudy.study.tracking.TrialRun`: id ``<study>-<trial_id>``,
    grouped by study, the trial's flat config), written here in the driver from the results Tune
    receives, so trial workers never import wandb and need no W&B key or network:

    - started when the trial starts, and resumed under the same id when a retried or resumed
      trial starts again;
    - the numeric entries of each epoch record logged at ``step=epoch`` (Tune's own bookkeeping
      keys left out), the final result as the run's summary;
    - finished when the trial ends: exit code 0 when it ended or the scheduler stopped it, 1 when
      it failed (also before a retry); still open when the study stops (Ctrl-C): 0, a resume
      continues the run.

    A W&B error is one warning line per trial and never stops the study; the trial's final result
    then names no run (``wandb_run`` empty). Listed before the tables' callbacks, which see the
    same result."""

    def __init__(self, spec: StudySpec, settings: WandbSettings):
        self._spec, self._settings = spec, settings
        self._runs: dict[str, TrialRun] = {}  # trial id -> its open run
        self._broken: set[str] = set()  # trials whose run could not be logged (warned once)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runs"] = {}
        return state

    def _try(self, trial_id: str, action: Callable[[], Any]) -> None:
        if trial_id in self._broken:
            return
        try:
            action()
        except Exception as exc:  # W&B must never fail the study
            self._broken.add(trial_id)
            self._runs.pop(trial_id, None)
            warn_not_logged(f"the run of trial {trial_id}", exc)

    def on_trial_start(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        if self._settings.mode == "disabled" or tid in self._runs:
            return
        self._broken.discard(tid)  # a restarted trial tries again
        run = TrialRun(self._settings, self._spec.name, tid, flat_config(trial_config(self._spec, trial.config or {})),
                       resume=True)  # "allow": a new run, or the one an earlier attempt or driver began

        def start() -> None:
            run.start()
            self._runs[tid] = run

        self._try(tid, start)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        run = self._runs.get(tid)
        record = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
        final = record.get("phase") == "final"
        if run is not None and final:
            self._try(tid, lambda: run.summary(record))
        elif run is not None and "epoch" in record:
            self._try(tid, lambda: run.log_epoch(record))
        if final and self._settings.mode != "disabled" and tid not in self._runs:
            # the callbacks after this one (the tables, result.json) see the same result: the
            # trial's row names no run that W&B did not get
            result["wandb_run"] = ""

    def _finish(self, trial_id: str, exit_code: int) -> None:
        run = self._runs.pop(trial_id, None)
        if run is not None:
            self._try(trial_id, lambda: run.finish(exit_code))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial.trial_id, 0)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._finish(trial.trial_id, 1)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial.trial_id, 1)

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self._runs):
            self._finish(trial_id, 0)


# what Tune adds to every result, not the trainer's record (the trainer's record has its own hostname)
_TUNE_KEYS = (frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}) - {"hostname"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4g}"
    return "" if v is None else str(v)


class LiveTable(tune.Callback):
    """A rich table of the trials (status, epoch, metric, best, sampled values) refreshed while
    the study runs; on stderr, so stdout stays clean for scripts."""

    MAX_ROWS = 24

    def __init__(self, spec: StudySpec):
        self._name = spec.name
        self._metric = spec.search.metric
        self._mode = spec.search.mode
        self._space = list(spec.space)
        self._last: dict[str, dict] = {}
        self._status: dict[str, str] = {}
        self._params: dict[str, dict] = {}
        self._best: dict[str, float] = {}
        self._live = None
        self._t0 = time.time()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_live"] = None
        return state

    def _render(self):
        from rich.table import Table

        done = sum(s != "RUNNING" for s in self._status.values())
        table = Table(title=f"study {self._name}: {done}/{len(self._status)} trials ended, "
                            f"{time.time() - self._t0:.0f} s", title_justify="left")
        short = self._metric.replace("val_", "").replace("_mm", " mm")
        for col in ("trial", "status", "epoch", short, f"best {short}", *(p.split(".")[-1] for p in self._space)):
            table.add_column(col, no_wrap=True)
        for tid in list(self._status)[-self.MAX_ROWS:]:
            last = self._last.get(tid, {})
            params = self._params.get(tid, {})
            table.add_row(tid, self._status[tid], _fmt(last.get("epoch")), _fmt(last.get(self._metric)),
                          _fmt(self._best.get(tid)), *(_fmt(params.get(p, "-")) for p in self._space))
        return table

    def _update(self) -> None:
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(stderr=True, width=160), refresh_per_second=2,
                              transient=False)
            self._live.start()
        else:
            self._live.update(self._render())

    def _see(self, trial, status: str) -> None:
        self._status[trial.trial_id] = status
        self._params[trial.trial_id] = dict(trial.config or {})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._see(trial, "RUNNING")
        self._update()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._see(trial, "RUNNING")
        self._last[trial.trial_id] = result
        value = result.get(self._metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and result.get("phase") == "epoch":
            old = self._best.get(trial.trial_id)
            better = old is None or (value < old if self._mode == "min" else value > old)
            self._best[trial.trial_id] = value if better else old
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        final = self._last.get(trial.trial_id, {})
        self._see(trial, str(final.get("status", "pruned")) if final.get("phase") == "final" else "pruned")
        self._update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._see(trial, "error")
        self._update()

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live.console.print()
            self._live = None
