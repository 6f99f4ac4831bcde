"""Weights & Biases tracking: one W&B run per study trial, one per study, one per report.

A :class:`TrialRun` (id derived from study and trial id, grouped by study; the study's driver keeps one per running
trial, :class:`vertstudy.study.live.TrackingCallback`) starts with the trial's flat dotted hyperparameters as config,
logs the numeric entries of every epoch record at ``step=epoch``, puts the final metrics in the summary and is
finished with exit code 0 (ended, or stopped by the scheduler) or 1 (failed). Mode defaults to ``offline``: files go to
``<dir>/wandb/offline-run-*`` without any network access (``wandb sync`` uploads them later); ``disabled`` never calls
wandb. The API key is never read here: online mode lets wandb take ``WANDB_API_KEY`` from the environment itself.

When a study ends, :func:`log_study` writes its run (job type ``study``, id ``<study>-study``, same group: a resumed
study's run resumes it instead of adding one) with the final trials table as a ``wandb.Table``; :func:`log_report`
writes a new run of job type ``report`` whose artifact (type ``report``) holds a report's files. Neither ever
raises: a W&B error is one warning line, and the study or report goes on. Their staged artifact files sit in
``<dir>/wandb/artifacts/staging`` beside the offline runs. Every run leaves the process's environment as it found it
(no ``WANDB_SERVICE``: a Ray cluster started later from the process must not hand its W&B service to its trials).
:func:`read_offline_runs` decodes offline run files (wandb has no public reader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

WandbMode = Literal["offline", "online", "disabled"]

_RUN_SETTINGS = {  # no console capture, code, git, requirements, system metadata or hardware sampling; silent
    "console": "off", "save_code": False, "disable_code": True, "disable_git": True, "x_save_requirements": False,
    "x_disable_meta": True, "x_disable_machine_info": True, "x_disable_stats": True, "silent": True,
}
_INTERNAL_KEYS = frozenset({"_wandb", "_runtime", "_timestamp"})  # bookkeeping wandb adds to config/history/summary
STUDY_JOB, REPORT_JOB = "study", "report"  # job types of the study's run and of a report's run (trials: "trial")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandbSettings:
    """Where and how trial runs are tracked."""

    mode: WandbMode = "offline"
    project: str = "vertstudy"
    entity: str | None = None
    dir: Path | None = None  # local directory under which wandb writes its `wandb/` folder (offline run files)


def run_id(study: str, trial_id: str) -> str:
    """Deterministic W&B run id ``{study}-{trial_id}``: chars outside ``[A-Za-z0-9_-]`` become ``-``; ids longer than
    64 chars keep a prefix plus ``-`` and 8 hex chars of the sha1 of the unsanitized full string."""
    full = f"{study}-{trial_id}"
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", full)
    if len(clean) <= 64:
        return clean
    return f"{clean[:55]}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def _scalar(value: Any) -> bool | int | float | None:
    """``value`` as a plain bool/int/float when it is a real number (numpy scalars included), else None."""
    if isinstance(value, bool | numbers.Integral):
        return value if isinstance(value, bool) else int(value)
    return float(value) if isinstance(value, numbers.Real) else None


class TrialRun:
    """The W&B run of one trial (see module docstring): :meth:`start`, then :meth:`log_epoch` and :meth:`summary`,
    then :meth:`finish`; every call is a no-op when mode is ``disabled``."""

    def __init__(self, settings: WandbSettings, study: str, trial_id: str, config: dict[str, Any],
                 resume: bool = False, tags: Sequence[str] = ()) -> None:
        """``config`` maps flat dotted hyperparameter names to scalar values."""
        self.settings, self.study, self.trial_id = settings, study, trial_id
        self.config, self.resume, self.tags = dict(config), resume, tuple(tags)
        self._run: Any = None
        self._id: str | None = None

    @property
    def id(self) -> str | None:
        """The W&B run id once started (kept after it finished); None when disabled or not started yet."""
        return self._id

    def start(self) -> None:
        """Start (or, with ``resume``, resume) the run; nothing when disabled. W&B's errors are raised."""
        if self.settings.mode == "disabled":
            return
        self._run = _init(self.settings, id=run_id(self.study, self.trial_id), name=self.trial_id, group=self.study,
                          job_type="trial", config=self.config, tags=list(self.tags) or None,
                          resume="allow" if self.resume else None)
        self._id = str(self._run.id)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Log the numeric entries of a per-epoch record at ``step=int(record['epoch'])``; NaN/inf are kept."""
        if self._run is not None:
            values = {key: v for key, value in record.items() if (v := _scalar(value)) is not None}
            self._run.log(values, step=int(record["epoch"]))

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary keys from the numeric and str entries of ``values`` (other values are skipped)."""
        if self._run is not None:
            kept = {key: value if isinstance(value, str) else _scalar(value) for key, value in values.items()}
            self._run.summary.update({key: value for key, value in kept.items() if value is not None})

    def finish(self, exit_code: int) -> None:
        """Finish the run with ``exit_code`` (0: it ended or was stopped; 1: it failed); nothing when not started."""
        run, self._run = self._run, None
        if run is not None:
            run.finish(exit_code=exit_code)


