"""``vertstudy bench train``: training throughput, data path versus model, FLOPs and memory.

Measured side by side in one run, after warm-up, the same number of steps each:

- ``loader_crops_per_s``: training crops per second of full training steps (forward, loss,
  backward, Adam) fed by the real DataLoader from the preprocessing cache (random crops with
  augmentation, ``workers`` worker processes);
- ``model_crops_per_s``: the same steps on the same batches, pre-made in memory;
- ``loader_to_model_ratio``: their ratio (>= 0.9: the data path is not the bottleneck);
- ``loader_only_crops_per_s``: the DataLoader alone, no model (how much headroom it has).

The two timed paths alternate in ``rounds`` blocks so that drift in a shared machine's load
hits both alike. Also: ``flops_per_step`` (``torch.utils.flop_counter.FlopCounterMode`` over
forward and backward of one batch), the achieved FLOP/s of the in-memory steps and its fraction
of this machine's float32 matmul FLOP/s (a timed 2048^3 ``torch.matmul`` at the same thread
count).

Memory at the *default* configuration (width 1, crop 104 x 80 x 80, batch 2), in a fresh
subprocess: the peak-RSS increase (``resource.getrusage`` ``ru_maxrss``) of one CPU training
step over the process with model, optimizer and batch already made; and the GPU estimate:
parameters + gradients + two Adam moments (16 bytes per parameter) plus the activations saved
for backward (``estimate_activation_bytes``), in fp32 and under bf16 autocast.

The throughput model defaults to a CPU-sized network (width 0.25, crop 64 x 48 x 48 at 2 mm);
the default width at the default crop takes tens of seconds per step on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vertstudy.bench import format_figures, prepared_phantoms, work_folder
from vertstudy.config import Config

_MB = 1024.0**2
_GB = 1024.0**3


# -- building blocks -------------------------------------------------------------------------
def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul FLOP/s: best of ``repeats`` timed ``n x n @ n x n`` (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def make_step(model: torch.nn.Module, cfg: Config) -> Callable[[dict], float]:
    """A full training step on one batch (forward, loss, backward, Adam) as the trainer runs it,
    in the precision ``train.amp`` resolves to on the CPU; returns the loss."""
    from vertstudy.losses import total_loss
    from vertstudy.train.trainer import _float32, autocast, make_optimizer, training_precision

    optimizer = make_optimizer(model, cfg.train)
    model.train()
    cpu = torch.device("cpu")
    precision = training_precision(cpu, cfg.train.amp)

    def step(batch: dict) -> float:
        with autocast(cpu, precision):
            out = model(batch["image"])
        loss = total_loss(_float32(out), batch, cfg.loss, cfg.model)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def step_flops(model: torch.nn.Module, cfg: Config, batch: dict) -> int:
    """FLOPs of forward + backward of one batch (FlopCounterMode; convolutions, matmuls, ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vertstudy.losses import total_loss

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(batch["image"])
        total_loss(out, batch, cfg.loss, cfg.model)["total"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _timed_loader_steps(loader_iter, step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step(next(loader_iter))
    return time.perf_counter() - t0


def _timed_memory_steps(batches: list[dict], step) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - t0


def _endless(loader, dataset):
    """Batches of ``loader`` over successive epochs."""
    epoch = 0
    while True:
        epoch += 1
        dataset.set_epoch(epoch)
        yield from loader


# -- memory at the default configuration (fresh subprocess) ----------------------------------
_MEMORY_SCRIPT = r"""
import json, resource, sys
import torch
from vertstudy.config import Config
from vertstudy.losses import total_loss
from vertstudy.model.network import build_model, estimate_activation_bytes

cfg = Config.model_validate_json(sys.argv[1])
shape = (cfg.train.batch_size, 1, *cfg.data.crop.crop_size)
torch.manual_seed(0)
model = build_model(cfg.model)
opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
batch = {"image": torch.randn(shape), "present": torch.ones(shape[0], 26),
         "coords": torch.rand(shape[0], 26, 3) * torch.tensor(cfg.data.crop.crop_size, dtype=torch.float32)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = total_loss(model(batch["image"]), batch, cfg.loss, cfg.model)["total"]
loss.backward()
opt.step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del loss
params = sum(p.numel() for p in model.parameters())
act32 = estimate_activation_bytes(model, shape)
act16 = estimate_activation_bytes(model, shape, autocast_dtype=torch.bfloat16)
print(json.dumps({"before_kb": before, "after_kb": after, "params": params, "act_fp32": act32, "act_bf16": act16}))
"""


def default_step_memory(cfg: Config | None = None) -> dict:
    """Peak RSS of one CPU training step and the GPU memory estimate, at ``cfg`` (default: defaults).

    Runs in a fresh subprocess so the peak is not hidden by this process's earlier peaks.
    """
    cfg = cfg or Config()
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, cfg.model_dump_json()], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    states = 16.0 * m["params"]  # fp32 params, grads, Adam exp_avg and exp_avg_sq
    return {
        "memory_config": f"width {cfg.model.width:g}, crop {'x'.join(map(str, cfg.data.crop.crop_size))}, "
        f"batch {cfg.train.batch_size}",
        "memory_params": int(m["params"]),
        "cpu_step_peak_rss_increase_mb": (m["after_kb"] - m["before_kb"]) / 1024.0,
        "cpu_step_peak_rss_mb": m["after_kb"] / 1024.0,
        "gpu_params_grads_adam_mb": states / _MB,
        "gpu_activations_fp32_gb": m["act_fp32"] / _GB,
        "gpu_activations_bf16_gb": m["act_bf16"] / _GB,
        "gpu_estimate_fp32_gb": (states + m["act_fp32"]) / _GB,
        "gpu_estimate_bf16_gb": (states + m["act_bf16"]) / _GB,
    }


# -- the benchmark ---------------------------------------------------------------------------
def bench_config(
    width: float, crop_size: tuple[int, int, int], spacing_mm: float, batch_size: int, workers: int, seed: int,
    overrides: dict | None = None,
) -> Config:
    """The throughput configuration: paper defaults but for width, crop, spacing, batch and workers,
    then ``overrides`` (dotted field names, e.g. ``{"model.lstm_hidden": 128}``), validated."""
    from vertstudy.config import load_config

    return load_config(
        {
            "model.width": width,
            "data.prep.spacing_mm": spacing_mm,
            "data.crop.crop_size": crop_size,
            "train.batch_size": batch_size,
            "train.workers": workers,
            "seed": seed,
            **(overrides or {}),
        },
        where="bench train --set",
    )


def bench_train(
    width: float = 0.25,
    crop_size: tuple[int, int, int] = (64, 48, 48),
    spacing_mm: float = 2.0,
    batch_size: int = 2,
    workers: int = 1,
    threads: int | None = 1,
    steps: int = 16,
    warmup: int = 3,
    rounds: int = 2,
    cases: int = 4,
    memory: bool = True,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
    overrides: dict | None = None,
    precisions: tuple[str, ...] = (),
) -> dict:
    """Measure training throughput, FLOPs and memory; returns the figures (names carry units).

    ``steps`` timed steps per path, split into ``rounds`` alternating blocks; ``memory=False``
    skips the default-size memory subprocess (tens of seconds and ~4 GB of RAM). ``threads``:
    torch intra-op threads of the training process during the run (None: leave torch's
    default); the default 1 leaves the second of two cores to the one loader worker, and
    avoids the collapse of OpenMP's spinning threads when other processes share the cores.
    ``overrides``: further config fields of the measured network (``{"model.lstm_hidden": 128}``).
    ``precisions`` (``("fp32", "bf16")``): also time the in-memory steps of the same network
    (same initial weights, same batches) in each precision, their rounds alternating with the
    loader and in-memory rounds above: ``model_crops_per_s_<precision>`` and
    ``bf16_to_fp32_speed``. The other figures are for ``train.amp`` as configured (default
    ``auto``: bf16 where the CPU has it natively); ``precision`` says which that was.
    """
    from vertstudy.memory import reuse_freed_memory

    reuse_freed_memory()  # as the trainer does
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_train(
            width,
            crop_size,
            spacing_mm,
            batch_size,
            workers,
            steps,
            warmup,
            rounds,
            cases,
            memory,
            seed,
            workdir,
            progress,
            overrides,
            precisions,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _bench_train(
    width, crop_size, spacing_mm, batch_size, workers, steps, warmup, rounds, cases, memory, seed, workdir, progress,
    overrides, precisions,
) -> dict:
    from vertstudy.data.crops import CropDataset, make_loader
    from vertstudy.model.network import build_model
    from vertstudy.train.trainer import cpu_has_native_bf16, training_precision

    with work_folder(workdir, "vertstudy-bench-train-") as work:
        cfg = bench_config(width, crop_size, spacing_mm, batch_size, workers, seed, overrides)
        cached = prepared_phantoms(work, cases, seed, spacing_mm, progress)
        dataset = CropDataset(cached, cfg.data.crop, cfg.data.augment, seed=seed, train=True)
        loader = make_loader(dataset, batch_size, workers, drop_last=True)
        batches = _endless(loader, dataset)

        torch.manual_seed(seed)
        model = build_model(cfg.model)
        step = make_step(model, cfg)
        per_round = max(1, steps // rounds)
        memory_batches = [next(batches) for _ in range(per_round)]
        for batch in memory_batches[:warmup]:
            step(batch)
        for _ in range(warmup):
            step(next(batches))
        side = {}  # the same network in each of ``precisions``, same initial weights
        for name in precisions:
            amp = {"fp32": "off", "bf16": "always"}[name]
            side_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": amp})})
            torch.manual_seed(seed)
            side[name] = make_step(build_model(side_cfg.model), side_cfg)
            for batch in memory_batches[:warmup]:
                side[name](batch)

        t_loader = t_model = 0.0
        t_side = dict.fromkeys(side, 0.0)
        for _ in range(rounds):
            t_loader += _timed_loader_steps(batches, step, per_round)
            t_model += _timed_memory_steps(memory_batches, step)
            for name, side_step in side.items():
                t_side[name] += _timed_memory_steps(memory_batches, side_step)
        t0 = time.perf_counter()
        for _ in range(per_round * rounds):
            next(batches)
        t_loader_only = time.perf_counter() - t0

        crops = per_round * rounds * batch_size
        flops = step_flops(model, cfg, memory_batches[0])
        matmul = matmul_flops_per_s()
        achieved = flops * per_round * rounds / t_model
        figures = {
            "throughput_config": f"width {width:g}, crop {'x'.join(map(str, crop_size))} at {spacing_mm:g} mm, "
            f"batch {batch_size}, augmentation on" + "".join(f", {k}={v}" for k, v in (overrides or {}).items()),
            "params": sum(p.numel() for p in model.parameters()),
            "precision": training_precision(torch.device("cpu"), cfg.train.amp),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
            "timed_steps_per_path": per_round * rounds,
            "loader_crops_per_s": crops / t_loader,
            "model_crops_per_s": crops / t_model,
            "loader_to_model_ratio": t_model / t_loader,
            "loader_only_crops_per_s": crops / t_loader_only,
            "flops_per_step_gflop": flops / 1e9,
            "achieved_gflop_per_s": achieved / 1e9,
            "matmul_fp32_gflop_per_s": matmul / 1e9,
            "achieved_to_matmul_fraction": achieved / matmul,
            "load_avg_1min": os.getloadavg()[0],
        }
        for name, t in t_side.items():
            figures[f"model_crops_per_s_{name}"] = crops / t
        if {"fp32", "bf16"} <= set(t_side):
            figures["bf16_to_fp32_speed"] = t_side["fp32"] / t_side["bf16"]
        del batches, loader  # stop the workers before the memory subprocess
        if memory:
            figures.update(default_step_memory())
        return figures


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench train", figures)
