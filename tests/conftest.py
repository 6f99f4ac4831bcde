"""Fixtures shared across the test packages."""

from __future__ import annotations

import pytest
import torch

from tests.servers import postgres, s3_server  # noqa: F401 (session fixtures: real S3 and PostgreSQL servers)


@pytest.fixture(autouse=True, scope="session")
def driver_environment():
    """The test session is a process entry point: it sets what the CLI's main sets for Tune."""
    import os

    from vertstudy.study.compat import driver_environment

    os.environ.update(driver_environment(os.environ))
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: runs are bit-reproducible, and on a shared 2-core
    machine tiny tensors run faster than with two oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
