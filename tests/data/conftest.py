"""Shared fixtures of the data tests: real cache entries written without the readers or the phantom."""

from __future__ import annotations

from pathlib import Path

import pytest

from vertstudy.config import PrepConfig
from vertstudy.data.cache import CachedCase, write_entry
from vertstudy.data.case import Case


def write_cache_entry(case: Case, folder: Path, prep: PrepConfig | None = None) -> CachedCase:
    """Preprocess ``case`` into the entry folder ``folder`` exactly as the cache does; returns the entry."""
    folder = Path(folder)
    return write_entry(folder, folder.name, case, prep or PrepConfig())


@pytest.fixture(scope="session")
def cache_entry_writer():
    """The :func:`write_cache_entry` helper, as a fixture (conftest modules are not imported by tests)."""
    return write_cache_entry
