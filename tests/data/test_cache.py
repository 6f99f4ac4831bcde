"""The content-addressed preprocessing cache and `data prepare`: hits, races, bad cases, index."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.synth import blob_image, write_generic_case
from vertstudy.config import PrepConfig
from vertstudy.data.cache import cache_key, entry_dir, get_or_prepare, load_entry
from vertstudy.data.formats import discover
from vertstudy.data.prepare import prepare_dataset
from vertstudy.errors import InputError

POINTS = {"L1": (-5.0, 30.0, 300.0), "L2": (-3.0, 32.0, 270.0)}


def _write_dataset(root: Path, n: int = 3, size=(40, 36, 48)) -> None:
    for i in range(n):
        image = blob_image(size_xyz=size, origin_xyz=(-31.0, 12.5, 240.0 + i), points_mm=list(POINTS.values()))
        pts = {k: (x, y, z + i) for k, (x, y, z) in POINTS.items()}
        write_generic_case(root, f"case{i}", image, pts)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "cases").glob("*/*") if p.is_dir())


def test_second_run_preprocesses_nothing(tmp_path):
    _write_dataset(tmp_path / "data")
    first = prepare_dataset(tmp_path / "data", tmp_path / "cache", progress=False)
    assert len(first.cases) == 3 and first.hits == 0 and not first.skipped
    stamps = {p: (p / "volume.npy").stat().st_mtime_ns for p in _entries(tmp_path / "cache")}
    second = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=2, progress=False)
    assert second.hits == 3
    assert {p: (p / "volume.npy").stat().st_mtime_ns for p in _entries(tmp_path / "cache")} == stamps
    assert [c.key for c in second.cases] == [c.key for c in first.cases]
    np.testing.assert_array_equal(first.class_counts()[[19, 20]], [3, 3])


def test_entry_contents(tmp_path):
    _write_dataset(tmp_path / "data", n=1)
    (ref,) = discover(tmp_path / "data")
    entry, hit = get_or_prepare(ref, tmp_path / "cache", PrepConfig())
    assert not hit
    vol = entry.volume()
    assert vol.dtype == np.float16 and vol.shape == entry.geometry.shape_zyx
    assert entry.labels == ["L1", "L2"]
    assert np.allclose(entry.geometry.canonical_to_physical(entry.zyx_vox), list(POINTS.values()), atol=1e-6)
    # the centroid voxels are the bright blobs
    for zyx in entry.zyx_vox:
        assert vol[tuple(np.round(zyx).astype(int))] > 2.0


def test_key_follows_content_and_parameters(tmp_path):
    _write_dataset(tmp_path / "data", n=1)
    (ref,) = discover(tmp_path / "data")
    sources = [ref.image, ref.landmarks]
    k = cache_key(ref.case_id, ref.fmt, sources, PrepConfig(), tmp_path / "cache")
    assert cache_key(ref.case_id, ref.fmt, sources, PrepConfig(spacing_mm=3.0), tmp_path / "cache") != k
    os.utime(ref.image, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
    assert cache_key(ref.case_id, ref.fmt, sources, PrepConfig(), tmp_path / "cache") == k
    ref.landmarks.write_text(ref.landmarks.read_text(encoding="utf-8").replace("300.0", "301.0"))
    assert cache_key(ref.case_id, ref.fmt, sources, PrepConfig(), tmp_path / "cache") != k


def _race(ref, cache, barrier, queue):
    barrier.wait()
    entry, hit = get_or_prepare(ref, cache, PrepConfig(spacing_mm=1.0))
    queue.put((hit, str(entry.path), time.monotonic()))


def test_two_processes_same_case_do_the_work_once(tmp_path):
    _write_dataset(tmp_path / "data", n=1, size=(160, 150, 140))
    (ref,) = discover(tmp_path / "data")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(ref, tmp_path / "cache", barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(hit for hit, _, _ in results) == [False, True]  # exactly one did the work
    assert len({path for _, path, _ in results}) == 1
    assert len(_entries(tmp_path / "cache")) == 1


def test_bad_case_leaves_nothing_and_the_rest_goes_on(tmp_path):
    _write_dataset(tmp_path / "data", n=2)
    (tmp_path / "data" / "bad.nii.gz").write_bytes(b"this is not an image")
    (tmp_path / "data" / "bad.json").write_text('[{"label": "L1", "x": 0, "y": 0, "z": 0}]')
    result = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=2, progress=False)
    assert [c.case_id for c in result.cases] == ["case0", "case1"]
    assert len(result.skipped) == 1 and result.skipped[0][0] == "bad" and "bad.nii.gz" in result.skipped[0][1]
    assert len(_entries(tmp_path / "cache")) == 2
    assert not list((tmp_path / "cache" / "cases").glob("*/.*"))  # no temporary folders left
    with pytest.raises(InputError, match="bad.nii.gz"):
        prepare_dataset(tmp_path / "data", tmp_path / "cache2", strict=True, progress=False)


def test_load_entry_round_trip(tmp_path):
    _write_dataset(tmp_path / "data", n=1)
    (ref,) = discover(tmp_path / "data")
    entry, _ = get_or_prepare(ref, tmp_path / "cache", PrepConfig())
    again = load_entry(entry_dir(tmp_path / "cache", entry.key))
    assert again.case_id == entry.case_id and again.geometry == entry.geometry
    np.testing.assert_array_equal(again.zyx_vox, entry.zyx_vox)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vertstudy.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=300)  # the summary table draws with box characters


def test_cli_prepare_summary_and_errors(tmp_path):
    _write_dataset(tmp_path / "data", n=2)
    run = _cli("data", "prepare", "--root", str(tmp_path / "data"), "--cache", str(tmp_path / "cache"), "--quiet")
    assert run.returncode == 0, run.stderr
    assert "cases prepared" in run.stdout and "L1:2" in run.stdout
    missing = _cli("data", "prepare", "--root", str(tmp_path / "nope"), "--cache", str(tmp_path / "c"), "--quiet")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr
