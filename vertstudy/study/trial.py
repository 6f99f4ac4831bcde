"""The thin trial adapter: one Ray Tune trial = the plain trainer on one sampled config.

``run_trial(params, setup=...)`` builds the trial's :class:`Config` (study defaults + sampled
values), trains with :func:`vertstudy.train.trainer.train`, and after every epoch reports the
trainer's record to Tune with a checkpoint (``last.pt`` + ``best.pt`` + the epoch reports so far,
:data:`~vertstudy.study.schema.REPORTED`); the driver logs it to W&B
(:class:`vertstudy.study.live.TrackingCallback`), so a trial never imports wandb. A
retried or resumed trial continues from Tune's latest checkpoint. At the end the best checkpoint
labels the held-out cases on the whole CT, and one ``phase: "final"`` result carries the status,
best metrics, held-out metrics and vertebra rows (see :mod:`vertstudy.study.tables`).
Nothing here knows how the search works; the trainer knows nothing of Ray.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vertstudy.study.dataset import StudyData
from vertstudy.study.schema import ATTEMPT_PREFIX, HELD_OUT, REPORTED, held_out_rows, to_table
from vertstudy.study.space import trial_config
from vertstudy.study.spec import StudySpec
from vertstudy.study.tracking import run_id


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study shares (sent once to the cluster by ``tune.with_parameters``)."""

    spec: StudySpec
    data: StudyData


FINAL = "final.json"  # in a trial's last checkpoint: its final report, so a rerun only repeats it


class InjectedFailure(RuntimeError):
    """The study's fault drill (``inject_failure_at_epoch``)."""


CHECKPOINT_FILES = ("last.pt", "best.pt", FINAL, HELD_OUT, REPORTED)