@contextmanager
def _environment(settings: WandbSettings, extra: dict[str, str] | None = None,
                 restore: Sequence[str] = ()) -> Iterator[None]:
    """Set wandb's environment for the block (silent; offline mode; ``extra``), then put back the variables it set
    and those named in ``restore`` as they were before."""
    env = {"WANDB_SILENT": "true"} | ({"WANDB_MODE": "offline"} if settings.mode == "offline" else {}) | (extra or {})
    saved = {name: os.environ.get(name) for name in (*env, *restore)}
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
        for name in [name for name, value in saved.items() if value is None]:
            os.environ.pop(name, None)


def _init(settings: WandbSettings, **init: Any) -> Any:
    """``wandb.init`` of a run of ``settings`` (its mode, project, entity, dir) with the quiet run settings;
    ``init``: the run's id, name, group, job type, config... The environment is wandb's only during init: the run's
    settings are fixed once it has started, and its service stays this process's without ``WANDB_SERVICE`` (which
    would hand it to every process started later from here: a Ray cluster's trials)."""
    import wandb  # lazy: importing wandb is slow and a disabled run must not touch it

    if settings.dir is not None:  # fail loudly instead of wandb silently falling back to the temp dir
        settings.dir.mkdir(parents=True, exist_ok=True)
    fields = getattr(wandb.Settings, "model_fields", _RUN_SETTINGS)  # pass only the settings this wandb knows
    with _environment(settings, restore=("WANDB_SERVICE",)):
        return wandb.init(project=settings.project, entity=settings.entity, dir=settings.dir, mode=settings.mode,
                          reinit="create_new",
                          settings=wandb.Settings(**{k: v for k, v in _RUN_SETTINGS.items() if k in fields}), **init)


@contextmanager
def _driver_run(settings: WandbSettings, what: str, **init: Any) -> Iterator[Any]:
    """A run of the study's driver or of a report (see the module docstring), finished on exit (exit code 1 if the
    block raised). Yields None when mode is ``disabled`` or the run could not start; a W&B error (starting, in the
    block, finishing) is logged as one warning line naming ``what`` and not raised."""
    if settings.mode == "disabled":
        yield None
        return
    staging = {"WANDB_DATA_DIR": str(settings.dir / "wandb")} if settings.dir is not None else {}
    with _environment(settings, staging):
        try:
            run = _init(settings, **init)
        except Exception as exc:
            warn_not_logged(what, exc)
            yield None
            return
        try:
            yield run
        except BaseException as exc:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass  # the block's own error is the one to tell
            if not isinstance(exc, Exception):
                raise
            warn_not_logged(what, exc)
            return
        try:
            run.finish(exit_code=0)
        except Exception as exc:
            warn_not_logged(what, exc)


def warn_not_logged(what: str, exc: Exception) -> None:
    """W&B must never fail the study or the report: one line, not a traceback."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    _log.warning("W&B: %s not logged (%s: %s)", what, type(exc).__name__, first)


def study_run_id(study: str) -> str:
    """The id of a study's own run: ``{study}-study`` (sanitized and capped as :func:`run_id`)."""
    return run_id(study, STUDY_JOB)


