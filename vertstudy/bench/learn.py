"""``vertstudy bench learn``: does a CPU-sized network learn to label whole CTs within minutes?

Writes ``train_cases + test_cases`` coarse phantoms (default preset: mixed field of view,
metal, curvature, noise) drawn from ``phantom_seed`` and prepares them at ``spacing_mm``. Case
``i`` depends on ``(phantom_seed, i)`` only, so changing ``test_cases`` adds or removes held-out
cases without touching the others. The first ``train_cases`` are the training pool, of which
the last ``val_cases`` are the validation cases of the trainer (its plateau schedule and
``best.pt``); the last ``test_cases`` (default 12, so one case is a few points of the rate)
are held out. ``seed`` is the training seed (config ``seed``: initial weights, crop order), so
the data and the training can be varied apart. A network of width ``width`` (paper's LSTM)
trains with the real trainer for a time budget: two epochs are trained (one with a cosine
schedule, whose rates depend on the number of epochs), the last of them is timed, and the run
resumes from its checkpoint up to the number of epochs that fits ``minutes`` (epochs' training
time only), then, but for a cosine schedule, resumes again (twice at most) for the epochs the
minutes left fit at the mean pace so far. The first epoch is not the measure: it carries the
kernels' warm-up (7.9 s against 5.3 s for the rest on a 2-core Xeon, so sizing from it trained 20
of 30 minutes), and the second may not be either (4.95 s, then 4.4, 3.7 and about 4 on an AMD
EPYC: sized from it, 23.9 of 30 minutes).

During training the validation cases are labelled on the whole CT (``train.whole_ct_every``:
after the first epoch, every ``whole_ct_every``-th and the last; 0 turns it off). The trainer
times an epoch (``wall_s``) before it validates on whole CTs, so the training minutes leave the
whole-CT validations out; their cost is timed apart, around the validator. ``minutes_to_85``
is the training time (the epochs' ``wall_s`` summed up to that epoch) at which the validation
CTs' ``val_ct_id_rate`` first reaches 0.85, counting only epochs that were evaluated, or None.
``best.pt`` is the evaluated epoch with the best whole-CT validation (``train.select_on:
val_ct``, as in the quickstart and ``--scale cpu``); with whole-CT validation off, or with
``--set train.select_on=val_loss`` (the paper), the lowest validation crop loss. Measured
(3,200 crops, training seed 1): the crop loss of 8 validation crops chose epoch 23 (whole-CT
validation 0.30, held out 44.1 %), the whole-CT validation epoch 40 (0.60, held out 52.4 %).

The held-out cases are then labelled on the *whole* CT by :mod:`vertstudy.infer`
(tiles every quarter crop, ``infer.tiles_per_crop``; votes; the configured decoder and
K-means beside it) with ``best.pt``, and scored with
:func:`vertstudy.train.metrics.match_case` / ``summarize`` in canonical millimetres
(``zyx_vox * spacing_mm``; the mapping to the scanner's space is a rigid one per case, so the
distances are the same). Baseline: every class present in a held-out case is predicted at
that class's mean canonical position (mm) over the training pool's cases that contain it.

``--plot`` draws the whole-CT validation curve into a PNG (:func:`plot_learning`), and ``vertstudy
bench plot`` draws the curves of saved ``--json`` outputs together (:func:`read_learn_figures`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vertstudy.bench import format_figures, prepared_phantoms, work_folder
from vertstudy.config import Config
from vertstudy.data.cache import CachedCase
from vertstudy.errors import InputError, VertstudyError
from vertstudy.infer.evaluate import baseline_case_rows, checkpoint_case_rows


def learn_config(
    width: float, crop_size: tuple[int, int, int], spacing_mm: float, lr: float, workers: int, seed: int,
    overrides: dict | None = None, whole_ct_every: int = 0,
) -> Config:
    """The defaults but for width, crop, spacing, lr, workers, the training ``seed``,
    ``train.whole_ct_every`` and, when that is on, ``train.select_on: val_ct``; then ``overrides``
    (dotted field names, e.g. ``{"loss.map_reg": "none"}``), validated. Unless ``overrides`` set
    ``infer.stride``, it is derived from the crop as in a study (``infer.tiles_per_crop``)."""
    from vertstudy.config import load_config, with_derived_stride

    cfg = load_config(
        {
            "model.width": width,
            "data.prep.spacing_mm": spacing_mm,
            "data.crop.crop_size": crop_size,
            "train.lr": lr,
            "train.workers": workers,
            "train.epochs": 1,
            "train.whole_ct_every": whole_ct_every,
            "train.select_on": "val_ct" if (overrides or {}).get("train.whole_ct_every", whole_ct_every)
            else "val_loss",
            "seed": seed,
            **(overrides or {}),
        },
        where="bench learn --set",
    )
    return cfg if "infer.stride" in (overrides or {}) else with_derived_stride(cfg)


def baseline_rows(train: list[CachedCase], test: list[CachedCase]) -> list:
    """Rows of the mean-position baseline on ``test``."""
    return [r for _, rows in baseline_case_rows(train, test) for r in rows]


def whole_ct_rows(checkpoint: Path, test: list[CachedCase]) -> tuple[list, float]:
    """Rows of the whole-CT predictions of ``checkpoint`` on ``test``, and seconds per case."""
    per_case, seconds = checkpoint_case_rows(checkpoint, test)
    return [r for _, rows in per_case for r in rows], seconds


class TimedWholeCT:
    """The whole-CT validator handed to the trainer, timed: ``seconds[epoch]`` for each epoch after
    which it ran. The trainer calls it after timing the epoch and before ``on_epoch`` with that
    epoch's record, so :meth:`on_epoch` files the pending time under the epoch that was evaluated
    (recorded as it happens, not recomputed from ``train.whole_ct_every``, which a resumed run
    applies to its own ``train.epochs``)."""

    def __init__(self, validate=None):
        if validate is None:
            from vertstudy.infer.evaluate import whole_ct_figures as validate
        self.validate = validate
        self.seconds: dict[int, float] = {}
        self._pending: float | None = None

    def __call__(self, model, cfg: Config, val_cases: list, prior) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            return self.validate(model, cfg, val_cases, prior)
        finally:
            self._pending = time.perf_counter() - t0

    def on_epoch(self, record: dict) -> None:
        if self._pending is not None:
            self.seconds[int(record["epoch"])] = self._pending
            self._pending = None


def warm_epochs(cfg: Config) -> int:
    """Epochs a time-budgeted run trains before it sizes the rest from the last one: 2, so that
    the first epoch's warm-up is not taken for the pace; 1 with a cosine schedule, whose rate in
    epoch 2 would follow a run of 2 epochs (the plateau and step schedules do not look at the
    number of epochs)."""
    return 1 if cfg.train.schedule.kind == "cosine" else 2


def _with_epochs(cfg: Config, epochs: int) -> Config:
    """``cfg`` with ``train.epochs`` set to ``epochs``."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})


