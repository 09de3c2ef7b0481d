"""Seeds derived from a run's seed, and model builds drawn from them with the global RNGs left alone:
the experts (``experts.py``), the fresh networks of DM, DSA, KIP and naive bilevel, the students of MKDT and MTT."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from ssdd.models import Encoder, build


def expert_seed(seed: int, k: int, purpose: str = "") -> int:
    """A well-mixed 63-bit seed for expert ``k`` of a run seeded ``seed`` (and one of its RNG streams)."""
    digest = hashlib.sha256(f"ssdd-expert:{seed}:{k}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """The global CPU RNG seeded with ``seed`` inside, and restored after; every CUDA generator untouched.

    Models are built (initialised) on the CPU, so this seeds everything a build draws. (``torch.manual_seed``
    would also reseed every CUDA generator, and ``fork_rng(devices=[])`` would not restore them.)"""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def build_seeded(spec: dict, seed: int, device: torch.device | str) -> Encoder:
    """``build(spec)`` with its initialisation drawn from ``seed``, leaving the global RNGs as they were."""
    with seeded_cpu_rng(seed):
        model = build(spec)
    return model.to(device)
