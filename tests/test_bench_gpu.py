"""``vertstudy bench gpu`` (``python -m vertstudy.bench.gpu``): it runs on the CPU at a tiny size,
its figures are there, a failing section does not stop the others, its tiling is the project's,
and nothing on its path imports what a bare GPU machine lacks (Ray, SimpleITK, Optuna, W&B,
pyarrow) or anything beyond torch, numpy, scikit-learn, pandas, pydantic and their requirements."""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vertstudy.bench import gpu

REPO = Path(__file__).resolve().parents[1]

#: a tiny run: width 0.125, 16^3 crops, one timed step, no warm-up, a 40 x 24 x 24 volume (16 tiles)
TINY = ["--device", "cpu", "--width", "0.125", "--crop", "16", "16", "16", "--batch", "1", "--steps", "1",
        "--warmup", "0", "--infer-batches", "1", "2", "--volume", "40", "24", "24", "--threads", "1"]

#: what the GPU machine has besides the standard library (pydantic travels as wheels)
ALLOWED_DISTRIBUTIONS = ("torch", "numpy", "scikit-learn", "pandas", "pydantic")


def _figures_ok(figures: dict, precisions=("fp32", "bf16"), batches=(1, 2)) -> None:
    numbers = ["params", "train_step_gflop", "infer_crop_gflop", "label_tiles", "label_tiles_with_body"]
    for p in precisions:
        numbers += [f"train_{p}_{k}" for k in ("crops_per_s", "ms_per_step", "estimate_gib", "tflop_per_s")]
        numbers += [f"infer_{p}_b{b}_{k}" for b in batches for k in ("crops_per_s", "tflop_per_s")]
        numbers += [f"label_{p}_{k}" for k in ("s", "tiles_run", "tiles_per_s")]
    for key in numbers:
        assert key in figures, f"{key} missing from {sorted(figures)}"
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    for p in precisions:  # the CPU's memory measure: a peak-RSS increase, >= 0
        for key in (f"train_{p}_peak_rss_increase_gib", f"label_{p}_peak_rss_increase_gib"):
            assert math.isfinite(figures[key]) and figures[key] >= 0, (key, figures[key])
        assert figures[f"label_{p}_tiles_run"] == figures["label_tiles_with_body"]
    assert figures["label_tiles"] == 16 and figures["device"] == "cpu"


def test_module_runs_on_cpu_and_prints_its_figures_as_json():
    run = subprocess.run([sys.executable, "-m", "vertstudy.bench.gpu", *TINY, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["failed_sections"] == "none", figures
    _figures_ok(figures)
    assert "[bench gpu] label_bf16 done" in run.stderr  # progress goes to stderr, the JSON alone to stdout


def _allowed_modules() -> set[str]:
    """Top-level module names of the allowed distributions and everything they require (extras
    left out), as installed here."""
    dists, todo = set(), list(ALLOWED_DISTRIBUTIONS)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in dists:
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        dists.add(name)
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in requires if "extra ==" not in r]
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if any(re.sub(r"[-_.]+", "-", o).lower() in dists for o in owners)}


_HYGIENE_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    FORBIDDEN = {forbidden!r}
    INSTALLED = {installed!r}  # what a bare GPU machine has: the allowed distributions' modules
    attempted = []

    class BareMachine(importlib.abc.MetaPathFinder):
        # as on a bare GPU machine: only the standard library, vertstudy and the allowed
        # distributions are installed; anything else (Ray, W&B, ... and whatever else this
        # machine happens to have, such as colorama) is not found, exactly as when it is absent
        # (importlib.util.find_spec answers None, import raises ModuleNotFoundError)
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if not (top in INSTALLED or top in sys.stdlib_module_names or top.startswith("_")):
                attempted.append(top)
                return None
            for finder in self.finders:
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
            return None

        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [BareMachine(list(sys.meta_path))]
    import numpy, pydantic, torch
    import vertstudy.bench.gpu as gpu

    rc = gpu.main({argv!r})
    loaded = {{m.split(".")[0] for m in sys.modules}}
    print(json.dumps({{"rc": rc, "loaded": sorted(loaded), "forbidden": sorted(set(attempted) & set(FORBIDDEN))}}))
