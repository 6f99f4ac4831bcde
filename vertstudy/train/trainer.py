"""The trainer (paper section III-B): Adam, batch 2, a learning-rate schedule on the validation loss.

:func:`train` fits the network of ``config.model`` on random crops of ``train_cases`` and
evaluates it after every epoch on fixed validation crops of ``val_cases``. Every value it
uses is a field of the one :class:`~vertstudy.config.Config` (no subclass per variant); it
knows nothing of Ray — a trial adapter passes ``on_epoch`` to report and ``resume`` to restore.

Per epoch, ``on_epoch`` receives one flat dict (also kept in ``TrainResult.history``):

- ``epoch`` (1-based), ``lr`` (the learning rate used during the epoch);
- ``loss``, ``loss_cls``, ``loss_reg``: mean training losses over the epoch's batches;
- ``val_loss``: mean total loss over the validation crops;
- ``val_loc_error_mm``, ``val_id_rate``, ``val_map``: *crop-level* metrics of
  :func:`vertstudy.train.metrics.crop_metrics` on the validation crops —
  ``train.val_crops_per_case`` unaugmented crops per held-out case, centred at evenly spaced
  points along its spine, the same crops every epoch (NaN when there are no validation cases;
  the whole-CT metrics of the paper come from :mod:`vertstudy.infer`);
- the same validation metrics per region, ``val_loc_error_mm_<region>``, ``val_id_rate_<region>``,
  ``val_map_<region>`` (regions of :data:`vertstudy.anatomy.REGIONS`);
- with ``train.whole_ct_every = k > 0``: ``val_ct_id_rate``, ``val_ct_loc_error_mm``,
  ``val_ct_false_per_case``: the validation cases labelled on the *whole* CT (tiles, votes,
  ``infer.decoder``) after the first epoch, every k-th and the last; between evaluations the
  last value is repeated. ``train.select_on = "val_ct"`` keeps as ``best.pt`` the
  evaluated epoch with the highest whole-CT id rate (then the lowest error);
- ``wall_s``: seconds for the epoch (training and validation, not the checkpoint writes);
  ``crops_per_s``: training crops per second of the training part.

Schedules (``train.schedule.kind``), stepped once per epoch:

- ``plateau`` (paper): multiply the lr by ``factor`` (0.4) when the validation loss (the
  training loss when there is no validation case) has not improved for ``patience`` epochs,
  never below ``min_lr``;
- ``cosine``: ``min_lr + (lr - min_lr) (1 + cos(pi e / epochs)) / 2`` in epoch ``e + 1``;
- ``step``: ``max(lr * gamma ** (e // step_size), min_lr)`` in epoch ``e + 1``.

A non-finite training or validation loss ends training with status ``diverged``; no
checkpoint is written for that epoch, so ``last.pt`` and ``best.pt`` hold the last good state.

Checkpoints (``last.pt`` every epoch, ``best.pt`` at the lowest validation loss or, see above,
the best whole-CT validation) also hold the spine prior of the sequence decoder, fitted on the
training cases (:func:`training_prior`), and are written
atomically and hold only tensors and plain Python values, so :func:`load_checkpoint` reads
them with ``torch.load(..., weights_only=True)``. ``last.pt`` includes the optimizer, scheduler
and random-number states: resuming from it (in this or a fresh process) continues the run bit
for bit on CPU, because every crop is drawn from ``(seed, epoch, index)``. ``best.pt`` leaves
them out (:data:`RESUME_ONLY`; a third of the size with Adam's two moments): it is read for its
weights only.

With ``train.ema_decay > 0`` a :class:`WeightAverage` of the weights is updated after every
optimizer step, and everything that judges the network sees it instead of the trained weights:
the validation crops (and so the plateau schedule and ``val_loss`` selection), the whole-CT
validation and the weights of ``best.pt``; ``last.pt`` holds both (``model`` and ``average``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vertstudy.anatomy import REGIONS
from vertstudy.checkpoint import CHECKPOINT_FORMAT, checkpoint_config, load_checkpoint, save_checkpoint
from vertstudy.config import Config, TrainConfig
from vertstudy.data.cache import CachedCase
from vertstudy.data.crops import CropDataset, make_loader
from vertstudy.errors import ConfigError
from vertstudy.memory import reuse_freed_memory
from vertstudy.model.load import select_device
from vertstudy.model.prior import training_prior

EPOCH_KEYS = (
    "epoch",
    "loss",
    "loss_cls",
    "loss_reg",
    "val_loss",
    "val_loc_error_mm",
    "val_id_rate",
    "val_map",
    "lr",
    "wall_s",
    "crops_per_s",
)
_CROP_METRICS = [f"{m}{r}" for m in ("loc_error_mm", "id_rate", "map") for r in ("", *(f"_{n}" for n in REGIONS))]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``epochs`` counts finished epochs (including those of a resumed checkpoint); ``best_epoch``
    and ``best_metrics`` are the epoch with the lowest validation loss and its record (None /
    empty before the first finished epoch); ``message`` says why a run diverged.
    """

    status: Literal["completed", "diverged"]
    epochs: int
    best_epoch: int | None
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    device: str
    message: str = ""
    precision: str = "fp32"  # what it trained in: bf16 | fp32 (training_precision)


