"""ssdd.allocator: freed blocks up to 32 MiB stay in the process (a repeated allocation makes no page
faults); larger ones are still given back, so the heap cannot hoard them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from ssdd.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting applies to glibc's malloc only")

CHILD = """
import resource, sys, torch
import torch.nn.functional as F
from ssdd.allocator import keep_freed_memory
from ssdd.models import build
kept = keep_freed_memory()
torch.manual_seed(0)
if sys.argv[1] == "train":  # the demo's fine-tune step, fp32
    model = build({"arch": "convnet", "in_channels": 1, "image_size": 32, "out_dim": 10, "widths": [32, 64, 128],
                   "pool": "gap"})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    touched = 64 * 32 * 32 * 32 * 4  # bytes of one first-layer activation
else:  # one block of that many MiB, allocated, written and freed
    size = int(sys.argv[1]) * 2**20
    def step():
        torch.empty(size, dtype=torch.uint8).fill_(1)
    touched = size
for _ in range(30):  # warm-up: the heap grows until freed holes fit the aligned blocks
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 10 * touched // resource.getpagesize())
"""


def faults(setting: str, what: str) -> tuple[bool, int, int]:
    """(settings taken, minor page faults, pages of 10 steps' biggest block) for 10 steps of ``what``:
    ``"train"`` or a block size in MiB."""
    out = subprocess.run([sys.executable, "-c", CHILD, what], env={**os.environ, "SSDD_MALLOC": setting},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@glibc_only
def test_kept_memory_is_not_faulted_back():
    kept, n_kept, pages = faults("kept", "train")
    system, n_system, _ = faults("system", "train")
    assert kept and not system
    assert n_system > pages // 4  # glibc gives freed activations back: they fault in again each step
    assert n_kept < n_system // 5  # served from the kept heap (measured: 0 in most runs, 2,560 at worst,
    # against 10,000-37,000 with glibc's defaults)


@glibc_only
def test_large_blocks_are_still_given_back():
    kept, n_kept, pages = faults("kept", "64")
    assert kept and n_kept > pages // 2  # above 32 MiB: mapped and unmapped as glibc does, never hoarded


def test_opt_out(monkeypatch):
    monkeypatch.setenv("SSDD_MALLOC", "system")
    assert keep_freed_memory() is False
