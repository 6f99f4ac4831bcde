"""The study file (``studies/*.yaml``): one typed, validated schema.

A study names its data (phantoms or a data set root), the defaults of the one
:class:`vertstudy.config.Config` (any field, dotted or nested), a search space over any config
field by its dotted name, the search algorithm, the scheduler, the number of trials, the
concurrency, the resources of one trial, seed repeats, where results go and how W&B logs.
Everything is checked here, before any trial starts: a bad file gives one line naming the
file, the field, the bad value and what is accepted.

Example (see ``studies/quickstart.yaml``)::

    name: quickstart
    data: {phantoms: {count: 30, seed: 0}, split: {val: 4, test: 6}}
    config: {model.width: 0.25, data.prep.spacing_mm: 4.0, train.epochs: 12}
    space:
      loss.balance_b: {type: float, low: 2.0, high: 4.0}
      train.lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}
      train.schedule.kind: {type: choice, values: [plateau, cosine, step]}
      train.schedule.gamma: {type: float, low: 0.3, high: 0.7, when: {train.schedule.kind: step}}
    search: {algorithm: optuna-tpe, metric: val_loc_error_mm, mode: min}
    scheduler: {kind: asha, grace_period: 4}
    num_samples: 6
    concurrency: 2
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from vertstudy.config import Config, StrictModel, load_config, validated
from vertstudy.errors import ConfigError, InputError

#: Metrics a trial reports every epoch (see :mod:`vertstudy.train.trainer`) that a search can optimize.
METRICS = ("val_loss", "val_loc_error_mm", "val_id_rate", "val_map", "loss", "val_ct_id_rate", "val_ct_loc_error_mm")
#: metrics that exist only when the trials label whole validation CTs (``train.whole_ct_every > 0``)
WHOLE_CT_METRICS = ("val_ct_id_rate", "val_ct_loc_error_mm")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PhantomData(StrictModel):
    """Synthetic spine CTs written by :mod:`vertstudy.data.phantom` (exact centroids)."""

    count: int = Field(30, ge=3, le=10000, description="phantom cases to write")
    seed: int = Field(0, ge=0, description="phantom generator seed")
    preset: Literal["coarse", "clinical"] = "coarse"


class SplitSpec(StrictModel):
    """Held-out parts of the case list, as counts (>= 1) or fractions (< 1) of the cases.

    The cases, sorted by id, are shuffled with ``seed``; the first ``test`` are held out for the
    final evaluation of each trial, the next ``val`` validate every epoch, the rest train."""

    val: float = Field(0.15, gt=0, description="validation cases: a count, or a fraction if < 1")
    test: float = Field(0.2, gt=0, description="held-out test cases: a count, or a fraction if < 1")
    seed: int = Field(0, ge=0)

    def counts(self, n: int) -> tuple[int, int]:
        """(val, test) case counts for ``n`` cases."""

        def count(v: float) -> int:
            return max(1, round(v * n)) if v < 1 else int(v)

        return count(self.val), count(self.test)


class DataSpec(StrictModel):
    phantoms: PhantomData | None = None
    root: str | None = Field(None, description="a data set directory (CSI 2014, VerSe or generic)")
    format: Literal["auto", "csi2014", "verse", "generic"] = "auto"
    cache_dir: str | None = Field(None, description="preprocessing cache; default <storage>/_cache")
    shared_cache: str | None = Field(
        None, description="URI (s3://, gs://, file://) the driver copies the split's cache entries to and trials "
                          "fetch them from, once per node; default <storage>/_cache when storage is an object store, "
                          "none (entries read in place, a shared path) otherwise")
    node_cache: str = Field("~/.cache/vertstudy/node", description="where a node keeps the entries it fetched")
    split: SplitSpec = SplitSpec()

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.phantoms is None) == (self.root is None):
            raise ValueError("give exactly one of 'phantoms' or 'root'")
        return self


class Param(StrictModel):
    """One search dimension over a config field.

    ``float``/``logfloat``: ``low``..``high``; ``int``: ``low``..``high`` (step ``step``);
    ``choice``: ``values``. ``when``: only sampled when an earlier choice parameter has one of
    the given values (a conditional space, e.g. a schedule kind's own parameters)."""

    type: Literal["float", "logfloat", "int", "choice"]
    low: float | None = None
    high: float | None = None
    step: int | None = Field(None, ge=1)
    values: list[Any] | None = None
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Param:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice parameter needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice parameter takes 'values', not 'low'/'high'")
        else:
            if self.low is None or self.high is None or self.values is not None:
                raise ValueError(f"a {self.type} parameter needs 'low' and 'high' (and no 'values')")
            if not self.low < self.high:
                raise ValueError(f"'low' must be below 'high', got low={self.low} high={self.high}")
            if self.type == "logfloat" and self.low <= 0:
                raise ValueError(f"a logfloat parameter needs low > 0, got {self.low}")
            if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError(f"an int parameter needs whole bounds, got {self.low}..{self.high}")
        return self


class SearchSpec(StrictModel):
    algorithm: Literal["optuna-tpe", "random", "grid", "optuna-multi"] = "optuna-tpe"
    metric: str = Field("val_loc_error_mm", description="what one-objective searches and ASHA optimize")
    mode: Literal["min", "max"] = "min"
    metrics: list[str] = Field(["val_loc_error_mm", "val_id_rate"], description="optuna-multi objectives")
    modes: list[Literal["min", "max"]] = ["min", "max"]
    seed: int = Field(0, ge=0, description="sampler seed")
    startup_trials: int | None = Field(None, ge=1, description="TPE: random trials before it models (default: a "
                                       "third of num_samples, 2 to 10)")
    constant_liar: bool | None = Field(None, description="TPE: constant liar for trials running at once "
                                       "(default: on when concurrency > 1)")
    optuna_storage: str | None = Field(None, description="Optuna storage URL; default sqlite in the study dir")
    reproducible: bool = Field(
        True, description="the same tables from the same study file, seed and code, whatever the timing: stable "
        "trial ids, suggestions on a virtual clock of epochs, ASHA in trial order (vertstudy.study.ordered); off: "
        "Tune's random ids and Optuna and ASHA as trials happen to end. Default: on for searches, off for grid")

    @model_validator(mode="before")
    @classmethod
    def _reproducible_default(cls, data: Any) -> Any:
        """``reproducible`` left out: on for a search (its price, a free slot waiting for the
        virtual schedule, measured at 1.1 % of the quickstart's slot time alone), off for a
        grid (no Optuna; without ASHA its tables are reproducible but for the trial ids already)."""
        if isinstance(data, dict) and data.get("reproducible") is None:
            algorithm = data.get("algorithm", cls.model_fields["algorithm"].default)
            data = {**data, "reproducible": algorithm != "grid"}
        return data

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; accepted: {', '.join(METRICS)}")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METRICS]
        if bad or len(v) < 2:
            raise ValueError(f"need 2 or more of {', '.join(METRICS)}, got {v}")
        return v

    @property
    def is_grid(self) -> bool:
        """Tune's own grid expansion: no Optuna, choice parameters only."""
        return self.algorithm == "grid"

    @property
    def multi_objective(self) -> bool:
        """Optuna's multi-objective search over ``metrics``: no single metric to rank or stop by."""
        return self.algorithm == "optuna-multi"

    @property
    def objectives(self) -> list[str]:
        """The metrics the search optimizes: ``metrics`` for a multi-objective search, else ``[metric]``."""
        return list(self.metrics) if self.multi_objective else [self.metric]

    @model_validator(mode="after")
    def _pairs(self) -> SearchSpec:
        if len(self.metrics) != len(self.modes):
            raise ValueError(f"'metrics' and 'modes' differ in length ({len(self.metrics)} vs {len(self.modes)})")
        return self


class SchedulerSpec(StrictModel):
    """ASHA (asynchronous successive halving) over epochs, or none."""

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(StrictModel):
    cpus: float = Field(1.0, gt=0, description="CPUs per trial (also its torch threads)")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial; a fraction lets small trials share a GPU")

    @field_validator("gpus")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"more than one GPU must be a whole number, got {v}")
        return v


