"""Weights & Biases tracking: one W&B run per study trial.

A :class:`TrialRun` (id derived from study and trial id, grouped by study) starts with the trial's flat dotted
hyperparameters as config, logs the numeric entries of every epoch record at ``step=epoch``, puts the final metrics in
the summary and is finished on exit (exit code 1 if the trial raised). Mode defaults to ``offline``: files go to
``<dir>/wandb/offline-run-*`` without any network access (``wandb sync`` uploads them later); ``disabled`` never calls
wandb. The API key is never read here: online mode lets wandb take ``WANDB_API_KEY`` from the environment itself.
:func:`read_offline_runs` decodes offline run files (wandb has no public reader).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

WandbMode = Literal["offline", "online", "disabled"]

_RUN_SETTINGS = {  # no console capture, code, git, requirements, system metadata or hardware sampling; silent
    "console": "off", "save_code": False, "disable_code": True, "disable_git": True, "x_save_requirements": False,
    "x_disable_meta": True, "x_disable_machine_info": True, "x_disable_stats": True, "silent": True,
}
_INTERNAL_KEYS = frozenset({"_wandb", "_runtime", "_timestamp"})  # bookkeeping wandb adds to config/history/summary


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
    """Context manager around the W&B run of one trial (see module docstring); a no-op when mode is ``disabled``."""

    def __init__(self, settings: WandbSettings, study: str, trial_id: str, config: dict[str, Any],
                 resume: bool = False, tags: Sequence[str] = ()) -> None:
        """``config`` maps flat dotted hyperparameter names to scalar values."""
        self.settings, self.study, self.trial_id = settings, study, trial_id
        self.config, self.resume, self.tags = dict(config), resume, tuple(tags)
        self._run: Any = None
        self._id: str | None = None

    @property
    def id(self) -> str | None:
        """The W&B run id once entered (kept after exit); None when disabled or not entered yet."""
        return self._id

    def __enter__(self) -> TrialRun:
        if self.settings.mode == "disabled":
            return self
        import wandb  # lazy: importing wandb is slow and a disabled run must not touch it
        if self.settings.dir is not None:  # fail loudly instead of wandb silently falling back to the temp dir
            self.settings.dir.mkdir(parents=True, exist_ok=True)
        fields = getattr(wandb.Settings, "model_fields", _RUN_SETTINGS)  # pass only the settings this wandb knows
        env = {"WANDB_SILENT": "true"} | ({"WANDB_MODE": "offline"} if self.settings.mode == "offline" else {})
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)  # only for the duration of init: the run's settings are fixed once it has started
        try:
            self._run = wandb.init(
                id=run_id(self.study, self.trial_id), name=self.trial_id, group=self.study, job_type="trial",
                project=self.settings.project, entity=self.settings.entity, dir=self.settings.dir,
                config=self.config, tags=list(self.tags) or None, mode=self.settings.mode,
                resume="allow" if self.resume else None, reinit="create_new",
                settings=wandb.Settings(**{k: v for k, v in _RUN_SETTINGS.items() if k in fields}),
            )
        finally:
            os.environ.update({name: value for name, value in saved.items() if value is not None})
            for name in [name for name, value in saved.items() if value is None]:
                del os.environ[name]
        self._id = str(self._run.id)
        return self

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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: object) -> Literal[False]:
        run, self._run = self._run, None
        # Ray Tune stops a trial (e.g. ASHA pruning it) with SystemExit(0) inside its report call
        stopped = exc_type is SystemExit and getattr(exc, "code", None) in (0, None)
        if run is not None:
            try:
                run.finish(exit_code=0 if exc_type is None or stopped else 1)
            except Exception:
                if exc_type is None:  # never let a finish failure mask the trial's own exception
                    raise
        return False


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
                _put(run.config, record.run.config.update)
            elif kind == "config":
                _put(run.config, record.config.update)
            elif kind == "history":
                run.history.append(_put({}, record.history.item))
            elif kind == "summary":
                _put(run.summary, record.summary.update)
                for item in record.summary.remove:
                    run.summary.pop(item.key or item.nested_key[0], None)
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        if not run.run_id:  # a run cut off before wandb flushed its first record: the file names it
            run.run_id = file.stem.removeprefix("run-")
        runs.append(run)
    return sorted(runs, key=lambda run: (run.run_id, str(run.path)))
