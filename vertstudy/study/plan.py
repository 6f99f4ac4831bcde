"""Several study files as one run: each configuration trained once, each study run, resumed or
skipped.

The paper's ablation files overlap: Table II's Bi-LSTM row, Table III's localization +
classification row and Table IV are one network (integral head, Bi-LSTM, both tasks), and Table
I's integral row is Table III's localization-only row. The report pools the trials of every
study it is given by configuration (:mod:`vertstudy.report.ablation`: a trial fills any table
whose row its configuration matches, whatever study ran it), so such a configuration only needs
training once.

:func:`plan_studies` takes the studies in the order given and, for each grid study, drops the
grid points an earlier study of the list already trains: the same data (phantoms or root,
format, split), the same trial :class:`~vertstudy.config.Config` but for
:data:`~vertstudy.study.spec.RUN_ONLY_FIELDS` (the report's signature), and the same seeds. A grid
stays a product of its parameters' values, so a value is dropped when every grid point with it
is trained earlier; a study none of whose points is left is not run at all. Search studies
(Optuna, random) are run as they are.

:func:`run_planned` runs the planned studies one after the other on one Ray cluster: a study
whose directory does not exist is run, one whose trials have all ended (none in ``error``) is
skipped, any other is resumed (:func:`vertstudy.study.runner.resume_study`), so the same command
continues a run that was cut off. A study directory that holds other trials than the plan's
(the files were edited since) is refused before anything runs.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vertstudy.config import Config, flat_config
from vertstudy.errors import ConfigError
from vertstudy.study.spec import RUN_ONLY_FIELDS, StudySpec, choice_label, total_trials, trial_seeds

#: what identifies the trials of a study directory: a stored study that differs from the plan in
#: any of these holds other trials
SAME_TRIALS = ("name", "data", "config", "space", "search", "scheduler", "num_samples", "repeats")
DATA_FIELDS = {"phantoms", "root", "format", "split"}  # the cases; caches do not change them


@dataclass(frozen=True)
class Planned:
    """One study of a plan: ``asked`` as given, ``spec`` what runs (``None``: every grid point is
    trained by an earlier study), ``shared`` the dropped grid points with the study that trains
    each, ``again`` points an earlier study also trains but this grid cannot drop alone."""

    asked: StudySpec
    spec: StudySpec | None
    shared: tuple[tuple[dict[str, Any], str], ...] = ()
    again: tuple[dict[str, Any], ...] = ()

    def describe(self) -> str:
        """One line: what this study trains, and what it leaves to others."""
        name = self.asked.name
        by = "; ".join(f"{point_text(p)} is trained by {study}" for p, study in self.shared)
        if self.spec is None:
            return f"{name}: nothing to train ({by})"
        spec = self.spec
        grid = ", ".join(f"{k}: {'/'.join(str(v) for v in p.values or [])}" for k, p in spec.space.items())
        what = (f"{total_trials(spec)} trials ({grid or 'one configuration'} x {spec.repeats} seed(s))"
                if spec.search.is_grid else f"{spec.num_samples} trials ({spec.search.algorithm})")
        extra = f"; {by}" if by else ""
        if self.again:
            extra += f"; trained again: {', '.join(point_text(p) for p in self.again)}"
        return f"{name}: {what}{extra}"


def point_text(point: dict[str, Any]) -> str:
    """``model.tasks=loc`` (``its configuration`` for the one point of an empty grid)."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "its configuration"


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every point of a grid study's space, ``{parameter: value}`` in file order (``[{}]`` for an
    empty space)."""
    names = list(spec.space)
    return [dict(zip(names, values)) for values in itertools.product(*(spec.space[n].values or [] for n in names))]


def point_config(spec: StudySpec, point: dict[str, Any], seed: int | None = None) -> Config:
    """The trial config of ``point`` (``seed``: the trial's seed, else the study's)."""
    from vertstudy.study.space import trial_config

    params: dict[str, Any] = {k: choice_label(v) for k, v in point.items()}
    if seed is not None:
        params["seed"] = seed
    return trial_config(spec, params)


def configuration_key(spec: StudySpec, point: dict[str, Any]) -> str:
    """What makes two grid points the same training, as text: the study's data and the point's
    trial config without :data:`RUN_ONLY_FIELDS` (seeds are compared apart)."""
    data = spec.data.model_dump(mode="json", include=DATA_FIELDS)
    cfg = {k: v for k, v in flat_config(point_config(spec, point)).items() if k not in RUN_ONLY_FIELDS}
    return json.dumps({"data": data, "config": cfg}, sort_keys=True, default=str)


def planned_trials(spec: StudySpec) -> list[Config]:
    """The config of every trial a grid study runs: each point x seed (x ``num_samples``)."""
    seeds = trial_seeds(spec) if spec.repeats > 1 else [None]
    return [point_config(spec, p, s) for _ in range(spec.num_samples) for p in grid_points(spec) for s in seeds]


def plan_studies(specs: list[StudySpec]) -> list[Planned]:
    """The studies in order, each grid without the points an earlier one trains (module docstring).
    ``ConfigError`` when two studies have the same name (they would share a directory)."""
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"study {twice[0]!r} is given twice; each study file runs once")
    trained: dict[str, tuple[str, frozenset[int], int]] = {}  # key -> (study, seeds, num_samples)
    plans = []
    for spec in specs:
        if not spec.search.is_grid:
            plans.append(Planned(spec, spec))
            continue
        seeds = frozenset(trial_seeds(spec))
        points = grid_points(spec)
        keys = [configuration_key(spec, p) for p in points]
        owner: list[str | None] = []  # the earlier study that trains each point, if any
        for key in keys:
            got = trained.get(key)
            owner.append(got[0] if got and seeds <= got[1] and spec.num_samples <= got[2] else None)
        shared = tuple((p, o) for p, o in zip(points, owner) if o)
        if len(shared) == len(points):
            plans.append(Planned(spec, None, shared))
            continue
        values = {k: list(p.values or []) for k, p in spec.space.items()}
        keep = [True] * len(points)
        changed = True
        while changed:  # drop a value when every point with it is trained earlier
            changed = False
            for name, kept in values.items():
                for v in list(kept):
                    mine = [i for i, p in enumerate(points) if keep[i] and p[name] == v]
                    if len(kept) > 1 and mine and all(owner[i] for i in mine):
                        kept.remove(v)
                        for i in mine:
                            keep[i] = False
                        changed = True
        space = {k: p.model_copy(update={"values": values[k]}) for k, p in spec.space.items()}
        runs = spec.model_copy(update={"space": space}) if not all(keep) else spec
        for i, key in enumerate(keys):
            if keep[i]:
                trained.setdefault(key, (spec.name, seeds, spec.num_samples))
        dropped = tuple((p, o) for p, o, k in zip(points, owner, keep) if not k)
        again = tuple(p for p, o, k in zip(points, owner, keep) if k and o)
        plans.append(Planned(spec, runs, dropped, again))
    return plans


# -- running -------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What :func:`run_planned` did with one planned study."""

    name: str
    action: str  # "ran" | "resumed" | "finished" (already, skipped) | "shared" (nothing to train)
    study_dir: str | None = None
    result: Any = None  # the StudyResult of a run or resume
    note: str = ""
    extra: dict = field(default_factory=dict)


