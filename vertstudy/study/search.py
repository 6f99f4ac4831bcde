"""The search algorithm and the trial scheduler of a study.

Optuna searches (TPE, random, multi-objective) run through Ray's ``OptunaSearch`` with a
persistent storage; grids use Tune's own grid expansion; ASHA stops weak trials by epoch.

Optuna's storage is ``search.optuna_storage``: an SQLAlchemy URL (a server database such as
``postgresql://vertstudy@db-host/optuna`` for many writers on a cluster) or ``journal:<path>``
(Optuna's JournalStorage in a file, which Optuna supports on a shared file system); by default
SQLite in the study directory, for one machine. The URL never carries a password: Ray pickles
the search algorithm, storage URL included, into the study directory, and the URL is saved in
``study.json``. PostgreSQL's client library takes the password from ``PGPASSWORD`` (or
``~/.pgpass``) in the environment, which a cluster fills from a secret.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from vertstudy.errors import ConfigError
from vertstudy.study import storage
from vertstudy.study.compat import mark_completed
from vertstudy.study.spec import StudySpec

#: the Optuna trial user attribute naming the Ray trial it was asked for (a reproducible search)
RAY_TRIAL_ATTR = "ray_trial_id"


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that survives a driver killed between telling Optuna a trial's result
    and saving its own state: on resume, Ray may rerun a trial whose Optuna trial is already
    COMPLETE in the storage; its further results are ignored instead of failing the study."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            mark_completed(self, trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial that ended without its final report was stopped by the scheduler (ASHA): it is
        PRUNED in Optuna, keeping the intermediate values it reported, not COMPLETE with its
        early value (TPE would learn from truncated curves as if they were finished). The result
        at which it was stopped is one of them: Tune hands it to the searcher only here, as the
        trial's last result (a trial stopped at its first report has no other)."""
        if not error and result is not None and result.get("phase") != "final":
            self.report_last(trial_id, result)
            result = None  # Ray's OptunaSearch tells PRUNED for a trial that ended without a value
        super().on_trial_complete(trial_id, result, error)

    def report_last(self, trial_id: str, result: dict) -> None:
        """Record ``result``'s metric as an intermediate value of the trial at its
        ``training_iteration`` (as ``on_trial_result`` does), unless that step is recorded
        already. Nothing for a multi-objective search (Optuna keeps no intermediate values)."""
        import warnings

        value, step = result.get(self.metric) if isinstance(self.metric, str) else None, result.get(
            "training_iteration")
        if value is None or step is None or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        import optuna

        with warnings.catch_warnings():  # a step reported already is kept as it was, silently
            warnings.simplefilter("ignore")
            try:
                self._ot_trials[trial_id].report(float(value), int(step))
            except optuna.exceptions.UpdateFinishedTrialError:
                # told by a killed driver after it saved this searcher's state: its record stands
                mark_completed(self, trial_id)


