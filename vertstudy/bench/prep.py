"""``vertstudy bench prep``: preprocessing throughput on one and two processes, and a cached rerun.

Realistic-size phantoms (default 512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm) are written
once (not timed). Then, side by side in one run: a cold ``prepare`` on one process into a
fresh cache, a cold ``prepare`` on two processes into another fresh cache, and a rerun on
the first (warm) cache, which must preprocess nothing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vertstudy.bench import format_figures, work_folder
from vertstudy.config import PrepConfig
from vertstudy.data.prepare import prepare_dataset


def _read_all(root: Path) -> None:
    """Read every file once so both cold runs start with the same page cache."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 22):
                    pass


def bench_prep(
    cases: int = 4,
    size_xyz: tuple[int, int, int] = (512, 512, 300),
    spacing_xyz: tuple[float, float, float] = (0.8, 0.8, 1.5),
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Measure preprocessing throughput; returns the figures (names carry units)."""
    from vertstudy.data.phantom import PhantomConfig, write_phantoms

    with work_folder(workdir, "vertstudy-bench-prep-") as work:
        data = work / "phantoms"
        config = PhantomConfig.fixed_grid(size_xyz=size_xyz, spacing_xyz=spacing_xyz)
        if not data.exists():
            write_phantoms(data, cases=cases, seed=seed, fmt="csi2014", config=config, workers=2, progress=progress)
        _read_all(data)
        prep = PrepConfig()
        timings = {}
        runs = (("cold_1proc", "cache-1", 1), ("cold_2proc", "cache-2", 2), ("warm", "cache-1", 1))
        for name, cache, workers in runs:
            if name.startswith("cold"):
                shutil.rmtree(work / cache, ignore_errors=True)
            t0 = time.perf_counter()
            result = prepare_dataset(data, work / cache, prep=prep, workers=workers, progress=progress)
            timings[name] = time.perf_counter() - t0
            if name == "warm" and result.hits != len(result.cases):
                raise RuntimeError(f"warm run preprocessed {len(result.cases) - result.hits} cases; expected none")
        n = len(result.cases)
        return {
            "cases": n,
            "image_size_xyz": "x".join(str(s) for s in size_xyz),
            "image_spacing_xyz_mm": "x".join(f"{s:g}" for s in spacing_xyz),
            "prep_1proc_cases_per_s": n / timings["cold_1proc"],
            "prep_2proc_cases_per_s": n / timings["cold_2proc"],
            "prep_2proc_speedup": timings["cold_1proc"] / timings["cold_2proc"],
            "prep_cold_1proc_s": timings["cold_1proc"],
            "prep_warm_s": timings["warm"],
            "prep_warm_to_cold_ratio": timings["warm"] / timings["cold_1proc"],
        }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench prep", figures)