def trials_table_columns(names: Sequence[str], params: Sequence[str]) -> list[tuple[str, str]]:
    """(``trials.parquet`` column, W&B table column) pairs of a study run's table, in order: the trial, its status
    and seed, the sampled parameters (``cfg.<name>`` as ``<name>``), the validation figures at its best epoch
    (``best_val_*``), the held-out figures (``test_*``), then epochs, best epoch, wall time, its W&B run and
    message. Columns the table lacks are left out."""
    have = set(names)
    head = [(c, c) for c in ("trial_id", "status", "seed") if c in have]
    sampled = [(f"cfg.{p}", p) for p in params if f"cfg.{p}" in have]
    figures = [(c, c) for prefix in ("best_val_", "test_") for c in sorted(have) if c.startswith(prefix)]
    tail = [(c, c) for c in ("epochs", "best_epoch", "wall_s", "wandb_run", "message") if c in have]
    return head + sampled + figures + tail


def log_study(settings: WandbSettings, study: str, config: dict[str, Any], rows: Sequence[dict[str, Any]],
              params: Sequence[str], summary: dict[str, Any]) -> str | None:
    """The study's run (job type ``study``, id :func:`study_run_id`, group ``study``; resumed if it exists):
    ``config`` (the study spec), the final trials table ``rows`` as the ``wandb.Table`` ``trials``
    (:func:`trials_table_columns`; ``params``: the searched parameters) and ``summary`` (numbers and strs). Returns
    the run id; None when disabled or when W&B failed (logged as one warning line, never raised)."""
    logged = None
    with _driver_run(settings, f"the study run of {study}", id=study_run_id(study), name=study, group=study,
                     job_type=STUDY_JOB, config=config, resume="allow") as run:
        if run is not None:
            import wandb

            names = sorted({k for r in rows for k in r})
            columns = trials_table_columns(names, params)
            table = wandb.Table(columns=[shown for _, shown in columns], allow_mixed_types=True,
                                data=[[row.get(c) for c, _ in columns] for row in rows])
            run.log({"trials": table})
            kept = {key: value if isinstance(value, str) else _scalar(value) for key, value in summary.items()}
            run.summary.update({key: value for key, value in kept.items() if value is not None})
            logged = str(run.id)
    return logged


def log_report(settings: WandbSettings, group: str, folder: Path, config: dict[str, Any],
               tags: Sequence[str] = ()) -> str | None:
    """A new run of job type ``report`` in ``group`` with ``config``, logging every file of the report ``folder``
    (``report.html``, ``report.json``, ``report.md``, ``tables.tex``, ``figures/*.png``) as the artifact
    ``report-<group>`` of type ``report`` (each report a new version of it). Returns the run id; None when
    disabled or when W&B failed (logged as one warning line, never raised)."""
    logged = None
    with _driver_run(settings, f"the report run of {group}", name=f"report {folder.name}", group=group,
                     job_type=REPORT_JOB, config=config, tags=list(tags) or None) as run:
        if run is not None:
            import wandb

            artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", f"report-{group}")[:128], type="report",
                                      metadata={k: v for k, v in config.items() if isinstance(v, str | list)})
            artifact.add_dir(str(folder))
            run.log_artifact(artifact)
            logged = str(run.id)
    return logged


@dataclass
class OfflineArtifact:
    """An artifact an offline run logged: its manifest, by path in the artifact."""

    name: str
    type: str
    digests: dict[str, str]  # path -> base64 MD5 of the file's contents
    staged: dict[str, Path]  # path -> the local copy `wandb sync` uploads


