"""Reproducible studies (``search.reproducible: true``): the same study file, seed and code on the
same kind of machine give the same ``trials``, ``epochs`` and ``vertebrae`` tables, whatever else
the machine is doing and whichever trial finishes first.

Training a trial is deterministic (one thread, seeded); what made a study's answer move was
timing: which trials Optuna had seen finish when it was asked for the next one, which it saw
running (the constant liar), and at a rung of ASHA which trials had reached it first. Here every
one of those is decided by the trials' numbers and epochs, never by the clock:

- **Stable trial ids**: ``<5 hex of the study name's SHA-1>_<number, 5 digits>`` for search and
  grid studies alike (:func:`stable_prefix`), so the tables' keys, the checkpoints' folders and
  the W&B runs of two runs line up row by row.
- **Suggestions on a virtual clock** (:class:`VirtualClock`): time is counted in epochs, trial
  ``k`` starts, in this virtual schedule, when the first of ``concurrency`` slots frees up
  (trials in number order, each slot busy for the epochs its trial ran), and Optuna is asked
  for trial ``k`` seeing exactly the trials that ended by then in that schedule (told in number
  order) and the others as running. When the real order of events differs from the virtual one
  (a trial pruned early beside one that ran on), the free slot waits until the virtual one is
  known: that wait, and the rung waits below, are the price, measured in the README. Each
  suggestion draws from a sampler seeded with the study's seed and the trial's number, so a
  driver that resumes after a crash asks the same.
- **ASHA in trial order** (:class:`OrderedASHA`): a trial reaching a rung is compared with the
  trials of lower number that reached the same rung, as successive halving run one trial after
  the other would; it waits at the rung (its training thread blocked, nothing recomputed) until
  every trial of lower number has reported that rung or ended. Its rung records are rebuilt
  from the trials' stored results when a driver resumes.

Random search keeps only the seeding: its suggestions depend on no other trial, so nothing waits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ID_DIGITS = 5


def stable_prefix(study: str) -> str:
    """``<5 hex>_``: the prefix of a reproducible study's trial ids (the number follows)."""
    return hashlib.sha1(study.encode("utf-8")).hexdigest()[:5] + "_"


def stable_trial_id(study: str, number: int) -> str:
    """The id of trial ``number`` (0, 1, ...) of a reproducible study."""
    return f"{stable_prefix(study)}{number:0{ID_DIGITS}d}"


def trial_number(trial_id: str) -> int:
    """The number in a stable trial id (:func:`stable_trial_id`); ``ValueError`` for other ids."""
    head, _, digits = trial_id.rpartition("_")
    if not head or len(digits) != ID_DIGITS or not digits.isdigit():
        raise ValueError(f"{trial_id!r} is not a stable trial id (<prefix>_<{ID_DIGITS} digits>)")
    return int(digits)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: a function of the study's seed and the number only."""
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


@dataclass
class VirtualClock:
    """The virtual schedule of a study's trials, in epochs (see the module docstring).

    ``start[k]``: the virtual start of trial ``k``; ``progress[k]``: the epochs it has reported;
    ``end[k]``: its virtual end once it has ended (start + epochs it ran); ``slots``: the trial
    occupying each slot, lowest number first."""

    concurrency: int
    start: dict[int, int] = field(default_factory=dict)
    progress: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)
    slots: list[int] = field(default_factory=list)

    def next_start(self) -> int | None:
        """The virtual start of the next trial, or ``None`` while it is not known yet: a slot's
        trial has ended at ``t``, but a trial still running may end at or before ``t``."""
        if len(self.slots) < self.concurrency:
            return 0
        ended = [self.end[j] for j in self.slots if j in self.end]
        if not ended:
            return None
        t = min(ended)
        for j in self.slots:
            if j not in self.end and self.start[j] + self.progress.get(j, 0) <= t:
                return None
        return t

    def begin(self) -> tuple[int, int]:
        """Start the next trial: (its number, its virtual start). Call only when
        :meth:`next_start` is known."""
        t = self.next_start()
        if t is None:
            raise RuntimeError("the next trial's virtual start is not known yet")
        k = len(self.start)
        if len(self.slots) < self.concurrency:
            self.slots.append(k)
        else:
            freed = min((self.end[j], j) for j in self.slots if j in self.end)[1]
            self.slots[self.slots.index(freed)] = k
        self.start[k] = t
        return k, t

    def report(self, k: int, epoch: int) -> None:
        self.progress[k] = max(self.progress.get(k, 0), int(epoch))

    def finish(self, k: int, epochs: int | None = None) -> None:
        """Trial ``k`` ended after ``epochs`` epochs (default: those it reported)."""
        if epochs is not None:
            self.report(k, epochs)
        self.end[k] = self.start.get(k, 0) + self.progress.get(k, 0)

    def ended_by(self, t: int) -> list[int]:
        """The trials that ended at or before virtual time ``t``, by number."""
        return sorted(j for j, e in self.end.items() if e <= t)


