"""The allocator setting for large tensors: freed memory is reused without page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, resource, sys
import torch
from vertstudy.memory import reuse_freed_memory
on = reuse_freed_memory()
def faults_of_one_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4)  # 64 MB, above glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_pass()
print(json.dumps({"on": on, "faults": min(faults_of_one_pass() for _ in range(3))}))
"""


def _run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VERTSTUDY_MALLOC"}
    if env_value is not None:
        env["VERTSTUDY_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_tensor_is_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    reused, system = _run(None), _run("system")
    assert reused["on"] is True and system["on"] is False
    assert system["faults"] > pages // 2  # each pass maps and faults the 64 MB in again
    assert reused["faults"] < pages // 20  # the heap keeps it
