"""One real local Ray cluster per test module, a short storage directory, and tiny study files.

Ray's socket paths must be short, so the cluster and the storage live under ``/tmp/vs-*``
rather than pytest's ``tmp_path``. Every study here is CPU-sized (the ``--smoke`` settings):
5 coarse phantoms at 8 mm, a width-0.125 network on 16^3 crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.paths import short_tmp
from vertstudy.study.spec import SMOKE_CONFIG, StudySpec, validate_spec


@pytest.fixture(scope="module")
def short_dir():
    with short_tmp("vs-") as path:
        yield path


@pytest.fixture(scope="module")
def ray_cluster(short_dir):
    """A real 2-CPU local Ray cluster shared by the module; yields its address."""
    import ray

    from vertstudy.study.compat import init_local_ray

    init_local_ray(2, short_dir / "ray", object_store_mb=150)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def storage(short_dir) -> Path:
    """Results of every study of the module (phantoms and cache are shared between them)."""
    path = short_dir / "st"
    path.mkdir()
    return path


def tiny_study(name: str, store: Path, **fields: Any) -> dict[str, Any]:
    """A valid study dict: Optuna TPE over B, 2 trials 2 at a time, 2 epochs, no scheduler, W&B
    disabled: W&B offline costs each study driver its W&B import and service start (about a
    second), so the tests that check what W&B records ask for it with ``wandb={"mode": "offline"}``
    (``test_tracking``, the fault drill, the multi-node drill; the quickstart smoke test keeps
    the file's offline)."""
    config = {**SMOKE_CONFIG, **fields.pop("config", {})}
    study = {
        "name": name,
        "data": {"phantoms": {"count": 5, "seed": 0}, "split": {"val": 1, "test": 1}},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "space": {"loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0}},
        "search": {"algorithm": "optuna-tpe"},
        "scheduler": {"kind": "none"},
        "num_samples": 2,
        "concurrency": 2,
        "storage": str(store),
        "wandb": {"mode": "disabled"},
    }
    study.update(fields)
    return study


def tiny_spec(name: str, store: Path, **fields: Any) -> StudySpec:
    return validate_spec(tiny_study(name, store, **fields), name)
