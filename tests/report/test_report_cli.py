"""``vertstudy report`` with bad inputs, in a subprocess: exit code 2, one line on stderr that
names the path, no traceback, and nothing written at --out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vertstudy.cli", "report", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def one_line(run_: subprocess.CompletedProcess, *must: str) -> None:
    assert run_.returncode == 2, run_.stderr
    assert "Traceback" not in run_.stderr
    lines = [ln for ln in run_.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run_.stderr
    for text in must:
        assert text in lines[0], (text, lines[0])


def nothing_at(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_study_directory(tmp_path):
    out = tmp_path / "rep"
    one_line(run(str(tmp_path / "no-such-study"), "--out", str(out), cwd=tmp_path), "no-such-study",
             "no such study directory")
    nothing_at(out)


def test_directory_without_tables(tmp_path):
    (tmp_path / "not-a-study").mkdir()
    out = tmp_path / "rep"
    one_line(run(str(tmp_path / "not-a-study"), "--out", str(out), cwd=tmp_path), "not-a-study",
             "no trials.parquet")
    nothing_at(out)


@pytest.mark.slow
def test_unwritable_out_and_a_folder_that_is_not_a_report(study_dirs, tmp_path):
    (tmp_path / "plain-file").write_text("x", encoding="utf-8")
    out = tmp_path / "plain-file" / "rep"
    one_line(run(str(study_dirs["err"]), "--out", str(out), cwd=tmp_path), str(out), "cannot write")
    nothing_at(out)
    keep = tmp_path / "my-data"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me", encoding="utf-8")
    one_line(run(str(study_dirs["err"]), "--out", str(keep), cwd=tmp_path), str(keep), "not a vertstudy report")
    assert (keep / "precious.txt").read_text(encoding="utf-8") == "keep me" and len(list(keep.iterdir())) == 1