@dataclass(frozen=True)
class SamplerFactory:
    """Optuna samplers of a study (picklable: Ray saves the searcher with it): the study's own
    (``number`` None) or one seeded for one trial (:func:`trial_seed`)."""

    algorithm: str
    seed: int
    tpe: dict[str, Any] = field(default_factory=dict)

    def __call__(self, number: int | None = None):
        import optuna

        seed = self.seed if number is None else trial_seed(self.seed, number)
        if self.algorithm == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, **self.tpe)


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """ASHA's rungs, ascending, as Ray's ``ASHAScheduler`` places them (one bracket)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


def rung_cutoff(values: list[float], reduction_factor: float) -> float | None:
    """The value a trial must reach at a rung not to be stopped, given the values (higher is
    better) recorded there before it: Ray's ASHA cutoff (``None``: nothing recorded yet)."""
    if not values:
        return None
    return float(np.nanpercentile(values, (1 - 1 / reduction_factor) * 100))


def _ray_scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class OrderedASHA(_ray_scheduler_base()):
    """ASHA over ``time_attr`` (epochs) whose decisions follow the trials' numbers, not the clock
    (module docstring). Rungs and cutoffs are those of Ray's ``ASHAScheduler`` with one bracket;
    a trial at rung ``m`` is compared with the values recorded at ``m`` by trials of lower
    number, and waits (its result answered with ``NOOP``: its training thread stays blocked in
    its report) until each of them has reported ``m`` or ended. Waits are resolved every step of
    Tune's loop (``choose_trial_to_run``). ``study_dir``: where a resumed driver reads the
    trials' stored results to rebuild the rung records."""

    def __init__(self, metric: str, mode: str, grace_period: int, reduction_factor: float, max_t: int,
                 study_dir: str | None = None, time_attr: str = "epoch"):
        super().__init__()
        self._metric, self._mode = metric, mode
        self._sign = 1.0 if mode == "max" else -1.0
        self._time_attr = time_attr
        self._rf = float(reduction_factor)
        self._milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self._study_dir = study_dir
        self._records: dict[float, dict[int, float]] = {m: {} for m in self._milestones}
        self._ended: set[int] = set()
        # number -> [trial, milestone, value, blocked]: blocked when its training thread waits
        # in its report (a wait rebuilt by a resumed driver is not, until the trial reports again)
        self._waiting: dict[int, list] = {}
        self._known: set[int] = set()
        self.stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # given at construction, from the study

    def debug_string(self) -> str:
        return f"Ordered ASHA: rungs {self._milestones}, {self.stopped} stopped"

    # -- bookkeeping -------------------------------------------------------------------------
    def _rung(self, k: int, t: float) -> float | None:
        """The highest rung at or below epoch ``t`` that trial ``k`` has not been decided at
        (as Ray's ASHA: one rung per result)."""
        for m in reversed(self._milestones):
            if t >= m:
                return None if k in self._records[m] else m
        return None

    def _value(self, result: dict) -> float | None:
        if result.get("phase") == "final" or self._time_attr not in result or self._metric not in result:
            return None
        value = result[self._metric]
        return self._sign * float(value) if isinstance(value, (int, float)) else math.nan

    def _ended_trials(self, controller) -> set[int]:
        from ray.tune.experiment import Trial

        ended = set(self._ended)
        for trial in controller.get_trials():
            if trial.status in (Trial.TERMINATED, Trial.ERROR):
                ended.add(trial_number(trial.trial_id))
        return ended

    def _ready(self, k: int, m: float, controller) -> bool:
        """Every trial of lower number has reported rung ``m`` or ended."""
        ended = self._ended_trials(controller)
        return all(j in self._records[m] or j in ended for j in range(k))

    def _decide(self, k: int, m: float, value: float) -> str:
        before = [v for j, v in self._records[m].items() if j < k]
        cutoff = rung_cutoff(before, self._rf)
        self._records[m][k] = value
        if cutoff is not None and value < cutoff:
            self.stopped += 1
            return self.STOP
        return self.CONTINUE

    def _learn(self, trial) -> None:
        """A trial first seen by this driver: its rung records from the results it stored (a
        resumed study; nothing for a new trial). A rung it reported last, with no later epoch
        and not ended, was being waited on when the driver stopped: it waits again."""
        from ray.tune.experiment import Trial

        k = trial_number(trial.trial_id)
        if k in self._known:
            return
        self._known.add(k)
        if self._study_dir is None:
            return
        from vertstudy.study.results import read_trial

        _, results = read_trial(self._study_dir, trial.trial_id)
        epochs = sorted({int(r[self._time_attr]): r for r in results if self._value(r) is not None}.items())
        last = epochs[-1][0] if epochs else 0
        for epoch, r in epochs:
            m = self._rung(k, epoch)
            if m is None:
                continue
            if epoch == last and trial.status != Trial.TERMINATED:
                self._waiting[k] = [trial, m, self._value(r), False]
            else:
                self._records[m][k] = self._value(r)
        if trial.status == Trial.TERMINATED:
            self._ended.add(k)

    # -- Tune's hooks --------------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial) -> None:
        self._learn(trial)
        entry = self._waiting.get(trial_number(trial.trial_id))
        if entry is not None:
            entry[0], entry[3] = trial, False  # a retried trial starts again from its checkpoint

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        k = trial_number(trial.trial_id)
        self._learn(trial)
        entry = self._waiting.get(k)
        if entry is not None:  # a rebuilt wait: hold the trial at its first result until decided
            entry[0], entry[3] = trial, True
            return self.NOOP
        value = self._value(result)
        m = self._rung(k, result[self._time_attr]) if value is not None else None
        if m is None:
            return self.CONTINUE
        if self._ready(k, m, tune_controller):
            return self._decide(k, m, value)
        self._waiting[k] = [trial, m, value, True]
        return self.NOOP

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        k = trial_number(trial.trial_id)
        self._ended.add(k)
        self._waiting.pop(k, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.on_trial_complete(tune_controller, trial, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        entry = self._waiting.get(trial_number(trial.trial_id))
        if entry is not None:
            entry[3] = False  # its thread is gone; a retry reports again

    def choose_trial_to_run(self, tune_controller):
        self._release(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def _release(self, controller) -> None:
        """Decide every waiting trial whose rung can now be decided, in number order: a stopped
        one is stopped, a blocked one that goes on is let go (the next ``train``)."""
        from vertstudy.study.compat import continue_training

        for k in sorted(self._waiting):
            trial, m, value, blocked = self._waiting[k]
            if not self._ready(k, m, controller):
                continue
            del self._waiting[k]
            if self._decide(k, m, value) == self.STOP:
                controller.stop_trial(trial)
            elif blocked:
                continue_training(controller, trial)


#: columns that say when, where and how fast a trial ran: left out when two runs of a study are
#: compared (``checkpoint`` is compared relative to its study directory, without the attempt folder)
VOLATILE_COLUMNS = frozenset({
    "wall_s", "started_at", "ended_at", "crops_per_s", "trial_s", "test_infer_s_per_case", "node", "hostname",
})
COMPARED_TABLES = ("trials", "epochs", "vertebrae")


def comparable_rows(study_dir: str, name: str) -> list[dict[str, Any]]:
    """The rows of table ``name`` of a study without :data:`VOLATILE_COLUMNS`, ``checkpoint``
    as ``<trial>/checkpoint_NNNNNN`` and NaN as None (so equal rows compare equal)."""
    from vertstudy.study.tables import read_table

    rows = []
    for row in read_table(study_dir, name).to_pylist():
        out = {}
        for k, v in row.items():
            if k in VOLATILE_COLUMNS:
                continue
            if k == "checkpoint" and v:
                parts = str(v).rstrip("/").split("/")
                keep = [i for i, p in enumerate(parts) if p.startswith("checkpoint_")]
                v = "/".join(parts[keep[-1] - 1: keep[-1] + 1]) if keep else v
            out[k] = None if isinstance(v, float) and math.isnan(v) else v
        rows.append(out)
    return rows


def compare_studies(dir_a: str, dir_b: str) -> dict[str, list[str]]:
    """What differs between two runs of a study, per table (:data:`COMPARED_TABLES`): one line
    per difference (row count, column set, or ``row i, column c: a != b``); empty lists when
    the tables are the same but for :data:`VOLATILE_COLUMNS`."""
    out: dict[str, list[str]] = {}
    for name in COMPARED_TABLES:
        a, b = comparable_rows(dir_a, name), comparable_rows(dir_b, name)
        diffs: list[str] = []
        if len(a) != len(b):
            diffs.append(f"{len(a)} rows != {len(b)} rows")
        cols_a, cols_b = {k for r in a for k in r}, {k for r in b for k in r}
        if cols_a != cols_b:
            diffs.append(f"columns only in the first: {sorted(cols_a - cols_b)}, only in the second: "
                         f"{sorted(cols_b - cols_a)}")
        for i, (ra, rb) in enumerate(zip(a, b)):
            for col in sorted(cols_a & cols_b):
                if ra.get(col) != rb.get(col):
                    key = ra.get("trial_id", "")
                    diffs.append(f"row {i} ({key}), column {col}: {ra.get(col)!r} != {rb.get(col)!r}")
        out[name] = diffs
    return out