class Diverged(Exception):
    """A loss that is not finite (internal: turned into status ``diverged``)."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX tiles): there bf16 matrix
    work runs ~4x float32 (measured 501 against 120 GFLOP/s, 1 thread); elsewhere oneDNN emulates
    it, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def training_precision(device: torch.device, amp: str) -> str:
    """``"bf16"`` or ``"fp32"``: what ``train.amp`` (auto | always | cuda | off) trains in on ``device``."""
    if amp == "off":
        return "fp32"
    if device.type == "cuda" or amp == "always":
        return "bf16"
    if amp == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is ``"bf16"`` (:func:`training_precision`),
    else a no-op context. Under CPU bf16 autocast the network keeps its activations bf16 and
    channels-last (``model.conv_layout`` auto; :class:`vertstudy.model.blocks.Conv3d`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, python) as tensors and plain types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(v) for v in mt], "gauss_next": gauss_next},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# -- optimizer and schedule ------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with ``train.lr`` and ``train.weight_decay`` (paper: 0.01, 1e-4).

    PyTorch's fused implementation (one kernel over all parameters): the same update within
    float rounding, and the same state dict, so a checkpoint resumes either way. On the CPU the
    default per-parameter loop took 12.3 ms per step for the width-0.25 network's 1.1 M
    parameters (mostly Python overhead, ~60 tensors), the fused one 2.6 ms.
    """
    return torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig):
    """The epoch-wise schedule of ``train.schedule`` (see the module docstring).

    Step it once per epoch with :func:`step_scheduler`.
    """
    s = train_cfg.schedule
    if s.kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=s.factor, patience=s.patience, min_lr=s.min_lr
        )
    if s.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_cfg.epochs, eta_min=s.min_lr)
    floor = s.min_lr / train_cfg.lr
    # A plain function (not a callable object), so the scheduler's state_dict stays plain.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: max(s.gamma ** (e // s.step_size), floor))