class WandbSpec(StrictModel):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "vertstudy"
    entity: str | None = None


class StudySpec(StrictModel):
    """A whole study file. ``config`` holds the defaults of :class:`Config` (dotted or nested)."""

    name: str
    description: str = ""
    data: DataSpec
    config: dict[str, Any] = {}
    space: dict[str, Param] = {}
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: int = Field(8, ge=1, description="trials (for grid: repetitions of the whole grid)")
    concurrency: int = Field(2, ge=1, description="trials running at once")
    resources: Resources = Resources()
    repeats: int = Field(1, ge=1, description="seeds per configuration (grid search only)")
    max_retries: int = Field(2, ge=0, description="restarts of a failed trial from its last checkpoint")
    keep_checkpoints: int = Field(
        2, ge=1, description="newest checkpoints kept per trial (the latest to resume from, older ones to fall back "
        "to when it does not load; each holds the trial's best.pt)")
    storage: str = Field("runs", description="local directory or pyarrow URI; the study writes <storage>/<name>/")
    wandb: WandbSpec = WandbSpec()
    smoke: dict[str, Any] = Field({}, description="extra config overrides for --smoke")
    cpu: dict[str, Any] = Field({}, description="extra config overrides for --scale cpu")
    inject_failure_at_epoch: int | None = Field(
        None, ge=1, description="fault drill: each trial raises once after this epoch's checkpoint (tests resume)"
    )
    inject_delay_s: float | None = Field(
        None, gt=0, description="timing drill: every epoch of every trial waits a random 0 to this many seconds "
        "before it reports (tests that a reproducible study does not depend on which trial finishes first)"
    )
    inject_corrupt_checkpoint_at_epoch: int | None = Field(
        None, ge=1, description="fault drill: each trial reports this epoch's checkpoint with a truncated last.pt, "
        "then raises once (tests the fallback to an older checkpoint)"
    )

    @functools.cached_property
    def base_config(self) -> Config:
        """The study's :class:`Config` (``config`` over the defaults), built once; every trial's
        config starts from it (``validate_spec`` has checked it, naming the file)."""
        return load_config(self.config, where=f"study {self.name}: config")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"must be 1-64 letters, digits, '_', '.', '-' starting with a letter or digit, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        search = self.search
        if self.scheduler.kind == "asha" and search.multi_objective:
            raise ValueError("scheduler 'asha' needs one metric; use scheduler: {kind: none} with optuna-multi")
        if self.repeats > 1 and not search.is_grid:
            raise ValueError(f"repeats > 1 needs search.algorithm 'grid', got {search.algorithm!r}")
        if not self.space and self.repeats == 1:
            raise ValueError("the search space is empty: add parameters under 'space' (or repeats > 1 for grid)")

        names = list(self.space)
        for i, (name, p) in enumerate(self.space.items()):
            if search.is_grid and p.type != "choice":
                raise ValueError(f"space.{name}: grid search takes choice parameters only, got {p.type!r}")
            for cond, wanted in (p.when or {}).items():
                if search.is_grid:
                    raise ValueError(f"space.{name}: grid search has no conditional parameters ('when')")
                if cond not in names[:i] or self.space[cond].type != "choice":
                    raise ValueError(f"space.{name}.when: {cond!r} must be a choice parameter listed before it")
                allowed = self.space[cond].values or []
                for w in wanted if isinstance(wanted, list) else [wanted]:
                    if w not in allowed:
                        raise ValueError(f"space.{name}.when: {cond}={w!r} is not one of its values {allowed}")
        return self