def attempt_name() -> str:
    """The folder one attempt of a trial writes its checkpoint files under, inside each of Tune's
    ``checkpoint_NNNNNN`` directories: ``attempt-<start time, ns>-<pid>``.

    A worker cut off from the cluster (a network partition) keeps training until its raylet
    gives up, and may still write a checkpoint into the trial's storage, under a name the
    retried attempt on another node writes too; per-attempt folders keep those files apart, and
    a restore takes the newest attempt's (a retry always starts after the attempt before it was
    declared dead, so later names are later attempts, given clocks that agree within seconds)."""
    import os

    return f"{ATTEMPT_PREFIX}{time.time_ns():020d}-{os.getpid()}"


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for a value ``json`` cannot write (a numpy scalar: its Python value)."""
    return value.item() if hasattr(value, "item") else str(value)


def payload_dir(checkpoint_dir: Path) -> Path:
    """Where a Tune checkpoint directory keeps the trial's files: its newest attempt folder, or
    the directory itself (checkpoints written before attempt folders existed)."""
    attempts = sorted(p for p in checkpoint_dir.glob(f"{ATTEMPT_PREFIX}*") if p.is_dir())
    return attempts[-1] if attempts else checkpoint_dir


def checkpoint_problem(folder: Path) -> str | None:
    """Why the trial checkpoint in ``folder`` cannot be resumed from (a truncated or corrupt
    ``last.pt`` / ``best.pt`` / final report, e.g. a node that died mid-write or a full disk),
    or ``None`` when every file it holds loads."""
    from vertstudy.checkpoint import load_checkpoint
    from vertstudy.errors import InputError

    if not (folder / "last.pt").exists() and not (folder / FINAL).exists():
        return "it holds no last.pt"
    for name in ("last.pt", "best.pt"):
        if (folder / name).exists():
            try:
                load_checkpoint(folder / name)
            except InputError as exc:
                return f"{name}: {str(exc).split(': ', 1)[-1]}"
    if (folder / FINAL).exists():
        try:
            final = json.loads((folder / FINAL).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{FINAL}: {exc}"
        if "vertebrae" not in final:  # (older final reports carried the rows themselves)
            try:
                pq.read_table(folder / HELD_OUT)
            except (OSError, pa.ArrowException) as exc:
                return f"{HELD_OUT}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def _older_checkpoints(checkpoint) -> list:
    """Tune's other kept checkpoints of this trial, newest first (``checkpoint_NNNNNN`` beside
    ``checkpoint`` on its storage filesystem)."""
    import pyarrow.fs as pafs
    from ray import tune

    fs = checkpoint.filesystem
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [tune.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in names]


def _restore(work: Path) -> tuple[Path | None, str]:
    """Copy Tune's latest usable checkpoint (if any) into ``work``: the ``last.pt`` to resume
    from, and a note ('' when the latest checkpoint was usable). A checkpoint whose files do not
    load (:func:`checkpoint_problem`) is passed over for the newest older one Tune kept; when
    none loads, the trial starts again from epoch 1."""
    from ray import tune

    latest = tune.get_checkpoint()
    if latest is None:
        return None, ""
    def clear() -> None:
        for name in CHECKPOINT_FILES:
            (work / name).unlink(missing_ok=True)

    bad: list[str] = []
    for checkpoint in [latest, *_older_checkpoints(latest)]:
        clear()
        label = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            with checkpoint.as_directory() as d:
                source = payload_dir(Path(d))
                for name in CHECKPOINT_FILES:
                    if (source / name).exists():
                        shutil.copy2(source / name, work / name)
        except FileNotFoundError:
            # gone from the storage: on an object store, Ray's saved state (uploaded in the
            # background) can name a checkpoint that a newer one has since replaced when the
            # driver was killed; an older kept one, or epoch 1, replays what the state lacks
            bad.append(f"{label} missing")
            continue
        problem = checkpoint_problem(work)
        if problem is None:
            note = f"resumed from {label}: " + "; ".join(bad) if bad else ""
            if note:
                print(f"vertstudy: {note}", file=sys.stderr, flush=True)
            return (work / "last.pt" if (work / "last.pt").exists() else None), note
        bad.append(f"{label} unusable ({problem})")
    clear()
    note = "restarted from epoch 1: " + "; ".join(bad)
    print(f"vertstudy: {note}", file=sys.stderr, flush=True)
    return None, note


def evaluate_held_out(checkpoint: Path | None, data: StudyData, device: str) -> tuple[dict[str, float], list[dict]]:
    """Whole-CT evaluation of ``checkpoint`` on the held-out cases: ``test_*`` figures and rows.

    The rows and the plain ``test_*`` figures are those of the configured decoder
    (``infer.decoder``); beside them, :func:`decoder_figures` of every decoder
    (``test_dec_<decoder>_*``, also per field-of-view condition) and the error decomposition
    of :mod:`vertstudy.infer.diagnose` (``test_diag_*``), so reports can show where
    identification is lost and what the decoder contributes.
    """
    from vertstudy.infer.diagnose import diagnose_cases
    from vertstudy.model.load import load_model
    from vertstudy.model.prior import load_spine_prior
    from vertstudy.train.metrics import summarize

    if checkpoint is None or not data.test:
        return {}, []
    model, cfg = load_model(checkpoint, device=device)
    cases = data.cases("test")
    found = diagnose_cases(model, cfg, cases, load_spine_prior(checkpoint))
    per_case = found.case_rows[cfg.infer.decoder]
    summary = summarize([r for _, rows in per_case for r in rows])
    figures = {f"test_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    figures["test_infer_s_per_case"] = found.infer_s_per_case
    for dec, dec_rows in found.case_rows.items():
        figures.update(decoder_figures(dec, dec_rows))
    figures.update({f"test_diag_{k}": float(v) for k, v in found.figures.items()})
    return figures, held_out_rows(per_case)


def decoder_figures(decoder: str, per_case: list) -> dict[str, float]:
    """``test_dec_<decoder>_{id_rate, loc_error_mm, false_per_case}`` over all cases and with a
    ``_fov_<value>`` suffix per field-of-view tag of the cases (phantoms: full, long, short)."""
    from vertstudy.train.metrics import summarize

    groups: dict[str, list] = {"": per_case}
    for case, rows in per_case:
        if "fov" in case.tags:
            groups.setdefault(f"_fov_{case.tags['fov']}", []).append((case, rows))
    out = {}
    for suffix, part in groups.items():
        s = summarize([r for _, rows in part for r in rows])
        out[f"test_dec_{decoder}_id_rate{suffix}"] = float(s["id_rate"])
        out[f"test_dec_{decoder}_loc_error_mm{suffix}"] = float(s["loc_error_mm_mean"])
        out[f"test_dec_{decoder}_false_per_case{suffix}"] = float(s["n_false"]) / max(len(part), 1)
        out[f"test_dec_{decoder}_cases{suffix}"] = float(len(part))
    return out


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable (see the module docstring)."""
    import ray
    import torch
    from ray import tune

    from vertstudy.infer.evaluate import whole_ct_figures
    from vertstudy.model.load import select_device
    from vertstudy.train.trainer import train, training_precision

    spec, data = setup.spec, setup.data
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec, params)
    torch.set_num_threads(max(1, int(spec.resources.cpus)))
    device = select_device(cfg.train.device)
    where = {"node": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
             "device": device.type, "precision": training_precision(device, cfg.train.amp)}
    staging = Path(tempfile.mkdtemp(prefix="vertstudy-trial-"))  # reported to Tune as each checkpoint
    work = staging / attempt_name()  # this attempt's files (see attempt_name)
    work.mkdir()
    t0 = time.perf_counter()
    try:
        resume, restore_note = _restore(work)
        restored = resume is not None
        if (work / FINAL).exists():
            # Ray restored a trial that had already ended (its driver was killed before saving
            # that): report the same final result again instead of evaluating again
            tune.report(json.loads((work / FINAL).read_text(encoding="utf-8")),
                        checkpoint=tune.Checkpoint.from_directory(str(staging)))
            return

        jitter = random.Random()  # the timing drill's delays differ from run to run, on purpose

        def on_epoch(record: dict) -> None:
            if spec.inject_delay_s:
                time.sleep(jitter.uniform(0.0, spec.inject_delay_s))
            corrupt = spec.inject_corrupt_checkpoint_at_epoch == record["epoch"] and not (restored or restore_note)
            if corrupt:  # as if the node died while writing last.pt
                data = (work / "last.pt").read_bytes()
                (work / "last.pt").write_bytes(data[: len(data) // 2])
            report = {**record, **where, "phase": "epoch"}
            with open(work / REPORTED, "a", encoding="utf-8") as f:  # carried by the checkpoint (schema.REPORTED)
                f.write(json.dumps(report, default=_plain) + "\n")
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(staging)))
            if (spec.inject_failure_at_epoch == record["epoch"] and not restored) or corrupt:
                raise InjectedFailure(f"fault drill: trial {trial_id} fails once after epoch {record['epoch']}")

        result = train(cfg, data.cases("train"), data.cases("val"), work, on_epoch=on_epoch, resume=resume,
                       whole_ct=whole_ct_figures)
        t_eval = time.perf_counter()
        test_figures, rows = evaluate_held_out(result.best_checkpoint, data, result.device)
        eval_s = time.perf_counter() - t_eval
        metrics = {k: v for k, v in result.best_metrics.items() if isinstance(v, (int, float))}
        final = {
            **(result.history[-1] if result.history else {}),
            "phase": "final",
            "status": result.status,
            "message": "; ".join(m for m in (result.message, restore_note) if m),
            "epoch": result.epochs,
            "best_epoch": result.best_epoch if result.best_epoch is not None else -1,
            **{f"best_{k}": v for k, v in metrics.items() if k.startswith("val_")},
            **test_figures,
            "wall_s": sum(h.get("wall_s", 0.0) for h in result.history) + eval_s,
            "trial_s": time.perf_counter() - t0,
            **where,
            "device": result.device,
            "seed": cfg.seed,
            "wandb_run": run_id(spec.name, trial_id) if spec.wandb.mode != "disabled" else "",  # the driver's
            "held_out_rows": len(rows),  # the rows themselves: HELD_OUT beside this report
        }
        # the searched metric of a trial is its value at the best epoch (NaN if it diverged)
        for key in (spec.search.metric, *spec.search.metrics):
            final[key] = float(metrics.get(key, math.nan)) if result.status == "completed" else math.nan
        pq.write_table(to_table(rows, "vertebrae"), work / HELD_OUT)
        (work / FINAL).write_text(json.dumps(final), encoding="utf-8")
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(staging)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