""")


def test_nothing_on_its_path_imports_what_a_bare_gpu_machine_lacks():
    """A real measurement with nothing importable but the standard library, vertstudy, and
    torch/numpy/scikit-learn/pandas/pydantic with their own requirements, as on a bare GPU machine:
    the run must succeed, and it must not even try Ray, SimpleITK, Optuna, W&B or pyarrow. Fails when
    someone adds another import on this path (in vertstudy.config, losses, model, anatomy or this
    module). Optional imports a library guards itself (torch's colorama) are blocked like the rest,
    so whether this machine happens to have them installed does not matter."""
    installed = sorted(_allowed_modules() | {"vertstudy"})
    script = _HYGIENE_SCRIPT.format(forbidden=gpu.FORBIDDEN_IMPORTS, installed=installed,
                                    argv=[*TINY, "--precisions", "fp32", "--json", "--quiet"])
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    result, figures = json.loads(lines[-1]), json.loads(lines[-2])
    assert result["rc"] == 0 and figures["failed_sections"] == "none", figures
    _figures_ok(figures, precisions=("fp32",))
    assert result["forbidden"] == [], f"the bench gpu path tries to import {result['forbidden']}"
    assert "vertstudy" in result["loaded"] and "torch" in result["loaded"]


def test_module_level_imports_no_torch():
    """The CLI adds these options while building its parser: that must not load torch."""
    code = ("import argparse, sys; import vertstudy.bench.gpu as g; g.add_arguments(argparse.ArgumentParser()); "
            "print(sorted(m for m in ('torch', 'numpy', 'pydantic') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_a_failing_section_is_reported_and_the_rest_still_runs(monkeypatch, one_torch_thread):
    def no_bf16(device):
        raise RuntimeError("bf16 is not supported on this test's device")

    monkeypatch.setattr(gpu, "_check_bf16", no_bf16)
    figures = gpu.bench_gpu(device="cpu", width=0.125, crop=(16, 16, 16), batch=1, steps=1, warmup=0,
                            infer_batches=(1,), volume=(24, 16, 16), progress=False)
    assert figures["failed_sections"] == "train_bf16,infer_bf16,label_bf16"
    assert figures["train_bf16_error"] == "RuntimeError: bf16 is not supported on this test's device"
    assert "train_bf16_crops_per_s" not in figures
    for key in ("train_fp32_crops_per_s", "infer_fp32_b1_crops_per_s", "label_fp32_s"):
        assert figures[key] > 0


def test_cli_runs_it(capsys, one_torch_thread):
    from vertstudy.cli import main

    assert main(["bench", "gpu", *TINY, "--precisions", "fp32", "--infer-batches", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["failed_sections"] == "none" and figures["train_fp32_crops_per_s"] > 0


@pytest.mark.parametrize(
    "shape, crop, stride",
    [((379, 221, 221), (104, 80, 80), (52, 40, 40)), ((40, 24, 24), (16, 16, 16), (8, 8, 8)),
     ((50, 10, 33), (16, 16, 16), (16, 5, 7)), ((104, 80, 81), (104, 80, 80), (52, 40, 40))],
)
def test_tiling_is_the_projects(shape, crop, stride):
    """The copy (vertstudy.infer imports SimpleITK) gives the project's tiles, crops and body rule."""
    from vertstudy.data.crops import extract_crop
    from vertstudy.infer.tiling import has_body, tile_origins

    ours = gpu.tile_origins(shape, crop, stride)
    assert np.array_equal(ours, tile_origins(shape, crop, stride)) and ours.dtype == np.int64
    volume = gpu.synthetic_volume(shape)
    for origin in ours[:: max(1, len(ours) // 7)]:
        a, b = gpu.extract_crop(volume, origin, crop, -1.0), extract_crop(volume, origin, crop, -1.0)
        assert np.array_equal(a, b)
        assert gpu.has_body(a, -1.0) == has_body(a, -1.0, 0.02)


def test_default_volume_is_like_the_clinical_phantom():
    """379 x 221 x 221 at 2 mm (the clinical phantom's canonical volume): 175 tiles, 154 with body."""
    volume = gpu.synthetic_volume(gpu.PHANTOM_2MM_ZYX)
    origins = gpu.tile_origins(volume.shape, (104, 80, 80), (52, 40, 40))
    body = sum(gpu.has_body(gpu.extract_crop(volume, o, (104, 80, 80), -1.0), -1.0) for o in origins)
    assert (len(origins), body) == (175, 154)


def test_cli_exits_non_zero_when_a_section_failed(monkeypatch, capsys, one_torch_thread):
    from vertstudy.cli import main

    def no_bf16(device):
        raise RuntimeError("bf16 is not supported on this test's device")

    monkeypatch.setattr(gpu, "_check_bf16", no_bf16)
    assert main(["bench", "gpu", *TINY, "--precisions", "fp32", "bf16", "--infer-batches", "1", "--json"]) == 1
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "train_bf16" in figures["failed_sections"] and figures["train_fp32_crops_per_s"] > 0
