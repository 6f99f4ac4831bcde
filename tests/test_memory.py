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
torch.set_num_threads(1)
# a forward pass whose activations (1 x 16 x 96^3 float32 = 56 MB) lie above glibc's largest mmap threshold
net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 16, 3, padding=1),
                          torch.nn.ReLU(), torch.nn.Conv3d(16, 1, 3, padding=1))
x = torch.randn(1, 1, 96, 96, 96)
def faults_of_one_pass():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        net(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_pass()
print(json.dumps({"on": on, "faults": min(faults_of_one_pass() for _ in range(4))}))
"""


def _run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VERTSTUDY_MALLOC"}
    if env_value is not None:
        env["VERTSTUDY_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_activations_are_reused_without_page_faults() -> None:
    """Steady-state forward passes: with the setting, the heap serves each pass's large
    activations from what the pass before freed; without it, every pass maps and faults them in
    again. (One lone 64 MB tensor allocated and freed over and over is not a fair probe: glibc's
    aligned allocation asks for a little more than the freed block, so a lone block is reused
    only now and then; a network's activations of several sizes are.)"""
    pages = 16 * 96**3 * 4 // os.sysconf("SC_PAGE_SIZE")  # one activation
    reused, system = _run(None), _run("system")
    assert reused["on"] is True and system["on"] is False
    assert system["faults"] > pages // 2  # each pass maps and faults its activations in again
    assert reused["faults"] < pages // 20  # the heap keeps it
