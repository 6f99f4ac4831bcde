"""The command line: --help everywhere, user errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from vertstudy.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


ALL_COMMANDS = list(_commands(build_parser()))


def test_every_command_is_listed():
    assert ("data", "phantom") in ALL_COMMANDS and ("data", "prepare") in ALL_COMMANDS
    assert ("data", "show") in ALL_COMMANDS and ("bench", "prep") in ALL_COMMANDS
    assert ("predict",) in ALL_COMMANDS
    assert {("bench", b) for b in ("train", "learn", "infer")} <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "vertstudy")
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vertstudy") and len(out.splitlines()) > 3


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vertstudy.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, names",
    [
        (("data", "show", "/no/such/ct.nii.gz", "--out", "x.png"), "/no/such/ct.nii.gz"),
        (("data", "prepare", "--root", "/no/such/folder", "--cache", "c"), "/no/such/folder"),
        (("data", "phantom", "--out", "p", "--cases", "0"), "--cases"),
        (("data", "prepare", "--root", ".", "--cache", "c", "--format", "dicomz"), "--format"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, names, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "vertstudy.cli", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    error_lines = [ln for ln in run.stderr.splitlines() if "error" in ln]
    assert len(error_lines) == 1 and names in error_lines[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "c").exists()