class ReproducibleOptunaSearch(ResumableOptunaSearch):
    """Optuna suggestions that depend on the trials' numbers and epochs, not on timing
    (``search.reproducible``; :mod:`vertstudy.study.ordered`): trial ``k`` is asked for once
    its virtual start on :class:`~vertstudy.study.ordered.VirtualClock` is known (``suggest``
    returns ``None`` until then: Tune asks again), after telling Optuna, in number order, the
    trials that ended by then in the virtual schedule; the others stay RUNNING (what the
    constant liar sees). Trials that end are told later, when a suggestion needs them, or at
    once when no suggestion is left to ask. Each suggestion uses a sampler seeded with the
    study's seed and ``k`` (``samplers``). With ``waits`` off (random search: no suggestion
    depends on another trial) only the seeding remains."""

    def __init__(self, *, samplers, concurrency: int, num_samples: int, waits: bool = True, **kwargs):
        from vertstudy.study.ordered import VirtualClock

        super().__init__(**kwargs)
        self._samplers = samplers
        self._clock = VirtualClock(concurrency)
        self._num_samples = num_samples
        self._waits = waits
        self._numbers: dict[str, int] = {}  # trial id -> its number (the order of suggestions)
        self._deferred: dict[int, tuple[str, dict | None, bool]] = {}  # ended, not told yet
        self.waited_s: dict[int, float] = {}  # trial -> seconds a free slot waited for its virtual start
        self._asked_since: float | None = None

    def suggest(self, trial_id: str):
        if trial_id in self._numbers:
            return super().suggest(trial_id)
        if self._waits:
            start = self._clock.next_start()
            if start is None:  # the free slot waits for the virtual schedule (the price)
                self._asked_since = self._asked_since or time.monotonic()
                return None
            k, start = self._clock.begin()
            if self._asked_since is not None:
                self.waited_s[k] = time.monotonic() - self._asked_since
                self._asked_since = None
            self._tell(self._clock.ended_by(start))
        else:
            k = len(self._numbers)
        self._numbers[trial_id] = k
        self._fail_orphans()
        self._ot_study.sampler = self._samplers(k)
        params = super().suggest(trial_id)
        # the link a resumed driver follows when Ray's saved state knows a trial that the saved
        # searcher does not (:meth:`realign`); Optuna's storage has it before Ray's state can
        self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        if len(self._numbers) >= self._num_samples:  # the last suggestion: nothing waits for a tell now
            self._tell(sorted(self._deferred))
        return params

    def _fail_orphans(self) -> None:
        """Mark FAIL the RUNNING Optuna trials that no trial of this searcher owns: asked by a
        driver killed before it saved its state, they would stand as running trials beside the
        constant liar's and move the suggestion that replaces them."""
        import optuna

        owned = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in owned:
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._numbers and isinstance(result.get("epoch"), (int, float)):
            self._clock.report(self._numbers[trial_id], int(result["epoch"]))
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        k = self._numbers.get(trial_id)
        if k is None or not self._waits:
            super().on_trial_complete(trial_id, result, error)
            return
        epoch = result.get("epoch") if result else None
        self._clock.finish(k, int(epoch) if isinstance(epoch, (int, float)) else None)
        self._deferred[k] = (trial_id, result, error)
        if len(self._numbers) >= self._num_samples:  # nothing left to ask: tell every ended trial
            self._tell(sorted(self._deferred))

    def _tell(self, numbers: list[int]) -> None:
        for k in numbers:
            if k in self._deferred:
                trial_id, result, error = self._deferred.pop(k)
                ResumableOptunaSearch.on_trial_complete(self, trial_id, result, error)

    def realign(self, known: dict[str, str], study_dir: str) -> None:
        """Make this searcher's restored state agree with the Ray trials a resumed driver
        restores (``known``: ``{trial id: Ray status}`` from the same saved experiment state).

        Ray uploads its experiment state and the searcher's state as separate files, in the
        background; a driver killed during an upload leaves one newer than the other. A trial the
        searcher handed out but Ray does not know is asked again under its id, with its Optuna
        trial's values; a trial Ray knows but the searcher does not is adopted through its Optuna
        trial (linked by :data:`RAY_TRIAL_ATTR`). The virtual clock is then replayed in number
        order from the trials' stored results, and ended trials whose Optuna trial is still
        RUNNING wait to be told, as in the killed driver."""
        import optuna

        from vertstudy.study.ordered import trial_number
        from vertstudy.study.results import read_trial

        running = optuna.trial.TrialState.RUNNING
        by_ray_id = {t.user_attrs.get(RAY_TRIAL_ATTR): t for t in self._ot_study.get_trials(deepcopy=False)}
        for trial_id in known:
            if trial_id in self._numbers:
                continue
            ot = by_ray_id.get(trial_id)
            if ot is None:  # asked before this link existed: a new Optuna trial with its values
                from ray.tune.utils import flatten_dict

                params, _ = read_trial(study_dir, trial_id)
                self._ot_study.enqueue_trial(flatten_dict(params, delimiter="/"), skip_if_exists=False)
                ot = self._ot_study.ask()
                ot.set_user_attr(RAY_TRIAL_ATTR, trial_id)
                self._ot_trials[trial_id] = ot
            else:
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, ot._trial_id)
                if ot.state != running:
                    self._completed_trials.add(trial_id)
            self._numbers[trial_id] = trial_number(trial_id)
        told = {t.number for t in self._ot_study.get_trials(deepcopy=False) if t.state != running}
        for trial_id, ot in self._ot_trials.items():  # told by the killed driver after this state's save
            if ot.number in told:
                mark_completed(self, trial_id)
        ended = {t for t, status in known.items() if status in ("TERMINATED", "ERROR")}
        results = {t: read_trial(study_dir, t)[1] for t in known}
        progress = {}
        for trial_id, k in self._numbers.items():
            epochs = [int(r["epoch"]) for r in results.get(trial_id, []) if isinstance(r.get("epoch"), (int, float))]
            progress[k] = max([self._clock.progress.get(k, 0), *epochs]) if trial_id in known else 0
        numbers = sorted(self._numbers.values())
        if numbers != list(range(len(numbers))):
            return  # not stable ids in order (cannot happen): keep the state Ray restored
        clock = type(self._clock)(self._clock.concurrency)
        ids = {k: t for t, k in self._numbers.items()}
        for k in numbers:
            for j in range(k):
                clock.report(j, progress[j])
                if ids[j] in ended:
                    clock.finish(j)
            if clock.next_start() is None:
                return  # the stored results say less than the killed driver knew: keep its clock
            clock.begin()
        for k in numbers:
            clock.report(k, progress[k])
            if ids[k] in ended:
                clock.finish(k)
        self._clock = clock
        self._deferred = {}
        for trial_id in sorted(ended, key=trial_number):
            if trial_id in self._ot_trials and self._ot_trials[trial_id].number not in told:
                self._completed_trials.discard(trial_id)
                last = results[trial_id][-1] if results[trial_id] else None
                self._deferred[trial_number(trial_id)] = (trial_id, last, known[trial_id] == "ERROR")
        if len(self._numbers) >= self._num_samples:
            self._tell(sorted(self._deferred))


