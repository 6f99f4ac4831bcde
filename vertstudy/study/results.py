"""Reading a study's Ray results back: the ended trials (:class:`TrialOutcome`) from the trial
directories Ray wrote (``result.json``, ``params.json``, checkpoints) and the experiment state.

Used by the driver after each trial ends, by ``study export`` and by ``study status``; the
tables are a function of these files only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vertstudy.errors import ConfigError
from vertstudy.study import storage
from vertstudy.study.schema import ATTEMPT_PREFIX, HELD_OUT, REPORTED, TrialOutcome
from vertstudy.study.spec import StudySpec
from vertstudy.study.tables import outcome_status, result_times, split_results

EXPERIMENT = "ray"  # Ray's experiment directory inside the study directory


def experiment_dir(study_dir: str) -> str:
    return storage.uri_join(study_dir, EXPERIMENT)


def _read_json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a killed driver: the rest is still good
            continue
    return out


def trial_dirs(study_dir: str) -> dict[str, str]:
    """``{trial_id: trial directory}``: the trial directories are named by trial id."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(experiment_dir(study_dir))
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    dirs = [i.path for i in infos if i.type == pafs.FileType.Directory and not Path(i.path).name.startswith((".", "_"))]
    # a trial directory holds its params.json from the trial's start; an empty one is not a trial
    found = fs.get_file_info([storage.join(d, "params.json") for d in dirs]) if dirs else []
    return {Path(d).name: d for d, f in zip(dirs, found) if f.type == pafs.FileType.File}