def config_fields() -> list[str]:
    """Every dotted leaf name of :class:`Config`, e.g. ``loss.balance_b``."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += walk(ann, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    return walk(Config, "")


def _check_space(spec: StudySpec, where: str) -> None:
    """Every parameter names a config field, and its values/bounds are values that field accepts."""
    fields = config_fields()
    for name, p in spec.space.items():
        if name not in fields:
            close = [f for f in fields if f.endswith("." + name.split(".")[-1])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: space: unknown parameter {name!r}{hint}; accepted: any config field")
        if name.startswith("data.prep."):
            raise ConfigError(f"{where}: space: {name!r} cannot be searched: every trial of a study shares one "
                              "preprocessed cache; run one study per preprocessing setting")
        samples = p.values if p.type == "choice" else [p.low, p.high]
        if p.type == "int":
            samples = [int(s) for s in samples]
        for value in samples:
            load_config({**spec.config, name: value}, where=f"{where}: space.{name}")


def validate_spec(raw: Any, where: str) -> StudySpec:
    """A :class:`StudySpec` from parsed YAML, every value checked (``ConfigError`` on the first bad one)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study file must be a mapping of fields, got {type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: field names must be text, got {bad[0]!r}")
    spec = validated(StudySpec, where, **raw)
    cfg = load_config(spec.config, where=f"{where}: config")
    load_config({**spec.config, **spec.smoke}, where=f"{where}: smoke")
    load_config({**spec.config, **CPU_CONFIG, **spec.cpu}, where=f"{where}: cpu")
    for metric in {spec.search.metric, *spec.search.objectives}:
        if metric in WHOLE_CT_METRICS and cfg.train.whole_ct_every == 0:
            raise ConfigError(f"{where}: search metric {metric!r} needs config 'train.whole_ct_every' > 0 "
                              "(epochs between whole-CT validations)")
    _check_space(spec, where)
    return spec


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "study file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the study file ({exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(path, f"not valid YAML{at} ({problem})") from None
    return validate_spec(raw, str(path))


#: Config fields that say where and how fast a trial runs, not what it learns: two trials that
#: differ only in these (and the seed) train the same configuration (the report's signatures
#: and the study planner's duplicates leave them out).
RUN_ONLY_FIELDS = ("seed", "train.device", "train.workers", "train.amp", "infer.batch_size")


#: What ``--smoke`` sets: a CPU-scale study of the same shape (same space kinds, same search,
#: same tables) that finishes in about a minute.
SMOKE_CONFIG: dict[str, Any] = {
    "model.width": 0.125,
    "model.lstm_hidden": 8,
    "model.lstm_layers": 1,
    "data.prep.spacing_mm": 8.0,
    "data.crop.crop_size": (16, 16, 16),
    "data.crop.crops_per_case": 2,
    "train.epochs": 2,
    "train.batch_size": 2,
    "train.val_crops_per_case": 1,
    "train.workers": 0,
    "train.device": "cpu",
    "infer.stride": (8, 8, 8),
}


def _unfixed_space(spec: StudySpec, overrides: dict[str, Any], flag: str, section: str) -> dict[str, Param]:
    """``spec.space`` without the parameters ``overrides`` (of ``flag``, and the file's ``section``)
    fix (file order: a condition always precedes what it conditions, so a dropped condition drops
    what it conditions)."""
    space: dict[str, Param] = {}
    for k, v in spec.space.items():
        if k not in overrides and all(c in space for c in v.when or {}):
            space[k] = v
    if not space and spec.repeats == 1:
        raise ConfigError(f"study {spec.name!r}: {flag} fixes every searched parameter ({', '.join(spec.space)}); "
                          f"add a '{section}' override or a parameter {flag} does not fix")
    return space


def smoke(spec: StudySpec) -> StudySpec:
    """The CPU-scale version of ``spec``: 5 coarse phantoms at 8 mm, a width-0.125 network on
    16^3 crops for 2 epochs, at most 2 trials (grids keep every point, one seed), 1 CPU and no
    GPU per trial, plus the study's own ``smoke`` overrides. Parameters that the smoke settings
    fix are dropped from the space."""
    overrides = {**SMOKE_CONFIG, **spec.smoke}
    space = _unfixed_space(spec, overrides, "--smoke", "smoke")
    repeats = 1 if space else min(spec.repeats, 2)
    return _scaled(
        spec, "smoke", overrides, space, PhantomData(count=5, seed=_phantom_seed(spec)), {"val": 1, "test": 1},
        num_samples=min(spec.num_samples, 2) if not spec.search.is_grid else 1,
        concurrency=min(spec.concurrency, 2),
        repeats=repeats,
        scheduler=spec.scheduler.model_copy(update={"grace_period": 1}),
    )


def _phantom_seed(spec: StudySpec) -> int:
    return spec.data.phantoms.seed if spec.data.phantoms else 0


def _scaled(spec: StudySpec, suffix: str, overrides: dict[str, Any], space: dict[str, Param], phantoms: PhantomData,
            split: dict[str, int], **update: Any) -> StudySpec:
    """``spec`` named ``<name>-<suffix>`` on ``phantoms`` split ``split`` (the file's split seed and
    cache settings kept), with ``overrides`` over its config, ``space``, 1 CPU and no GPU per trial,
    and the further fields ``update``: what :func:`smoke` and :func:`cpu_scale` share."""
    data = DataSpec(
        phantoms=phantoms, cache_dir=spec.data.cache_dir, shared_cache=spec.data.shared_cache,
        node_cache=spec.data.node_cache, split=SplitSpec(**split, seed=spec.data.split.seed),
    )
    return spec.model_copy(
        update={
            "name": spec.name if spec.name.endswith(f"-{suffix}") else f"{spec.name}-{suffix}",
            "data": data,
            "config": {**spec.config, **overrides},
            "space": space,
            "resources": Resources(cpus=1, gpus=0),
            **update,
        }
    )


#: What ``--scale cpu`` sets: the quickstart's recipe that learns on 2 CPU cores (coarse
#: phantoms at 4 mm, width 0.25 on 48x32x32 crops = 192x128x128 mm, lr 0.003 with the step
#: schedule that won the quickstart's search, halving the lr every third of the run, whole-CT
#: validation at epochs 1, 9, ..., 45, best.pt and so the held-out evaluation on the best one),
#: for 45 epochs of 36 phantoms x 4 crops = 6,480 crops (the quickstart's best trial labelled at
#: 60 % after 5,600), sized so the four table files fit 2.5 h on 2 cores. Everything else (loss, B,
#: lambda, batch, weight decay) stays the study file's, the same on both sides of every
#: ablation. ``train.amp: auto`` trains in bf16 on a CPU with native bf16 (the files' ``true``
#: means bf16 on CUDA only). Times, measured per epoch: README, "The tables at CPU scale".
CPU_CONFIG: dict[str, Any] = {
    "model.width": 0.25,
    "data.prep.spacing_mm": 4.0,
    "data.crop.crop_size": (48, 32, 32),
    "train.lr": 0.003,
    "train.schedule.kind": "step",
    "train.schedule.step_size": 15,
    "train.epochs": 45,
    "train.whole_ct_every": 9,
    "train.select_on": "val_ct",
    "train.workers": 0,
    "train.device": "cpu",
    "train.amp": "auto",
}
#: The phantoms of ``--scale cpu``: one set, and one split, for every study of the profile, so
#: every table's rows are measured on the same 20 held-out phantoms (seeds: the study file's).
CPU_PHANTOMS = 60
CPU_SPLIT = {"val": 4, "test": 20}


def cpu_scale(spec: StudySpec) -> StudySpec:
    """The ``--scale cpu`` version of a grid (ablation) study: :data:`CPU_CONFIG` plus the study's
    own ``cpu`` overrides over its ``config``; :data:`CPU_PHANTOMS` coarse phantoms split
    :data:`CPU_SPLIT` (36 train, 4 validation, 20 held out); every grid point with all its seeds
    (``repeats``), two trials at once on 1 CPU each, no GPU; named ``<name>-cpu``. Parameters the
    overrides fix are dropped from the space. ``ConfigError`` for a search study (Optuna, random):
    ``quickstart.yaml`` is the CPU-sized search."""
    if not spec.search.is_grid:
        raise ConfigError(f"study {spec.name!r}: --scale cpu runs the ablation grids (studies/table1-4.yaml); "
                          f"this study searches with {spec.search.algorithm!r}: run studies/quickstart.yaml for a "
                          "CPU-sized search, or --smoke")
    overrides = {**CPU_CONFIG, **spec.cpu}
    space = _unfixed_space(spec, overrides, "--scale cpu", "cpu")
    phantoms = PhantomData(count=CPU_PHANTOMS, seed=_phantom_seed(spec), preset="coarse")
    return _scaled(spec, "cpu", overrides, space, phantoms, CPU_SPLIT, num_samples=1, concurrency=2)


#: ``--scale NAME``: the functions that size a study for a machine (``--smoke`` is ``--scale smoke``)
SCALES = {"smoke": smoke, "cpu": cpu_scale}


def total_trials(spec: StudySpec) -> int:
    """Trials the study has when it is done: ``num_samples``, or for a grid every point x
    seed x ``num_samples``."""
    if not spec.search.is_grid:
        return spec.num_samples
    return math.prod(len(p.values or []) for p in spec.space.values()) * spec.repeats * spec.num_samples


def trial_seeds(spec: StudySpec) -> list[int]:
    """The seeds a grid study repeats each configuration with: ``seed, seed+1, ...``."""
    base = int(spec.base_config.seed)
    return [base + i for i in range(spec.repeats)]


def choice_label(value: Any) -> Any:
    """An Optuna-storable label of a choice value: scalars as they are, sequences as ``48x32x32``
    (numbers) or their repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return "x".join(f"{v:g}" for v in value)
    return repr(value)

