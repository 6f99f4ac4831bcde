"""Real small studies for the report tests, run once per session on one real local Ray cluster.

Three tiny studies (the ``--smoke`` network on 5 coarse phantoms at 8 mm, 2 held-out cases, W&B
off), 13 trials in all, about two minutes on 2 cores:

- ``abl``: grid ``model.loc_head`` (integral, fc) x ``model.tasks`` (loc, loc+cls), 2 seeds: 8
  trials, so Table I (localization-only heads) and Table III (tasks) have seed spreads;
- ``cls``: grid ``model.classifier`` (bilstm, none-lstm) x ``train.lr`` (0.01, 1e30): the two
  trials at the default lr 0.01 pool with ``abl``'s integral loc+cls trials in Table II (same
  configuration apart from the classifier and seed); the two at 1e30 diverge;
- ``err``: one trial whose fault drill fails it with no retry left: an ``error`` trial.

Ray's socket paths must be short, so everything lives under ``/tmp/vs-*`` (kept with VS_KEEP=1).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.study.conftest import tiny_study
from vertstudy.study.spec import validate_spec

STUDY_NAMES = ("abl", "cls", "err")
REPORT_DATE = "2025-01-31"


def fixture_specs(store: Path) -> list:
    """The three study specs of the module docstring, writing into ``store``."""
    base = {"data": {"phantoms": {"count": 5, "seed": 0}, "split": {"val": 1, "test": 2}},
            "wandb": {"mode": "disabled"}, "search": {"algorithm": "grid"}, "num_samples": 1}

    def choice(*values):
        return {"type": "choice", "values": list(values)}

    studies = [
        tiny_study("abl", store, **base, repeats=2,
                   space={"model.loc_head": choice("integral", "fc"), "model.tasks": choice("loc", "loc+cls")}),
        tiny_study("cls", store, **base,
                   space={"model.classifier": choice("bilstm", "none-lstm"), "train.lr": choice(0.01, 1.0e30)}),
        tiny_study("err", store, **base, space={"train.lr": choice(0.003)}, max_retries=0,
                   inject_failure_at_epoch=1),
    ]
    return [validate_spec(s, s["name"]) for s in studies]


def run_fixture_studies(store: Path, ray_dir: Path) -> dict[str, Path]:
    """Run the fixture studies on a fresh 2-CPU local Ray cluster; ``{name: study dir}``."""
    import ray

    from vertstudy.study.compat import init_local_ray
    from vertstudy.study.runner import run_study

    init_local_ray(2, ray_dir, object_store_mb=150)
    try:
        return {spec.name: Path(run_study(spec, progress=False).study_dir) for spec in fixture_specs(store)}
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def study_dirs() -> dict[str, Path]:
    """``{name: study dir}`` of the three fixture studies (run once per test session; with
    VS_REPORT_STUDIES=<storage> the studies already run there are used instead)."""
    reuse = os.environ.get("VS_REPORT_STUDIES")
    if reuse:
        yield {name: Path(reuse) / name for name in STUDY_NAMES}
        return
    short = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
    store = short / "st"
    store.mkdir()
    try:
        yield run_fixture_studies(store, short / "ray")
    finally:
        if not os.environ.get("VS_KEEP"):
            shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="session")
def report_dir(study_dirs, tmp_path_factory) -> Path:
    """The report of the three fixture studies (built once)."""
    from vertstudy.report import build_report

    out = tmp_path_factory.mktemp("report") / "all"
    build_report([str(d) for d in study_dirs.values()], out, date=REPORT_DATE)
    return out


@pytest.fixture(scope="session")
def report_json(report_dir) -> dict:
    import json

    return json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