def _latest_checkpoint(fs, trial_dir: str, results: list[dict[str, Any]]) -> str | None:
    """The folder holding the trial's files (``best.pt``, ...) in its latest checkpoint that the
    driver recorded (``checkpoint_dir_name`` of its last result carrying one): a checkpoint
    directory written by an attempt the driver no longer heard from (a partitioned node) is not
    it (when Tune has removed it, the newest kept before it). Inside, the newest ``attempt-*``
    folder (see :func:`vertstudy.study.trial.attempt_name`). Without a recorded name, the
    highest-numbered checkpoint directory."""
    import pyarrow.fs as pafs

    def subdirs(folder: str, prefix: str) -> list[str]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
        except (FileNotFoundError, OSError):
            return []
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))

    recorded = [r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")]
    names = subdirs(trial_dir, "checkpoint_")
    if recorded:  # the recorded one, or (removed since) the newest kept before it
        names = [n for n in names if Path(n).name <= recorded[-1]]
    if not names:
        return None
    checkpoint = names[-1]
    attempts = subdirs(checkpoint, ATTEMPT_PREFIX)
    return attempts[-1] if attempts else checkpoint


def read_trial(study_dir: str, trial_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sampled params, results in report order) of one trial: the epoch reports its newest
    recorded checkpoint carries (:func:`reported_at`), then ``result.json``'s. Ray copies
    ``result.json`` to the storage in the background, so a killed driver can leave it without a
    report whose checkpoint the trial went on from, never reported again; the checkpoint still has
    it. Where both hold an epoch, ``result.json``'s comes later and wins (:func:`split_results`).
    Only a checkpoint ``result.json`` names counts: one no result names may have been written by
    an attempt no driver heard from (a killed driver's trial still running for a moment)."""
    fs, base = storage.resolve(experiment_dir(study_dir))
    params, results = _trial_files(fs, base, trial_id)
    if not any(r.get("checkpoint_dir_name") for r in results):
        return params, results
    return params, reported_at(fs, _latest_checkpoint(fs, storage.join(base, trial_id), results)) + results


def _trial_files(fs, base: str, trial_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sampled params, ``result.json``'s results in report order) of one trial, as Ray stored
    them under the experiment folder ``base`` on the filesystem ``fs``."""
    import pyarrow.fs as pafs

    tdir = storage.join(base, trial_id)

    def text(name: str) -> str:
        path = storage.join(tdir, name)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return ""
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8", errors="replace")

    params_text = text("params.json")
    params = json.loads(params_text) if params_text.strip() else {}
    return params, _read_json_lines(text("result.json"))


def trial_error(study_dir: str, trial_id: str) -> str:
    """The last line of the error Ray recorded for a failed trial (``error.txt``: the exception,
    e.g. ``RuntimeError: ...``); empty when there is none."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(experiment_dir(study_dir))
    path = storage.join(base, trial_id, "error.txt")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return ""
    with fs.open_input_stream(path) as f:
        lines = [ln.strip() for ln in f.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def read_state(fs, path: str, attempts: int = 5) -> dict:
    """Ray's experiment state JSON. Ray copies it to the storage in the background while it may
    be rewriting its local copy, so a read can meet a torn copy; the next copy repairs it."""
    for attempt in range(attempts):
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8", errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            if attempt == attempts - 1:
                raise ConfigError(f"{path}: Ray's experiment state is not valid JSON; wait for the driver's next "
                                  "save, or run `vertstudy study export` again") from None
            time.sleep(0.5)
    return {}


def newest_state_file(study_dir: str) -> tuple[Any, str | None]:
    """(the study storage's filesystem, the path in it of Ray's latest saved experiment state
    file, or None before the first save)."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(experiment_dir(study_dir))
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return fs, None
    states = sorted(
        i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=False))
        if Path(i.path).name.startswith("experiment_state") and i.path.endswith(".json")
    )
    return fs, (states[-1] if states else None)


def newest_state(study_dir: str) -> dict:
    """Ray's latest saved experiment state of the study (its JSON); empty before the first save."""
    fs, path = newest_state_file(study_dir)
    return read_state(fs, path) if path else {}


def experiment_states(study_dir: str) -> dict[str, str]:
    """``{trial_id: Ray status}`` (PENDING, RUNNING, PAUSED, TERMINATED, ERROR) from the latest
    saved experiment state; empty before the first save."""
    return trial_statuses(newest_state(study_dir))


def trial_statuses(state: dict) -> dict[str, str]:
    """``{trial_id: Ray status}`` of the trials in Ray's experiment state ``state`` (its JSON)."""
    out = {}
    for entry in state.get("trial_data", []):
        trial = json.loads(entry[0]) if isinstance(entry, list) else entry
        if isinstance(trial, dict) and "trial_id" in trial:
            out[str(trial["trial_id"])] = str(trial.get("status", ""))
    return out


def outcome(spec: StudySpec, study_dir: str, trial_id: str, ended_by: str, error: str = "",
            live: list[dict[str, Any]] | None = None) -> TrialOutcome:
    """The :class:`TrialOutcome` of an ended trial (``ended_by``: ``complete`` or ``error``).

    ``live``: results the driver received in this session. Ray copies ``result.json`` to the
    storage in the background, so the driver's own copy of the newest results is appended
    (an epoch reported twice counts once; the last final wins)."""
    from vertstudy.config import flat_config
    from vertstudy.study.space import trial_config

    fs, base = storage.resolve(experiment_dir(study_dir))
    params, results = _trial_files(fs, base, trial_id)
    if ended_by == "error" and not error:
        error = trial_error(study_dir, trial_id)
    if live:
        results = results + list(live)
        params = params or dict(live[-1].get("config") or {})
    checkpoint = _latest_checkpoint(fs, storage.join(base, trial_id), results)  # the newest the driver heard of
    # the epochs that checkpoint holds come first, so a report missing from result.json (schema.REPORTED)
    # is still counted and one that is there wins
    epochs, final, where = split_results(reported_at(fs, checkpoint) + results)
    started, ended = result_times(results)
    try:
        config = flat_config(trial_config(spec, params))
    except Exception as exc:  # a trial whose config cannot be rebuilt still gets its row
        config = {"_invalid": str(exc)}
    return TrialOutcome(
        trial_id=trial_id, status=outcome_status(ended_by, final), config=config, epochs=epochs, final=final,
        checkpoint=checkpoint, error=error, where=where, params=params, started_at=started, ended_at=ended,
        vertebrae=held_out_rows_at(fs, checkpoint) if final and "vertebrae" not in final else [],
    )


def reported_at(fs, checkpoint: str | None) -> list[dict[str, Any]]:
    """The epoch reports a trial wrote into the checkpoint folder ``checkpoint`` (:data:`schema.REPORTED`,
    a path on the study storage's filesystem ``fs``), in report order; none if absent (trials of
    studies written before it existed). A line cut short is skipped."""
    import pyarrow.fs as pafs

    if not checkpoint:
        return []
    path = storage.join(checkpoint, REPORTED)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(path) as f:
        return _read_json_lines(f.read().decode("utf-8", errors="replace"))


def held_out_rows_at(fs, checkpoint: str | None) -> list[dict[str, Any]]:
    """The held-out rows a trial wrote beside its final report (:data:`schema.HELD_OUT` in the
    checkpoint folder ``checkpoint``, a path on the study storage's filesystem ``fs``); none if absent."""
    import pyarrow.fs as pafs

    if not checkpoint:
        return []
    path = storage.join(checkpoint, HELD_OUT)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    table = storage.read_parquet(fs, path)
    return [{k: v for k, v in row.items() if k not in ("study", "trial_id")} for row in table.to_pylist()]


def ended_trials(
    spec: StudySpec, study_dir: str, ended: dict[str, str] | None = None,
    live: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, str], dict[str, TrialOutcome]]:
    """(``{trial_id: complete|error}`` of every ended trial of the study, the outcomes built on
    the way). ``ended``: ``{trial_id: complete|error}`` known to the caller (the driver's own
    events), ``live``: the results it received per trial; otherwise a trial counts as ended when
    the saved experiment state says TERMINATED / ERROR, or when it sent its final result (found
    by building its outcome: those are returned, the others are not built)."""
    ended, live = dict(ended or {}), dict(live or {})
    states = experiment_states(study_dir)
    hows: dict[str, str] = {}
    built: dict[str, TrialOutcome] = {}
    for trial_id in sorted(set(trial_dirs(study_dir)) | set(ended)):
        how = ended.get(trial_id)
        if how is None:
            state = states.get(trial_id, "")
            if state == "ERROR":
                how = "error"
            elif state == "TERMINATED":
                how = "complete"
        if how is None:
            o = outcome(spec, study_dir, trial_id, "complete", live=live.get(trial_id))
            if not o.final:
                continue  # still running, pending or interrupted: not in the tables yet
            how, built[trial_id] = "complete", o
        hows[trial_id] = how
    return hows, built


def ended_outcomes(
    spec: StudySpec, study_dir: str, ended: dict[str, str] | None = None,
    live: dict[str, list[dict[str, Any]]] | None = None,
) -> list[TrialOutcome]:
    """The :class:`TrialOutcome` of every ended trial of the study (:func:`ended_trials`), by trial id."""
    hows, built = ended_trials(spec, study_dir, ended, live)
    live = dict(live or {})
    return [built.get(t) or outcome(spec, study_dir, t, how, live=live.get(t)) for t, how in hows.items()]
