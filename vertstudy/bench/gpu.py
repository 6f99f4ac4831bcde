"""``vertstudy bench gpu`` (``python -m vertstudy.bench.gpu``): the paper's network measured on a GPU.

Measured on one device (default CUDA when present, else the CPU), each section in its own
``try`` so one that fails (bf16 unsupported, out of memory) reports ``<section>_error`` and the
others still run:

- ``flops``: FLOPs of one training step, forward + backward of one batch
  (``torch.utils.flop_counter.FlopCounterMode``, as :func:`vertstudy.bench.train.step_flops`),
  and of the forward pass of one crop;
- ``train_fp32`` / ``train_bf16``: full training steps (forward, the project's
  :func:`vertstudy.losses.total_loss` on float32 outputs, backward, Adam: the trainer's step)
  at ``--crop`` and ``--batch``, in float32 and under bf16 autocast of the forward pass (as the
  trainer runs it). A fresh model and optimizer each, ``--warmup`` untimed steps, then
  ``--steps`` timed: crops/s, ms per step, achieved TFLOP/s, and peak memory beside the
  estimate ``vertstudy bench train`` prints (parameters, gradients and two Adam moments,
  16 bytes per parameter, plus :func:`~vertstudy.model.network.estimate_activation_bytes` of
  this configuration, computed on the device being measured). On CUDA the peak is
  ``torch.cuda.max_memory_allocated`` over the timed steps (reset after the warm-up, so it is
  the steady state including model, gradients and Adam state, not cuDNN's algorithm search);
  on the CPU it is the increase of the process's peak RSS (a process-wide high-water mark: a
  later section only shows growth beyond earlier ones);
- ``infer_<precision>_b<N>``: ``model.eval()`` under ``torch.inference_mode`` (and bf16
  autocast for ``bf16``) at each ``--infer-batches`` batch size: crops/s and TFLOP/s;
- ``label_<precision>``: the time to label one whole volume at 2 mm, ``--volume`` (z, y, x)
  voxels, default :data:`PHANTOM_2MM_ZYX`, the canonical volume of a whole ``clinical``
  phantom (``PhantomConfig.preset("clinical", p_fov_full=1.0)``, seed 0, preprocessed at 2 mm:
  379 x 221 x 221, 175 tiles of 104 x 80 x 80 at stride 52 x 40 x 40, 154 of them holding
  body). ``--volume 378 117 117`` is the ``coarse`` phantom ``vertstudy bench infer`` labels
  (28 tiles, all with body). The volume is synthetic: z-scored air around an elliptic body
  cylinder (:func:`synthetic_volume`; ~21 % of the voxels and the same 154 of 175 tiles with
  body as that phantom). It is tiled as :mod:`vertstudy.infer.tiling` tiles (origins ``0, s,
  2s, ...`` plus one flush with the end; stride default half the crop, the studies' default
  before 2026-12-07, now a quarter), tiles without body are skipped by the same rule
  (``has_body``, ``body_fraction`` 0.02), and every other tile is cut out, moved to the
  device in batches of ``--label-batch`` and run, outputs back on the host, as
  ``run_network`` does. The votes and the clustering after the network (CPU work, the same
  on any machine) are not included: ``vertstudy bench infer`` times the whole path. The
  tiling is a copy, not an import, because
  :mod:`vertstudy.infer` imports SimpleITK (through :mod:`vertstudy.data`);
  ``tests/test_bench_gpu.py`` checks that the copy gives the same tiles.

Import rule: this module needs only torch, numpy and pydantic (through :mod:`vertstudy.config`);
nothing on its path imports Ray, SimpleITK, Optuna, W&B or pyarrow, so it runs from a checkout
on a bare GPU machine. ``tests/test_bench_gpu.py`` runs it with those imports blocked and fails
if anything outside torch, numpy, scikit-learn, pandas, pydantic and their own requirements is
loaded. The module level imports only the standard library, so the CLI can add these options
to its parser without loading torch.

On a GPU machine, from the repository root (exit code 1 when a section failed)::

    python -m vertstudy.bench.gpu --json > gpu.json        # figures on stdout, progress on stderr

Without pydantic there, it travels as wheels for that machine's Python (3.12 on this
workplace's lent H200). Once, here, in the repository root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        typing-extensions==4.16.0

(the versions installed here; pydantic pins pydantic-core exactly and needs typing-extensions
>= 4.16, so that one travels too; about 2.8 MB in all). Then the device run carries ``.whl``
and its command is::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 -m vertstudy.bench.gpu --json > $OUT/gpu.json

At the defaults (width 1, crop 104 x 80 x 80, batch 2, 20 timed steps, inference at 1, 4, 8,
both precisions) it takes well under a minute on an H200 after CUDA's start-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence

#: (z, y, x) voxels of the whole ``clinical`` phantom (seed 0, full view) preprocessed at 2 mm
PHANTOM_2MM_ZYX: tuple[int, int, int] = (379, 221, 221)
#: what must never be imported on this module's path (absent from a bare GPU machine)
FORBIDDEN_IMPORTS: tuple[str, ...] = ("ray", "SimpleITK", "optuna", "wandb", "pyarrow")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

_GIB = 1024.0**3
_BODY_FRACTION = 0.02  # InferConfig().body_fraction
_PAD_VALUE = -1.0  # z-scored air of the synthetic volume


# -- options ---------------------------------------------------------------------------------
def _positive(convert, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_pos_int = _positive(int, "a whole number >= 1")
_pos_float = _positive(float, "a number > 0")


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's own options (the CLI adds ``--seed``, ``--workdir`` and ``--json``)."""
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--width", type=_pos_float, default=1.0, help="network width multiplier (default 1, the paper's)")
    p.add_argument("--crop", type=_pos_int, nargs=3, default=(104, 80, 80), metavar=("Z", "Y", "X"),
                   help="training crop and inference tile, voxels, each divisible by 8 (default 104 80 80)")
    p.add_argument("--batch", type=_pos_int, default=2, help="training batch size (default 2)")
    p.add_argument("--steps", type=_pos_int, default=20,
                   help="timed training steps, and timed forward passes per inference batch size (default 20)")
    p.add_argument("--warmup", type=_nonneg_int, default=3, help="untimed steps / passes first (default 3)")
    p.add_argument("--infer-batches", type=_pos_int, nargs="+", default=(1, 4, 8), metavar="N",
                   help="inference batch sizes (default 1 4 8)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS,
                   help="fp32 and/or bf16 autocast (default both)")
    p.add_argument("--volume", type=_pos_int, nargs=3, default=PHANTOM_2MM_ZYX, metavar=("Z", "Y", "X"),
                   help=f"the volume to label, voxels at 2 mm (default {' '.join(map(str, PHANTOM_2MM_ZYX))}: a whole "
                   "clinical phantom; 378 117 117 is bench infer's coarse one)")
    p.add_argument("--stride", type=_pos_int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="tile stride, voxels (default: half the crop, 52 40 40 at the default crop)")
    p.add_argument("--label-batch", type=_pos_int, default=4, help="tiles per batch when labelling (default 4)")
    p.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vertstudy.bench.gpu",
        description="Training and inference speed, memory and TFLOP/s of the paper's network on one device "
        "(needs only torch, numpy and pydantic). Exit code 1 when a section failed.",
    )
    add_arguments(parser)
    parser.add_argument("--seed", type=_nonneg_int, default=0, help="weights and data seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def run_from_args(args: argparse.Namespace, progress: bool) -> dict:
    """:func:`bench_gpu` with the options of :func:`add_arguments` (and ``--seed``)."""
    return bench_gpu(
        device=args.device, width=args.width, crop=tuple(args.crop), batch=args.batch, steps=args.steps,
        warmup=args.warmup, infer_batches=tuple(args.infer_batches), precisions=tuple(args.precisions),
        volume=tuple(args.volume), stride=None if args.stride is None else tuple(args.stride),
        label_batch=args.label_batch, threads=args.threads, seed=getattr(args, "seed", 0), progress=progress,
    )


# -- tiling (a copy of vertstudy.infer.tiling, which imports SimpleITK through vertstudy.data) --
def axis_origins(n: int, c: int, s: int) -> list[int]:
    """Tile origins along one axis: ``vertstudy.infer.tiling.axis_origins``."""
    if n <= c:
        return [-((c - n) // 2)]
    return sorted({*range(0, n - c, s), n - c})


def tile_origins(shape_zyx: Sequence[int], crop: Sequence[int], stride: Sequence[int]):
    """(T, 3) int64 (z, y, x) tile origins, z-major: ``vertstudy.infer.tiling.tile_origins``."""
    import numpy as np

    if any(int(s) > int(c) for s, c in zip(stride, crop)):
        raise ValueError(f"stride {tuple(stride)} exceeds the crop {tuple(crop)} on some axis")
    axes = [axis_origins(int(n), int(c), int(s)) for n, c, s in zip(shape_zyx, crop, stride, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


def extract_crop(volume, origin, crop: Sequence[int], pad_value: float):
    """``vertstudy.data.crops.extract_crop``: a float32 block, ``pad_value`` outside the volume."""
    import numpy as np

    origin = np.asarray(origin, dtype=np.int64)
    size = np.asarray(crop, dtype=np.int64)
    shape = np.asarray(volume.shape, dtype=np.int64)
    lo, hi = np.clip(origin, 0, shape), np.clip(origin + size, 0, shape)
    out = np.full(tuple(int(s) for s in size), pad_value, dtype=np.float32)
    if (hi > lo).all():
        a, b = lo - origin, hi - origin
        out[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return out


def has_body(crop, pad_value: float, body_fraction: float = _BODY_FRACTION) -> bool:
    """``vertstudy.infer.tiling.has_body``: enough voxels 0.5 z-score units above air."""
    return float((crop > pad_value + 0.5).mean()) >= body_fraction


def synthetic_volume(shape_zyx: Sequence[int], seed: int = 0):
    """A z-scored (Z, Y, X) float32 volume: air (``_PAD_VALUE``) around an elliptic body cylinder
    along z of noisy tissue, semi-axes 0.22 Y (front-back) and 0.30 X (left-right), its centre at
    0.55 of Y (off the field's centre, as a patient lying on the table). Like the clinical phantom
    at 2 mm, ~21 % of the voxels are body and 154 of its 175 default tiles hold body; every one of
    the coarse phantom's 28."""
    import numpy as np

    z, y, x = (int(n) for n in shape_zyx)
    yy = (np.arange(y) - 0.55 * (y - 1)) / (0.22 * y)
    xx = (np.arange(x) - 0.5 * (x - 1)) / (0.30 * x)
    inside = (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0
    rng = np.random.default_rng(seed)
    volume = np.full((z, y, x), _PAD_VALUE, dtype=np.float32)
    volume[:, inside] = (1.0 + 0.5 * rng.standard_normal((z, int(inside.sum())))).astype(np.float32)
    return volume


# -- measuring -------------------------------------------------------------------------------
class _Probe:
    """Synchronised timing and peak memory on one device."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self._torch = torch
        self._rss0 = 0

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    def clear(self) -> None:
        gc.collect()
        if self.cuda:
            self._torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        self.sync()
        if self.cuda:
            self._torch.cuda.reset_peak_memory_stats(self.device)
        self._rss0 = _max_rss_bytes()

    def peak(self, prefix: str) -> dict:
        """The peak since :meth:`reset_peak`, named for this device's measure."""
        self.sync()
        if self.cuda:
            return {f"{prefix}_peak_gpu_gib": self._torch.cuda.max_memory_allocated(self.device) / _GIB}
        return {f"{prefix}_peak_rss_increase_gib": max(0, _max_rss_bytes() - self._rss0) / _GIB}

    def timed(self, fn: Callable[[], object], n: int) -> float:
        """Seconds for ``n`` calls of ``fn``, synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return time.perf_counter() - t0


def _max_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def _autocast(device, precision: str):
    """bf16 autocast on ``device``'s type for ``bf16`` (the trainer's ``autocast`` on CUDA; on the
    CPU too, so that the path is exercised there), else a disabled one."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _float32(out: dict) -> dict:
    """The trainer's ``_float32``: floating outputs as float32, None kept."""
    import torch

    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in out.items()}


def _check_bf16(device) -> None:
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"bf16 is not supported on {torch.cuda.get_device_name(device)}")


def _training_batch(cfg, batch: int, device, seed: int) -> dict:
    """A batch like the DataLoader's: z-scored-like images, a few vertebrae present per crop with
    their coordinates inside the crop."""
    import torch

    from vertstudy.anatomy import NUM_CLASSES

    g = torch.Generator().manual_seed(seed)
    crop = tuple(int(c) for c in cfg.data.crop.crop_size)
    present = torch.zeros(batch, NUM_CLASSES)
    for b in range(batch):
        first = int(torch.randint(0, NUM_CLASSES - 5, (1,), generator=g))
        present[b, first:first + 5] = 1.0
    coords = torch.rand(batch, NUM_CLASSES, 3, generator=g) * (torch.tensor(crop, dtype=torch.float32) - 1)
    image = torch.randn(batch, 1, *crop, generator=g)
    coords = coords * present[..., None]
    return {"image": image.to(device), "present": present.to(device), "coords": coords.to(device)}


class _Bench:
    """The sections of one run, sharing the configuration and the figures."""

    def __init__(self, cfg, device, steps: int, warmup: int, seed: int, progress: bool) -> None:
        self.cfg, self.device, self.steps, self.warmup, self.seed = cfg, device, steps, warmup, seed
        self.probe = _Probe(device)
        self.progress = progress
        self.figures: dict = {}
        self.failed: list[str] = []
        self.train_flops = self.infer_flops = 0  # set by the flops section

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[bench gpu] {text}", file=sys.stderr, flush=True)

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        """Run one section; its figures, or ``<name>_error`` when it raised (the rest still runs)."""
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        error = None
        try:
            self.figures.update(fn())
        except Exception as exc:  # noqa: BLE001 - a benchmark section reports any failure and goes on
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        self.probe.clear()  # after the traceback is gone, so an out-of-memory section frees its tensors
        if error is not None:
            self.figures[f"{name}_error"] = error
            self.failed.append(name)
            self.log(f"{name} FAILED: {error}")
        else:
            self.log(f"{name} done in {time.perf_counter() - t0:.1f} s")

    def model(self):
        import torch

        from vertstudy.model.network import build_model

        torch.manual_seed(self.seed)
        return build_model(self.cfg.model).to(self.device)

    # -- sections ------------------------------------------------------------------------
    def flops(self) -> dict:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from vertstudy.losses import total_loss

        model = self.model().train()
        batch = _training_batch(self.cfg, self.cfg.train.batch_size, self.device, self.seed)
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(batch["image"])
            total_loss(_float32(out), batch, self.cfg.loss, self.cfg.model)["total"].backward()
        train = int(counter.get_total_flops())
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(batch["image"][:1])
        self.train_flops, self.infer_flops = train, int(counter.get_total_flops())
        return {"params": sum(p.numel() for p in model.parameters()),
                "train_step_gflop": train / 1e9, "infer_crop_gflop": self.infer_flops / 1e9}

    def estimate(self, model, precision: str) -> float:
        """GiB: 16 bytes per parameter + activations saved for backward (``bench train``'s estimate)."""
        import torch

        from vertstudy.model.network import estimate_activation_bytes

        shape = (self.cfg.train.batch_size, 1, *self.cfg.data.crop.crop_size)
        acts = estimate_activation_bytes(model, shape, autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
        model.zero_grad(set_to_none=True)
        return (16.0 * sum(p.numel() for p in model.parameters()) + acts) / _GIB

    def train(self, precision: str) -> dict:
        import torch

        from vertstudy.losses import total_loss

        if precision == "bf16":
            _check_bf16(self.device)
        cfg, name = self.cfg, f"train_{precision}"
        model = self.model()
        estimate = self.estimate(model, precision)
        self.probe.clear()
        # the trainer's make_optimizer (vertstudy.train imports SimpleITK): PyTorch's fused Adam
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     fused=True)
        batch = _training_batch(cfg, cfg.train.batch_size, self.device, self.seed)
        model.train()
        last = {}

        def step() -> None:
            with _autocast(self.device, precision):
                out = model(batch["image"])
            loss = total_loss(_float32(out), batch, cfg.loss, cfg.model)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last["loss"] = loss.detach()

        self.probe.timed(step, self.warmup)
        self.probe.reset_peak()
        seconds = self.probe.timed(step, self.steps)
        figures = self.probe.peak(name)
        loss = float(last["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss}")
        crops = self.steps * cfg.train.batch_size
        figures.update({
            f"{name}_crops_per_s": crops / seconds,
            f"{name}_ms_per_step": 1e3 * seconds / self.steps,
            f"{name}_estimate_gib": estimate,
        })
        if f"{name}_peak_gpu_gib" in figures:
            figures[f"{name}_peak_to_estimate"] = figures[f"{name}_peak_gpu_gib"] / estimate
        if self.train_flops:
            figures[f"{name}_tflop_per_s"] = self.train_flops * self.steps / seconds / 1e12
        figures[f"{name}_final_loss"] = loss
        return figures

    def infer(self, precision: str, batches: Sequence[int]) -> dict:
        import torch

        if precision == "bf16":
            _check_bf16(self.device)
        model = self.model().eval()
        crop = tuple(int(c) for c in self.cfg.data.crop.crop_size)
        figures = {}
        for b in batches:
            name = f"infer_{precision}_b{b}"
            x = torch.randn(b, 1, *crop, generator=torch.Generator().manual_seed(self.seed)).to(self.device)

            def forward(x=x) -> None:
                with torch.inference_mode(), _autocast(self.device, precision):
                    model(x)

            self.probe.timed(forward, self.warmup)
            self.probe.reset_peak()
            seconds = self.probe.timed(forward, self.steps)
            figures.update(self.probe.peak(name))
            figures[f"{name}_crops_per_s"] = self.steps * b / seconds
            if self.infer_flops:
                figures[f"{name}_tflop_per_s"] = self.infer_flops * self.steps * b / seconds / 1e12
            del x
        return figures

    def label(self, precision: str, volume, stride: Sequence[int], batch: int) -> dict:
        """Tile ``volume``, skip empty tiles, run the network on the rest in batches of ``batch``
        with the outputs back on the host (``vertstudy.infer.tiling.run_network``'s work). One
        untimed labelling first when ``warmup`` > 0 (cuDNN picks kernels for the full and the
        last, partial batch), then one timed."""
        import numpy as np
        import torch

        if precision == "bf16":
            _check_bf16(self.device)
        model = self.model().eval()
        crop = tuple(int(c) for c in self.cfg.data.crop.crop_size)
        origins = tile_origins(volume.shape, crop, stride)

        def run() -> int:
            ran, pending, kept = 0, [], []

            def flush() -> None:
                x = torch.from_numpy(np.stack(pending))[:, None].to(self.device)
                with _autocast(self.device, precision):
                    out = model(x)
                kept.append(out["coords"].float().cpu().numpy())
                if out.get("logits") is not None:
                    kept.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
                pending.clear()

            with torch.inference_mode():
                for origin in origins:
                    c = extract_crop(volume, origin, crop, _PAD_VALUE)
                    if not has_body(c, _PAD_VALUE):
                        continue
                    pending.append(c)
                    ran += 1
                    if len(pending) == batch:
                        flush()
                if pending:
                    flush()
            return ran

        if self.warmup:
            run()
        self.probe.reset_peak()
        self.probe.sync()
        t0 = time.perf_counter()
        ran = run()  # ends with a copy to the host: synchronised
        seconds = time.perf_counter() - t0
        name = f"label_{precision}"
        figures = self.probe.peak(name)
        figures.update({f"{name}_s": seconds, f"{name}_tiles_run": ran, f"{name}_tiles_per_s": ran / seconds})
        return figures


def bench_gpu(
    device: str | None = None,
    width: float = 1.0,
    crop: tuple[int, int, int] = (104, 80, 80),
    batch: int = 2,
    steps: int = 20,
    warmup: int = 3,
    infer_batches: Sequence[int] = (1, 4, 8),
    precisions: Sequence[str] = PRECISIONS,
    volume: tuple[int, int, int] = PHANTOM_2MM_ZYX,
    stride: tuple[int, int, int] | None = None,
    label_batch: int = 4,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Measure the network on ``device``; returns the figures (names carry units; see the module
    docstring). A section that failed has ``<section>_error`` and is listed in ``failed_sections``."""
    import platform

    import torch

    from vertstudy.config import Config
    from vertstudy.memory import reuse_freed_memory

    reuse_freed_memory()  # as the trainer and the tile runner do (host memory; changes speed only)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as vertstudy.model.load.select_device: fixed crop size
    stride = tuple(int(s) for s in stride) if stride else tuple(max(1, int(c) // 2) for c in crop)
    cfg = Config.model_validate({
        "model": {"width": width},
        "data": {"crop": {"crop_size": tuple(crop)}},
        "train": {"batch_size": batch},
        "seed": seed,
    })
    figures: dict = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda) if dev.type == "cuda" else "n/a",
        "cudnn": str(torch.backends.cudnn.version()) if dev.type == "cuda" else "n/a",
        "torch_threads": torch.get_num_threads(),
        "config": f"width {width:g}, crop {'x'.join(map(str, crop))}, batch {batch}, {steps} timed steps "
        f"after {warmup} warm-up",
        "memory_measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda"
        else "peak RSS increase (process-wide high-water mark)",
    }
    bench = _Bench(cfg, dev, steps, warmup, seed, progress)
    bench.figures = figures
    bench.section("flops", bench.flops)
    for precision in precisions:
        bench.section(f"train_{precision}", lambda p=precision: bench.train(p))
    for precision in precisions:
        bench.section(f"infer_{precision}", lambda p=precision: bench.infer(p, infer_batches))

    vol = synthetic_volume(volume, seed)
    origins = tile_origins(vol.shape, crop, stride)
    body = sum(has_body(extract_crop(vol, o, crop, _PAD_VALUE), _PAD_VALUE) for o in origins)
    figures.update({
        "label_volume_zyx": "x".join(map(str, volume)),
        "label_stride_zyx": "x".join(map(str, stride)),
        "label_batch": label_batch,
        "label_tiles": int(len(origins)),
        "label_tiles_with_body": int(body),
        "label_body_voxel_fraction": float((vol > _PAD_VALUE + 0.5).mean()),
    })
    for precision in precisions:
        bench.section(f"label_{precision}", lambda p=precision: bench.label(p, vol, stride, label_batch))
    figures["failed_sections"] = ",".join(bench.failed) or "none"
    return figures


def format_table(figures: dict) -> str:
    from vertstudy.bench import format_figures

    return format_figures("vertstudy bench gpu", figures)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = run_from_args(args, progress=not args.quiet)
    print(json.dumps(figures) if args.json else format_table(figures), flush=True)
    return 1 if figures.get("failed_sections", "none") != "none" else 0


if __name__ == "__main__":
    sys.exit(main())