def step_scheduler(scheduler, monitored_loss: float) -> None:
    """Advance the schedule by one epoch; the plateau schedule watches ``monitored_loss``."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored_loss)
    else:
        scheduler.step()


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# -- one epoch -------------------------------------------------------------------------------
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_finite(losses: dict[str, torch.Tensor], where: str) -> None:
    total = losses["total"]
    if not bool(torch.isfinite(total.detach()).all()):
        raise Diverged(f"{where}: loss is {float(total.detach()):g}")


class WeightAverage:
    """Exponential moving average of a model's weights (``train.ema_decay``), kept in a copy of the
    model that validation, whole-CT validation and ``best.pt`` use.

    After optimizer step ``t`` (1-based, counted over the whole run, resumes included) every
    parameter moves as ``ema += (1 - d) (w - ema)`` with ``d = min(decay, (1 + t) / (10 + t))``:
    the average forgets its random start within tens of steps and then spans about
    ``1 / (1 - decay)`` steps. Buffers (this network has none that learn) are copied. The copy
    never records gradients; its state (``state_dict``) is the averaged weights and ``t``.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        self.decay = float(decay)
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
    advance: Callable[[], None] = lambda: None,
    average: WeightAverage | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean ``loss``, ``loss_cls``, ``loss_reg`` and ``crops``.
    ``average``: updated after every optimizer step.

    Raises :class:`Diverged` at the first non-finite loss, before the optimizer step.
    """
    from vertstudy.losses import total_loss

    model.train()
    precision = training_precision(device, cfg.train.amp)
    sums = {"total": 0.0, "cls": 0.0, "reg": 0.0}
    batches = crops = 0
    for batch in loader:
        batch = _to_device(batch, device)
        with autocast(device, precision):
            out = model(batch["image"])
        losses = total_loss(_float32(out), batch, cfg.loss, cfg.model)
        _check_finite(losses, f"training batch {batches}")
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(model)
        for k in sums:
            sums[k] += float(losses[k].detach())
        batches += 1
        crops += int(batch["image"].shape[0])
        advance()
    n = max(batches, 1)
    return {"loss": sums["total"] / n, "loss_cls": sums["cls"] / n, "loss_reg": sums["reg"] / n, "crops": crops}


def _float32(out: dict) -> dict:
    """Network outputs in float32 (they may be bf16 under autocast); None stays None. The
    heatmaps stay as they are: the losses that read them compute in float32 themselves, and a
    float32 copy of 26 full-resolution maps per crop would cost a pass for nothing."""
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "heatmaps" else v
            for k, v in out.items()}


@torch.no_grad()
def evaluate_crops(
    model: torch.nn.Module, loader: Iterable[dict], cfg: Config, device: torch.device, spacing_mm: float
) -> dict[str, float]:
    """Mean total loss and crop-level metrics on fixed validation crops.

    Returns ``val_loss`` and ``val_loc_error_mm`` / ``val_id_rate`` / ``val_map`` (and per region,
    ``val_map_lumbar``, ...) from :func:`vertstudy.train.metrics.crop_metrics` over all crops at
    once (NaN without crops).
    """
    from vertstudy.losses import total_loss
    from vertstudy.train.metrics import crop_metrics

    model.eval()
    precision = training_precision(device, cfg.train.amp)
    loss_sum, n = 0.0, 0
    preds, trues, present, probs = [], [], [], []
    for batch in loader:
        batch = _to_device(batch, device)
        with autocast(device, precision):
            out = model(batch["image"])
        out = _float32(out)
        losses = total_loss(out, batch, cfg.loss, cfg.model)
        _check_finite(losses, "validation")
        b = int(batch["image"].shape[0])
        loss_sum += float(losses["total"]) * b
        n += b
        preds.append(out["coords"].cpu())
        trues.append(batch["coords"].cpu())
        present.append(batch["present"].cpu())
        if out.get("logits") is not None:
            probs.append(torch.sigmoid(out["logits"]).cpu())
    if n == 0:
        return {"val_loss": math.nan, **{f"val_{k}": math.nan for k in _CROP_METRICS}}
    metrics = crop_metrics(
        torch.cat(preds).numpy(),
        torch.cat(trues).numpy(),
        torch.cat(present).numpy(),
        torch.cat(probs).numpy() if probs else None,
        spacing_mm,
    )
    return {"val_loss": loss_sum / n, **{f"val_{k}": float(v) for k, v in metrics.items()}}


# -- the training loop -----------------------------------------------------------------------
@dataclass
class _State:
    """What a checkpoint restores besides the model, optimizer and scheduler."""

    epoch: int = 0
    best_epoch: int | None = None
    best_loss: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    best_ct: tuple[float, float] = (-math.inf, -math.inf)  # (id rate, -error) of best.pt under select_on val_ct
    last_ct: dict[str, float] = field(default_factory=dict)


def _loaders(cfg: Config, train_cases: list[CachedCase], val_cases: list[CachedCase], device: torch.device):
    """Training loader (random augmented crops) and validation loader (fixed crops), one set of
    workers each for the whole run."""
    train_set = CropDataset(train_cases, cfg.data.crop, cfg.data.augment, seed=cfg.seed, train=True)
    val_crop = cfg.data.crop.model_copy(update={"crops_per_case": cfg.train.val_crops_per_case})
    val_set = CropDataset(val_cases, val_crop, cfg.data.augment, seed=cfg.seed, train=False)
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, cfg.train.batch_size, cfg.train.workers, pin_memory=pin)
    val_loader = make_loader(val_set, cfg.train.batch_size, cfg.train.workers, pin_memory=pin) if val_cases else []
    return train_set, train_loader, val_loader


#: what ``best.pt`` leaves out of the state: it is read for its weights (evaluation, predict,
#: diagnose), never resumed from, and Adam's two moments would triple its size.
RESUME_ONLY = ("optimizer", "scheduler", "rng")


def _checkpoint_state(model, optimizer, scheduler, st: _State, cfg: Config, prior=None,
                      average: WeightAverage | None = None) -> dict[str, Any]:
    """``last.pt``'s state: ``model`` holds the trained weights, ``average`` (with
    ``train.ema_decay``) the averaged ones and their step count."""
    extra = {} if average is None else {"average": average.state_dict()}
    return {
        "spine_prior": None if prior is None else prior.to_state(),
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": st.epoch,
        "best_epoch": st.best_epoch,
        "best_loss": st.best_loss,
        "history": st.history,
        "best_ct": list(st.best_ct),
        "last_ct": st.last_ct,
        "config": cfg.model_dump(),
        "rng": rng_states(),
        **extra,
    }


def _best_state(state: dict[str, Any]) -> dict[str, Any]:
    """``best.pt``'s state from ``last.pt``'s: no resume-only parts, and the weights that were
    validated (the averaged ones when there are)."""
    best = {k: v for k, v in state.items() if k not in (*RESUME_ONLY, "average")}
    if "average" in state:
        best["model"] = state["average"]["model"]
    return best


def _restore(path: Path, cfg: Config, model, optimizer, scheduler, average: WeightAverage | None = None) -> _State:
    """Load ``last.pt`` into the model, optimizer, scheduler, RNGs and ``average`` (one that the
    checkpoint has no average for starts from the restored weights); the loop's state."""
    state = load_checkpoint(path)
    if any(key not in state for key in RESUME_ONLY):
        raise ConfigError(f"{path}: holds the weights only (a best.pt has no optimizer state); resume from last.pt")
    saved_model = checkpoint_config(state, path).model
    if not saved_model.same_network(cfg.model):
        raise ConfigError(f"{path}: resume with model config {cfg.model!r}, but the checkpoint has {saved_model!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    if average is not None:
        if "average" in state:
            average.load_state_dict(state["average"])
        else:
            average.model.load_state_dict(state["model"])
    best_ct = tuple(state.get("best_ct", (-math.inf, -math.inf)))
    return _State(state["epoch"], state["best_epoch"], float(state["best_loss"]), list(state["history"]), best_ct,
                  dict(state.get("last_ct", {})))


def run_epoch(
    epoch: int,
    model: torch.nn.Module,
    train_loader: Iterable[dict],
    val_loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
    spacing_mm: float,
    progress: bool = False,
    average: WeightAverage | None = None,
) -> dict[str, float]:
    """Train one epoch and validate (the averaged weights when ``average`` is given); returns the
    epoch's record (module docstring). Raises :class:`Diverged` on a non-finite loss."""
    t0 = time.perf_counter()
    lr = current_lr(optimizer)
    with _epoch_bar(progress, len(train_loader), epoch, cfg.train.epochs) as advance:
        fit = train_epoch(model, train_loader, optimizer, cfg, device, advance, average)
    t_train = time.perf_counter() - t0
    val = evaluate_crops(model if average is None else average.model, val_loader, cfg, device, spacing_mm)
    record = {
        "epoch": epoch,
        "loss": fit["loss"],
        "loss_cls": fit["loss_cls"],
        "loss_reg": fit["loss_reg"],
        **val,
        "lr": lr,
        "crops_per_s": fit["crops"] / max(t_train, 1e-9),
        "wall_s": time.perf_counter() - t0,
    }
    return _ordered(record)


#: ``(model, config, validation cases, spine prior) -> {val_ct_id_rate, val_ct_loc_error_mm,
#: val_ct_false_per_case}``: whole-CT validation, :func:`vertstudy.infer.evaluate.whole_ct_figures`
WholeCT = Callable[[torch.nn.Module, Config, list[CachedCase], Any], dict[str, float]]
WHOLE_CT_KEYS = ("val_ct_id_rate", "val_ct_loc_error_mm", "val_ct_false_per_case")


def ct_score(record: dict) -> tuple[float, float]:
    """Order of whole-CT validations: higher id rate, then lower error; a figure that could not be
    measured (NaN: nothing predicted) ranks below any measured one, so the first evaluation is
    always kept and ``best.pt`` always exists."""
    rate, err = record["val_ct_id_rate"], record["val_ct_loc_error_mm"]
    return (rate if math.isfinite(rate) else -1.0, -err if math.isfinite(err) else -math.inf)


def _whole_ct_due(train_cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` ends with a whole-CT validation: the first, every k-th and the last
    (the first, so a search metric or ASHA reading it always has a value)."""
    k = train_cfg.whole_ct_every
    return k > 0 and (epoch == 1 or epoch % k == 0 or epoch == train_cfg.epochs)


def _ordered(record: dict[str, Any]) -> dict[str, float]:
    """The epoch record with ``EPOCH_KEYS`` first, then the per-region metrics; floats but ``epoch``."""
    keys = [*EPOCH_KEYS, *sorted(k for k in record if k not in EPOCH_KEYS)]
    return {k: int(record[k]) if k == "epoch" else float(record[k]) for k in keys}


def _epoch_bar(progress: bool, total: int, epoch: int, epochs: int):
    """A rich progress bar over one epoch's batches, or a no-op."""
    from vertstudy.progress import progress_counter

    return progress_counter(progress, total, f"epoch {epoch}/{epochs}")


def train(
    config: Config,
    train_cases: list[CachedCase],
    val_cases: list[CachedCase],
    out_dir: Path,
    on_epoch: Callable[[dict], None] | None = None,
    resume: Path | None = None,
    progress: bool = False,
    whole_ct: WholeCT | None = None,
) -> TrainResult:
    """Train ``config.model`` for ``config.train.epochs`` epochs (in total, counting a resumed
    checkpoint's); write ``last.pt`` / ``best.pt`` into ``out_dir``; call ``on_epoch`` with each
    epoch's record (see the module docstring). Returns the :class:`TrainResult`.

    ``resume``: a ``last.pt`` of the same model config; training continues after its epoch
    (the other sections of ``config`` apply from there on). An exception raised by ``on_epoch``
    (e.g. a pruner stopping the trial) propagates, after that epoch's checkpoints are written.
    ``whole_ct``: labels the validation cases on the whole CT; ``train.whole_ct_every > 0``
    needs it (inference is a later stage than training, so the caller passes
    :func:`vertstudy.infer.evaluate.whole_ct_figures`).
    """
    cfg = config
    if not train_cases:
        raise ConfigError("train: no training cases")
    if cfg.train.whole_ct_every and whole_ct is None:
        raise ConfigError("train.whole_ct_every > 0 needs a whole-CT validator: pass "
                          "whole_ct=vertstudy.infer.evaluate.whole_ct_figures")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = select_device(cfg.train.device)
    reuse_freed_memory()  # large activations: no mmap / page faults / munmap per step

    from vertstudy.model.network import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    st = _restore(Path(resume), cfg, model, optimizer, scheduler, average) if resume is not None else _State()
    validated = model if average is None else average.model
    train_set, train_loader, val_loader = _loaders(cfg, train_cases, val_cases, device)
    spacing_mm = float(train_cases[0].geometry.spacing_mm)

    prior = training_prior(train_cases)
    precision = training_precision(device, cfg.train.amp)
    if progress:
        norm = ""
        if precision == "bf16" and device.type == "cpu":
            from vertstudy.model.kernels import describe_group_norm

            norm = f"; GroupNorm: {describe_group_norm()}"
        print(f"vertstudy: training in {precision} on {device.type} (train.amp = {cfg.train.amp}){norm}", flush=True)
    status, message = "completed", ""
    while st.epoch < cfg.train.epochs:
        epoch = st.epoch + 1
        train_set.set_epoch(epoch)
        try:
            record = run_epoch(epoch, model, train_loader, val_loader, optimizer, cfg, device, spacing_mm, progress,
                               average)
        except Diverged as exc:
            status, message = "diverged", f"epoch {epoch}: {exc}"
            break
        ct_now = _whole_ct_due(cfg.train, epoch) and bool(val_cases)
        if ct_now:
            st.last_ct = whole_ct(validated, cfg, val_cases, prior)
        if cfg.train.whole_ct_every:
            record = _ordered({**record, **(st.last_ct or {k: math.nan for k in WHOLE_CT_KEYS})})
        monitored = record["val_loss"] if val_cases else record["loss"]
        step_scheduler(scheduler, monitored)
        st.epoch = epoch
        improved = _note_best(st, cfg.train, record, monitored, ct_now and bool(val_cases), bool(val_cases))
        st.history.append(record)
        state = _checkpoint_state(model, optimizer, scheduler, st, cfg, prior, average)
        save_checkpoint(last_path, state)
        if improved:
            save_checkpoint(best_path, _best_state(state))
        if on_epoch is not None:
            on_epoch(dict(record))

    return _result(st, status, message, out_dir, device, precision)


def _note_best(st: _State, train_cfg: TrainConfig, record: dict, monitored: float, ct_now: bool,
               has_val: bool) -> bool:
    """Whether this epoch is the best so far by ``train.select_on`` (the whole-CT score, which
    only an epoch with a whole-CT validation can improve; else the monitored loss), noted in ``st``."""
    if train_cfg.select_on == "val_ct" and has_val:
        score = ct_score(record)
        if ct_now and score > st.best_ct:
            st.best_ct, st.best_epoch = score, record["epoch"]
            return True
        return False
    if monitored < st.best_loss:
        st.best_loss, st.best_epoch = monitored, record["epoch"]
        return True
    return False


def _result(st: _State, status: str, message: str, out_dir: Path, device: torch.device,
            precision: str) -> TrainResult:
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    best = next((dict(h) for h in st.history if h["epoch"] == st.best_epoch), {})
    return TrainResult(
        status=status,
        epochs=st.epoch,
        best_epoch=st.best_epoch,
        best_metrics=best,
        history=[dict(h) for h in st.history],
        last_checkpoint=last_path if last_path.exists() else None,
        best_checkpoint=best_path if best_path.exists() else None,
        device=device.type,
        message=message,
        precision=precision,
    )
