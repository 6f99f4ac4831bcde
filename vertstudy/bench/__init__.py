"""``vertstudy bench <what>``: commands that measure the figures the issues ask for.

Each returns a flat dict of figures whose names carry their units; the CLI prints it as a
table or, with ``--json``, as one JSON object. Ratios are measured side by side in one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def format_figures(title: str, figures: dict) -> str:
    """A plain two-column table of ``figures`` under ``title``."""
    width = max(len(k) for k in figures)
    lines = [title, "-" * len(title)]
    for key, value in figures.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


#: the searched parameter of benchmark studies whose trials must all do the same work
B_ONLY = {"loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0}}


def smoke_study(storage: Path, name: str, where: str, *, trials: int, epochs: int, concurrency: int = 2,
                space: dict | None = None, algorithm: str = "random", wandb: str = "disabled", test_cases: int = 1,
                **fields):
    """A validated study of the real network at smoke scale on 6 phantoms (1 validation case,
    ``test_cases`` held out), random search over ``space`` (default: B only), no scheduler, one
    CPU per trial: what the study benchmarks run. ``fields``: further top-level study fields."""
    from vertstudy.study.spec import SMOKE_CONFIG, validate_spec

    config = {**SMOKE_CONFIG, "train.epochs": epochs}
    return validate_spec({
        "name": name,
        "data": {"phantoms": {"count": 6, "seed": 0}, "split": {"val": 1, "test": test_cases}},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "space": space or B_ONLY,
        "search": {"algorithm": algorithm, "seed": 0},
        "scheduler": {"kind": "none"},
        "num_samples": trials,
        "concurrency": concurrency,
        "resources": {"cpus": 1, "gpus": 0},
        "storage": str(storage),
        "wandb": {"mode": wandb},
        **fields,
    }, where)


@contextmanager
def local_ray(work: Path, cpus: int) -> Iterator[float]:
    """A local Ray cluster of ``cpus`` CPUs for one benchmark, under ``work/ray`` (none is started
    when this process is already connected to one); yields its start-up seconds."""
    import ray

    started = ray.is_initialized()
    t0 = time.perf_counter()
    if not started:
        from vertstudy.study.compat import init_local_ray

        init_local_ray(cpus, work / "ray", object_store_mb=200)
    try:
        yield time.perf_counter() - t0
    finally:
        if not started:
            ray.shutdown()


@contextmanager
def work_folder(workdir: Path | None, prefix: str, parent: str | None = None) -> Iterator[Path]:
    """A benchmark's work folder: ``workdir`` when given (kept, so a rerun reuses its phantoms and
    cache), else a new temporary folder named ``prefix...`` under ``parent`` (default: the
    system's), removed at the end whatever happens."""
    import shutil
    import tempfile

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepared_phantoms(work: Path, cases: int, seed: int, spacing_mm: float, progress: bool) -> list:
    """Coarse phantoms under ``work/phantoms`` (written once), prepared into ``work/cache`` at
    ``spacing_mm``: the cached cases, sorted by case id. Not timed by any benchmark."""
    from vertstudy.config import PrepConfig
    from vertstudy.data.phantom import PhantomConfig, write_phantoms
    from vertstudy.data.prepare import prepare_dataset

    if not (work / "phantoms").exists():
        write_phantoms(
            work / "phantoms", cases=cases, seed=seed, config=PhantomConfig.preset("coarse"), workers=2,
            progress=progress,
        )
    result = prepare_dataset(
        work / "phantoms", work / "cache", prep=PrepConfig(spacing_mm=spacing_mm), workers=2, progress=progress
    )
    return sorted(result.cases, key=lambda c: c.case_id)