def open_optuna_storage(spec: StudySpec, study_dir: str):
    """The Optuna storage object of a study (see the module docstring)."""
    import optuna

    url = optuna_storage_url(spec, study_dir)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            path = url[len("journal:"):]
            return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise ConfigError(f"search.optuna_storage: cannot open {url!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {ACCEPTED}") from None


ACCEPTED = ("accepted: an SQLAlchemy URL without a password (sqlite:///path, postgresql://user@host/db) "
            "or journal:<path>")


def check_optuna_url(url: str, where: str = "search.optuna_storage") -> str:
    """``url`` if it is a storage URL vertstudy accepts; a password in it is refused (masked)."""
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise ConfigError(f"{where}: 'journal:' needs a file path, e.g. journal:/shared/optuna.log")
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{where}: {url!r} is not a storage URL; {ACCEPTED}") from None
    if parsed.password:
        masked = parsed.render_as_string(hide_password=True)
        raise ConfigError(f"{where}: {masked} carries a password, which would be saved with the study; leave it out "
                          "and set PGPASSWORD (or ~/.pgpass) in the environment instead")
    return url


def optuna_storage_url(spec: StudySpec, study_dir: str) -> str:
    """The study's Optuna storage URL as written (``${NAME}`` not expanded)."""
    if spec.search.optuna_storage:
        return check_optuna_url(spec.search.optuna_storage)
    if not storage.is_local(study_dir):
        raise ConfigError(
            f"search.optuna_storage: not set, and storage {spec.storage!r} is not a local directory; "
            "give a database URL (e.g. postgresql://host/db) or journal:<shared path> for Optuna"
        )
    return f"sqlite:///{storage.local_path(study_dir) / 'optuna.db'}"


def searcher(spec: StudySpec, study_dir: str):
    """Tune's search algorithm (None for grid: Tune's own grid expansion)."""
    if spec.search.is_grid:
        return None
    import optuna

    from vertstudy.study.ordered import SamplerFactory
    from vertstudy.study.space import define_by_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_optuna_storage(spec, study_dir)
    random = spec.search.algorithm == "random"
    samplers = SamplerFactory(spec.search.algorithm, spec.search.seed, {} if random else tpe_settings(spec))
    if spec.search.multi_objective:
        metric, mode = list(spec.search.metrics), list(spec.search.modes)
    else:
        metric, mode = spec.search.metric, spec.search.mode
    common = {"space": define_by_run(spec), "metric": metric, "mode": mode, "sampler": samplers(),
              "study_name": spec.name, "storage": store}
    if not spec.search.reproducible:
        return ResumableOptunaSearch(**common)
    return ReproducibleOptunaSearch(samplers=samplers, concurrency=spec.concurrency, num_samples=spec.num_samples,
                                    waits=not random, **common)


def search_algorithm(spec: StudySpec, study_dir: str) -> tuple[Any, int | None]:
    """(Tune's ``search_alg``, its ``max_concurrent_trials``). A reproducible study
    (``search.reproducible``) names its trials by number (:func:`vertstudy.study.ordered.stable_trial_id`)
    and limits its concurrency itself; otherwise Tune draws the ids and limits it."""
    if not spec.search.reproducible:
        return searcher(spec, study_dir), spec.concurrency
    from ray.tune.search import ConcurrencyLimiter

    from vertstudy.study.compat import stable_search_generator, stable_variant_generator
    from vertstudy.study.ordered import stable_prefix

    prefix = stable_prefix(spec.name)
    if spec.search.is_grid:
        return stable_variant_generator(prefix, spec.concurrency), None
    return stable_search_generator(ConcurrencyLimiter(searcher(spec, study_dir), spec.concurrency), prefix), None


def tpe_settings(spec: StudySpec) -> dict:
    """TPE's ``n_startup_trials`` (random trials before it models: ``search.startup_trials``, by
    default a third of ``num_samples``, 2 to 10; Optuna's own default, 10, would leave a small
    study random) and ``constant_liar`` (``search.constant_liar``, by default on when trials
    run at once, so parallel trials do not all sample the same point)."""
    startup = spec.search.startup_trials or max(2, min(10, spec.num_samples // 3))
    liar = spec.search.constant_liar if spec.search.constant_liar is not None else spec.concurrency > 1
    return {"n_startup_trials": int(startup), "constant_liar": bool(liar)}


def scheduler(spec: StudySpec, study_dir: str | None = None):
    """ASHA (in trial order for a reproducible study: :class:`vertstudy.study.ordered.OrderedASHA`,
    which reads the trials' stored results in ``study_dir`` when a driver resumes), or None."""
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t beyond the last epoch: ASHA stops a trial that reaches max_t, which would cut off
    # its final report (evaluation on the held-out cases); trials end by themselves instead.
    epochs = spec.base_config.train.epochs
    if spec.search.reproducible:
        from vertstudy.study.ordered import OrderedASHA

        return OrderedASHA(spec.search.metric, spec.search.mode, spec.scheduler.grace_period,
                           spec.scheduler.reduction_factor, max(epochs, spec.scheduler.grace_period) + 1, study_dir)
    return ASHAScheduler(
        time_attr="epoch", max_t=max(epochs, spec.scheduler.grace_period) + 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