def _trials_part(spec: StudySpec) -> dict:
    dumped = spec.model_dump(mode="json", include=set(SAME_TRIALS))
    dumped["data"] = {k: v for k, v in dumped["data"].items() if k in DATA_FIELDS}
    # where Optuna keeps its study, and whether the search waits for a timing-free order
    # (``reproducible``, whose default changed), do not change which trials the study holds: a
    # study resumes with what its study.json says
    dumped["search"] = {k: v for k, v in dumped["search"].items() if k not in ("optuna_storage", "reproducible")}
    return dumped


def study_state(spec: StudySpec) -> tuple[str, str]:
    """(``new`` | ``finished`` | ``unfinished``, study directory) of the planned ``spec``:
    finished when every trial ended and none is in ``error``. ``ConfigError`` when the directory
    holds a study of other trials."""
    from vertstudy.study import storage
    from vertstudy.study.runner import load_study_dir, study_dir_of
    from vertstudy.study.tables import read_table

    study_dir = study_dir_of(spec)
    if not storage.exists(storage.uri_join(study_dir, "study.json")):
        return "new", study_dir
    # the stored study's own settings: a default changed since it began is not a changed study
    # (its resume trains on with the old value: runner.changed_defaults)
    stored, _ = load_study_dir(study_dir, pin_defaults=False)
    mine, theirs = _trials_part(spec), _trials_part(stored)
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ConfigError(
            f"{study_dir} holds study {stored.name!r} with other trials than this run plans (it differs in "
            f"{', '.join(diff)}: a study file changed since it started); continue it alone with `vertstudy study "
            f"resume {study_dir}`, or move it away and run again")
    rows = read_table(study_dir, "trials").to_pylist()
    done = len(rows) >= total_trials(spec) and not any(r.get("status") == "error" for r in rows)
    return ("finished" if done else "unfinished"), study_dir


def run_planned(plans: list[Planned], address: str | None = None, progress: bool = True,
                say: Callable[[str], None] = lambda _: None) -> list[Outcome]:
    """Run, resume or skip each planned study in order (module docstring); stops after a study
    that was interrupted (its outcome's ``result.interrupted``). Every study directory is checked
    against the plan before the first one starts."""
    from vertstudy.study.runner import resume_study, run_study

    states = {p.spec.name: study_state(p.spec) for p in plans if p.spec is not None}
    outcomes = []
    for p in plans:
        if p.spec is None:
            outcomes.append(Outcome(p.asked.name, "shared", note=p.describe()))
            say(f"{p.describe()}: skipped")
            continue
        state, study_dir = states[p.spec.name]
        if state == "finished":
            outcomes.append(Outcome(p.spec.name, "finished", study_dir))
            say(f"{p.spec.name}: every trial has ended ({study_dir}): skipped")
            continue
        say(f"{p.spec.name}: {'resuming' if state == 'unfinished' else 'running'} {p.describe().split(': ', 1)[1]}")
        if state == "unfinished":
            result = resume_study(study_dir, address=address, progress=progress)
        else:
            result = run_study(p.spec, address=address, progress=progress)
        outcomes.append(Outcome(p.spec.name, "resumed" if state == "unfinished" else "ran", result.study_dir, result))
        if result.interrupted:
            break
    return outcomes