@dataclass
class OfflineRun:
    """A decoded offline run file."""

    run_id: str
    group: str | None
    config: dict[str, Any]
    history: list[dict[str, Any]]  # one dict per logged step, keys as logged (plus '_step' if present)
    summary: dict[str, Any]
    path: Path  # the offline-run-* directory
    exit_code: int | None = None  # None when the file has no exit record (run not finished)
    job_type: str | None = None
    artifacts: list[OfflineArtifact] = field(default_factory=list)  # in the order logged

    def table(self, key: str) -> dict[str, Any]:
        """The last ``wandb.Table`` logged under ``key``: ``{"columns": [...], "data": [[...], ...]}`` as wandb
        wrote it in the run's files (NaN as NaN); KeyError when none was logged."""
        logged = [row[key] for row in self.history if isinstance(row.get(key), dict)
                  and row[key].get("_type") == "table-file"]
        if not logged:
            raise KeyError(f"no table {key!r} in run {self.run_id}")
        return json.loads((self.path / "files" / logged[-1]["path"]).read_text(encoding="utf-8"))


# leveldb-log-style datastore: 32 KiB blocks, 7-byte headers, chunk types full/first/(3 = middle)/last
_BLOCK, _HEADER, _FULL, _FIRST, _LAST = 32768, 7, 1, 2, 4


def _records(data: bytes) -> list[bytes]:
    """Record payloads of a datastore (file header ":W&B", 0xBEE1, 0); chunk header: IEEE crc32 of type byte + data,
    u16 length, u8 type; a block tail shorter than a header is padding; a truncated tail ends the scan."""
    if data[:_HEADER] != struct.pack("<4sHB", b":W&B", 0xBEE1, 0):
        raise ValueError("not a W&B datastore file")
    records, pending, pos = [], b"", _HEADER
    while True:
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK
        crc, length, kind = struct.unpack_from("<IHB", data, pos) if pos + _HEADER <= len(data) else (0, 0, 0)
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 or len(chunk) < length:  # end of file, or a tail still being written
            return records
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"checksum mismatch at byte {pos}")
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            records.append(pending)
        pos += _HEADER + length


def _put(target: dict[str, Any], items: Any) -> dict[str, Any]:
    """Store config/history/summary items (``key`` or ``nested_key`` path, JSON value) in ``target``, skipping the
    bookkeeping keys wandb adds; returns ``target``."""
    for item in items:
        path, node = [item.key] if item.key else list(item.nested_key), target
        if path[0] in _INTERNAL_KEYS:
            continue
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return target


def read_offline_runs(root: Path, settle_s: float = 0.0) -> list[OfflineRun]:
    """Decode every ``root/**/offline-run-*/run-*.wandb`` file, sorted by run id (then path).

    wandb's service writes a run's file in the background, after ``finish()`` has returned; with
    ``settle_s`` > 0, wait up to that many seconds for every file to hold its exit record."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb  # protobuf Record messages

    deadline = time.monotonic() + settle_s
    while True:
        runs = _decode_runs(root, pb)
        if all(run.exit_code is not None for run in runs) or time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)


def _decode_runs(root: Path, pb) -> list[OfflineRun]:
    runs = []
    for file in sorted(Path(root).glob("**/offline-run-*/run-*.wandb")):
        run = OfflineRun(run_id="", group=None, config={}, history=[], summary={}, path=file.parent)
        for payload in _records(file.read_bytes()):
            record = pb.Record.FromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.group = record.run.run_id, record.run.run_group or None
                run.job_type = record.run.job_type or None
                _put(run.config, record.run.config.update)
            elif kind == "config":
                _put(run.config, record.config.update)
            elif kind == "history":
                run.history.append(_put({}, record.history.item))
            elif kind == "summary":
                _put(run.summary, record.summary.update)
                for item in record.summary.remove:
                    run.summary.pop(item.key or item.nested_key[0], None)
            elif kind == "artifact":
                entries = record.artifact.manifest.contents
                run.artifacts.append(OfflineArtifact(
                    name=record.artifact.name, type=record.artifact.type,
                    digests={e.path: e.digest for e in entries},
                    staged={e.path: Path(e.local_path) for e in entries if e.local_path}))
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        if not run.run_id:  # a run cut off before wandb flushed its first record: the file names it
            run.run_id = file.stem.removeprefix("run-")
        runs.append(run)
    return sorted(runs, key=lambda run: (run.run_id, str(run.path)))