def _train_for(cfg: Config, train: list, val: list, out: Path, minutes: float | None, max_epochs: int,
               progress: bool, crops: int | None = None, whole_ct: TimedWholeCT | None = None):
    """Train :func:`warm_epochs`, then resume up to the epochs that fit ``minutes`` of training
    at the last one's pace (the epochs' ``wall_s``: whole-CT validations left out), and resume
    again for what :func:`top_up` finds left (not with a cosine schedule); or, with
    ``crops``, exactly the epochs that show at least that many training crops. Returns the
    result and the seconds in all."""
    from vertstudy.train.trainer import train as run

    whole_ct = whole_ct if whole_ct is not None else TimedWholeCT()
    kw = {"progress": progress, "whole_ct": whole_ct, "on_epoch": whole_ct.on_epoch}
    t0 = time.perf_counter()
    if crops is not None:
        per_epoch = len(train) * cfg.data.crop.crops_per_case
        epochs = max(1, math.ceil(crops / per_epoch))
        return run(_with_epochs(cfg, epochs), train, val, out, **kw), time.perf_counter() - t0
    warm = warm_epochs(cfg)
    first = run(_with_epochs(cfg, warm), train, val, out, **kw)
    if first.status != "completed":
        return first, time.perf_counter() - t0
    per_epoch = first.history[-1]["wall_s"]  # training + crop validation, without whole CTs, set-up, checkpoints
    epochs = int(min(max_epochs, max(warm + 1, math.floor(minutes * 60.0 / per_epoch))))
    result = first
    for _ in range(1 + TOP_UPS):
        result = run(_with_epochs(cfg, epochs), train, val, out, resume=result.last_checkpoint, **kw)
        more = top_up(result.history, minutes, warm) if warm > 1 and result.status == "completed" else 0
        if more < 1 or epochs >= max_epochs:
            break
        epochs = min(max_epochs, epochs + more)
    return result, time.perf_counter() - t0


#: times a time-budgeted run may resume again for the minutes left (see :func:`top_up`)
TOP_UPS = 2


