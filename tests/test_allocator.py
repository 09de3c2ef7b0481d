"""ssdd.allocator: freed blocks stay in the process, so a repeated allocation makes no page faults."""

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
import resource, torch
from ssdd.allocator import keep_freed_memory
kept = keep_freed_memory()
for _ in range(12):  # warm-up: the heap grows until freed holes fit the aligned block (7 rounds here)
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "SSDD_MALLOC": setting},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_kept_memory_is_not_faulted_back():
    kept, n_kept = faults("kept")
    system, n_system = faults("system")
    assert kept and not system
    pages = 10 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert n_system > pages // 2  # glibc mmaps each 64 MiB block afresh: every page faults again
    assert n_kept < pages // 100  # served from the kept heap


def test_opt_out(monkeypatch):
    monkeypatch.setenv("SSDD_MALLOC", "system")
    assert keep_freed_memory() is False
