"""``vertstudy bench report``: how long a report of a real N-trial study takes to build, and its size.

A real study first: ``trials`` trials of a random search (seed 0) over the balance factor B,
the regression weight lambda, the learning rate, the LR schedule kind and the crop size, at
smoke scale (the ``--smoke`` network on 6 coarse phantoms at 8 mm, 2 held-out cases), ``epochs``
epochs each, ``concurrency`` at once, no scheduler, W&B disabled, on a local Ray cluster
started here (its start is not timed). Then the report of that study is built ``builds``
times into fresh folders.

Figures: ``study_s`` (wall time of the study), ``report_build_s`` (median build), its min and
max, ``report_bytes`` (the whole report folder), ``report_html_bytes``, ``figures`` (PNGs),
``trials`` and ``trials_completed``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from vertstudy.bench import format_figures, local_ray, smoke_study, work_folder

#: the report benchmark's search space: the parameters the issue names
SPACE = {
    "loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0},
    "loss.reg_lambda": {"type": "logfloat", "low": 0.1, "high": 1.0},
    "train.lr": {"type": "logfloat", "low": 1.0e-3, "high": 1.0e-2},
    "train.schedule.kind": {"type": "choice", "values": ["plateau", "cosine", "step"]},
    "data.crop.crop_size": {"type": "choice", "values": [[16, 16, 16], [24, 16, 16]]},
}


def bench_report(trials: int = 50, concurrency: int = 2, epochs: int = 2, builds: int = 3,
                 workdir: Path | None = None, progress: bool = True) -> dict:
    """Figures of the module docstring (names carry units)."""
    from vertstudy.report import build_report
    from vertstudy.study.runner import run_study

    with work_folder(workdir, "vs-bench-", "/tmp") as work:
        spec = smoke_study(work / "st", f"bench-report-{time.strftime('%H%M%S')}", "bench report", trials=trials,
                           epochs=epochs, concurrency=concurrency, space=SPACE, test_cases=2)
        with local_ray(work, concurrency):
            t0 = time.perf_counter()
            result = run_study(spec, progress=progress)
            study_s = time.perf_counter() - t0
        times, built = [], None
        for i in range(builds):
            t0 = time.perf_counter()
            built = build_report([result.study_dir], work / "reports" / f"build-{i}", date="2025-01-01")
            times.append(time.perf_counter() - t0)
        return {
            "trials": trials,
            "trials_completed": result.counts.get("completed", 0),
            "study_s": study_s,
            "report_build_s": statistics.median(times),
            "report_build_min_s": min(times),
            "report_build_max_s": max(times),
            "report_bytes": built.bytes,
            "report_html_bytes": built.html_bytes,
            "figures": built.figures,
        }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench report", figures)