def top_up(history: list[dict], minutes: float, warm: int) -> int:
    """Epochs that still fit a budget of ``minutes`` after ``history``, at the mean pace of its
    epochs after the ``warm`` ones; 0 when less than 2 % of the budget is left. The pace of the
    second epoch can still be off: on a 2-core AMD EPYC it took 4.95 s, the next ones 4.4 and
    3.7 s, and a '30-minute' run sized from it trained 23.9 minutes."""
    spent = sum(h["wall_s"] for h in history)
    left = minutes * 60.0 - spent
    paced = [h["wall_s"] for h in history[warm:]]
    if not paced or left < 0.02 * minutes * 60.0:
        return 0
    return int(left // (sum(paced) / len(paced)))


#: the validation CTs' identification rate whose training time ``minutes_to_85`` reports
TARGET_ID_RATE = 0.85


def whole_ct_curve(history: list[dict], evaluated: set[int] | dict[int, float]) -> list[dict]:
    """One point per *evaluated* epoch of ``history`` (the trainer's records, in order): ``epoch``,
    ``train_min`` (the ``wall_s`` of every epoch up to and including it, in minutes: training time
    without the whole-CT validations) and ``val_ct_id_rate``. Epochs not in ``evaluated`` only
    repeat the last value and are left out, though their time counts."""
    points, seconds = [], 0.0
    for record in history:
        seconds += float(record["wall_s"])
        if int(record["epoch"]) in evaluated:
            points.append({"epoch": int(record["epoch"]), "train_min": seconds / 60.0,
                           "val_ct_id_rate": float(record.get("val_ct_id_rate", math.nan))})
    return points


def minutes_to_rate(curve: list[dict], target: float = TARGET_ID_RATE) -> float | None:
    """Training minutes of the first point of ``curve`` (:func:`whole_ct_curve`) whose
    ``val_ct_id_rate`` is at least ``target``; None when none is (NaN never is)."""
    return next((p["train_min"] for p in curve if p["val_ct_id_rate"] >= target), None)


#: default ``whole_ct_every`` of bench learn. Measured on 2 cores (1 thread, defaults, 20 epochs):
#: an epoch's ``wall_s`` 5.0-6.9 s, one whole-CT validation of the 4 validation CTs 3.1-3.5 s, so
#: every 5th epoch (and the first and last) costs ~13 % of the training time of an 8-minute run
#: (15 % of that 20-epoch run); every 4th would be ~15 %, every epoch ~60 %.
WHOLE_CT_EVERY = 5


def bench_learn(
    train_cases: int = 24,
    val_cases: int = 4,
    test_cases: int = 12,
    minutes: float = 8.0,
    max_epochs: int = 2000,
    width: float = 0.25,
    crop_size: tuple[int, int, int] = (48, 32, 32),
    spacing_mm: float = 4.0,
    lr: float = 0.003,
    workers: int = 1,
    threads: int | None = 1,
    phantom_seed: int = 0,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
    crops: int | None = None,
    overrides: dict | None = None,
    whole_ct_every: int = WHOLE_CT_EVERY,
) -> dict:
    """Train for about ``minutes`` and score whole-CT labelling of held-out phantoms against the
    mean-position baseline; returns the figures (names carry units).

    Defaults: 24 phantoms to train on (4 of them validate), 12 held out; 48 x 32 x 32 crops at
    4 mm (192 x 128 x 128 mm, close to the paper's 208 x 160 x 160 mm field of view), width 0.25,
    lr 0.003. ``phantom_seed`` draws the phantoms, ``seed`` is the training seed (config
    ``seed``: initial weights, crop order); the figures report both (``phantom_seed``,
    ``train_seed``). ``threads``: torch intra-op threads during the run (see ``bench train``).
    ``max_epochs`` caps a time-budgeted run (2000: the budget binds; 200, the old cap, ended
    30-minute runs after 22 minutes). ``crops``: train on a fixed number of crops instead of a
    time budget (runs then do not depend on the machine's speed). ``overrides``: further config
    fields (dotted names), for ablations; they apply last, so ``train.whole_ct_every`` there
    wins over ``whole_ct_every``.

    ``whole_ct_every``: label the validation CTs whole after the first epoch, every k-th and the
    last (0: never). Figures: ``minutes_to_85`` (training minutes, whole-CT validations left out,
    at which ``val_ct_id_rate`` first reaches 0.85 on an evaluated epoch; None if never or off),
    ``val_ct_curve`` (``[epoch, training minutes, val_ct_id_rate]`` per evaluation),
    ``whole_ct_validations``, ``whole_ct_s`` (their seconds in all), ``whole_ct_s_per_validation``
    and ``whole_ct_share_of_training`` (``whole_ct_s`` over the epochs' summed ``wall_s``).

    The held-out figures come from :func:`vertstudy.infer.diagnose.diagnose` on ``best.pt``:
    ``test_id_rate`` / ``test_loc_error_mm`` / ``test_false_per_case`` for the configured decoder,
    the same with a ``_kmeans`` and ``_sequence`` suffix for each decoder, and the whole
    decomposition under ``diag_``.
    """
    if val_cases >= train_cases:
        raise VertstudyError(f"bench learn: --val-cases {val_cases} leaves no case to train on: it must be less "
                             f"than --train-cases ({train_cases})")
    over = overrides or {}
    if over.get("train.select_on") == "val_ct" and over.get("train.whole_ct_every", whole_ct_every) == 0:
        raise VertstudyError("bench learn: --set train.select_on=val_ct chooses best.pt among whole-CT validations, "
                             "but --whole-ct-every 0 turns them off; give --whole-ct-every K with K >= 1")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # validated before any phantom is written
        cfg = learn_config(width, crop_size, spacing_mm, lr, workers, seed, overrides, whole_ct_every)
        with work_folder(workdir, "vertstudy-bench-learn-") as work:
            n = train_cases + test_cases
            # one data folder per (cases, phantom seed): a kept --workdir never serves other phantoms
            cases = prepared_phantoms(work / f"data-{n}-seed{phantom_seed}", n, phantom_seed, spacing_mm, progress)
            if len(cases) != n:
                raise VertstudyError(f"bench learn: {len(cases)} of {n} phantoms could be prepared under {work} "
                                     "(--workdir); remove that folder or pass another --workdir, then run again")
            pool, test = cases[:train_cases], cases[train_cases:]
            train, val = pool[: train_cases - val_cases], pool[train_cases - val_cases :]
            shutil.rmtree(work / "run", ignore_errors=True)
            timed = TimedWholeCT()
            result, train_s = _train_for(cfg, train, val, work / "run", minutes, max_epochs, progress, crops, timed)
            figures = _figures(cfg, result, train_s, len(train), len(val), len(test), phantom_seed, timed.seconds)
            if result.best_checkpoint is not None:
                figures.update(held_out_figures(result.best_checkpoint, pool, test))
            return figures
    finally:
        torch.set_num_threads(previous)


def held_out_figures(checkpoint: Path, pool: list[CachedCase], test: list[CachedCase]) -> dict:
    """Whole-CT figures of ``checkpoint`` on ``test`` for every decoder, its decomposition, and
    the mean-position baseline fitted on ``pool``."""
    from vertstudy.infer.diagnose import diagnose
    from vertstudy.model.load import load_model
    from vertstudy.model.prior import load_spine_prior
    from vertstudy.train.metrics import summarize

    model, cfg = load_model(checkpoint)
    t0 = time.perf_counter()
    diag = diagnose(model, cfg, test, load_spine_prior(checkpoint))
    diag_s = time.perf_counter() - t0
    base = summarize(baseline_rows(pool, test))
    out = {}
    for dec in ("kmeans", "sequence"):
        if f"shipped_{dec}_id_rate" in diag:
            for key in ("id_rate", "loc_error_mm", "false_per_case"):
                out[f"test_{key}_{dec}"] = diag[f"shipped_{dec}_{key}"]
    chosen = cfg.infer.decoder if f"test_id_rate_{cfg.infer.decoder}" in out else "kmeans"
    _, infer_s = whole_ct_rows(checkpoint, test[:1])  # the time of plain inference, on one case
    out.update({
        "decoder": chosen,
        "test_id_rate": out[f"test_id_rate_{chosen}"],
        "test_loc_error_mm": out[f"test_loc_error_mm_{chosen}"],
        "test_false_per_case": out[f"test_false_per_case_{chosen}"],
        "test_vertebrae_in_truth": sum(int(np.asarray(c.indices).size) for c in test),
        "baseline_loc_error_mm": base["loc_error_mm_mean"],
        "baseline_loc_error_std_mm": base["loc_error_mm_std"],
        "baseline_id_rate": base["id_rate"],
        "infer_s_per_case": infer_s,
        "diagnose_s": diag_s,
        **{f"diag_{k}": v for k, v in diag.items()},
    })
    return out


def _figures(cfg: Config, result, train_s: float, n_train: int, n_val: int, n_test: int, phantom_seed: int,
             whole_ct_s: dict[int, float]) -> dict:
    best = result.best_metrics
    crops = result.epochs * n_train * cfg.data.crop.crops_per_case
    epochs_s = sum(float(h["wall_s"]) for h in result.history)
    curve = whole_ct_curve(result.history, whole_ct_s)
    ct_total = sum(whole_ct_s.values())
    rates = [p["val_ct_id_rate"] for p in curve if math.isfinite(p["val_ct_id_rate"])]
    return {
        "config": f"width {cfg.model.width:g}, crop {'x'.join(map(str, cfg.data.crop.crop_size))} at "
        f"{cfg.data.prep.spacing_mm:g} mm, lr {cfg.train.lr:g}, batch {cfg.train.batch_size}",
        "cases_train_val_test": f"{n_train}/{n_val}/{n_test}",
        "phantom_seed": phantom_seed,
        "train_seed": cfg.seed,
        "status": result.status,
        "precision": result.precision,
        "epochs": result.epochs,
        "train_crops": crops,
        "train_s": train_s,
        "epochs_s": epochs_s,
        "best_epoch": result.best_epoch if result.best_epoch is not None else -1,
        "first_epoch_loss": result.history[0]["loss"] if result.history else math.nan,
        "last_epoch_loss": result.history[-1]["loss"] if result.history else math.nan,
        "best_val_loss": best.get("val_loss", math.nan),
        "best_val_crop_loc_error_mm": best.get("val_loc_error_mm", math.nan),
        "best_val_crop_id_rate": best.get("val_id_rate", math.nan),
        "best_val_crop_map": best.get("val_map", math.nan),
        "whole_ct_every": cfg.train.whole_ct_every,
        "whole_ct_validations": len(whole_ct_s),
        "whole_ct_s": ct_total,
        "whole_ct_s_per_validation": ct_total / len(whole_ct_s) if whole_ct_s else math.nan,
        "whole_ct_share_of_training": ct_total / epochs_s if epochs_s > 0 else math.nan,
        "val_ct_id_rate_max": max(rates) if rates else math.nan,
        "val_ct_id_rate_last": curve[-1]["val_ct_id_rate"] if curve else math.nan,
        "minutes_to_85": minutes_to_rate(curve),
        "val_ct_curve": [[p["epoch"], round(p["train_min"], 3), round(p["val_ct_id_rate"], 4)] for p in curve],
    }


def read_learn_figures(path: Path) -> dict:
    """The figures an earlier run printed with ``bench learn --json`` into ``path`` (UTF-8, a BOM,
    CRLF and blank lines accepted; the last JSON line counts, so a log that ends with it will do).
    Raises ``InputError`` naming the file when it is missing or holds no run's
    ``val_ct_curve``."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(path, "no such file (expected what `vertstudy bench learn --json` printed)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot be read as UTF-8 text ({exc.__class__.__name__})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    try:
        figures = json.loads(lines[-1]) if lines else None
    except ValueError:
        figures = None
    curve = figures.get("val_ct_curve") if isinstance(figures, dict) else None
    if not isinstance(curve, list) or not all(
        isinstance(p, list) and len(p) == 3 and all(isinstance(v, (int, float)) for v in p) for p in curve
    ):
        raise InputError(path, "is not what `vertstudy bench learn --json` prints: its last line must be one JSON "
                               "object with val_ct_curve, a list of [epoch, training minutes, id rate]")
    return figures


def plot_learning(path: Path, runs: list[dict]) -> Path:
    """Draw the runs' whole-CT validation curves (:func:`vertstudy.report.figures.learning`) into
    the PNG ``path``, written whole or not at all; returns ``path``."""
    from vertstudy.atomic import atomic_path
    from vertstudy.report.figures import learning

    with atomic_path(path, suffix=".png") as tmp:
        learning(tmp, runs, TARGET_ID_RATE)
    return path


def format_table(figures: dict) -> str:
    """The figures as a table, the whole-CT validation curve as a table of its own below them."""
    curve = figures.get("val_ct_curve") or []
    plain = {k: v for k, v in figures.items() if k != "val_ct_curve"}
    if plain.get("minutes_to_85", 0) is None:
        plain["minutes_to_85"] = "never reached" if curve else "off (whole_ct_every 0)"
    text = format_figures("vertstudy bench learn", plain)
    if curve:
        rows = [f"{'epoch':>5}  {'train min':>9}  val_ct_id_rate"]
        rows += [f"{e:>5}  {m:>9.2f}  {r:.3f}" for e, m, r in curve]
        text += "\n\nwhole-CT validation curve (training minutes without the validations)\n" + "\n".join(rows)
    return text
