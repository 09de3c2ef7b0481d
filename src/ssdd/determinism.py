"""Deterministic kernels on CUDA, on request.

CPU kernels in ssdd are deterministic: the same run twice, or a run stopped and resumed, gives the
same bits. On CUDA several kernels are not (cuDNN's convolution backward, ``index_add``, atomics in
pooling backward), so that holds there only with ``--deterministic`` (``deterministic = true``): it
switches torch to deterministic algorithms (slower), sets ``CUBLAS_WORKSPACE_CONFIG`` before cuBLAS
starts, and turns cuDNN's autotuner off. Without it, cuDNN autotunes the fixed-shape loops.
CUDA results are never seed-for-seed equal to CPU results: their generators draw other numbers.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("ssdd")


def configure(deterministic: bool, device: torch.device | str) -> None:
    """Set the process's kernel choice for a run on ``device`` (call before its first CUDA work)."""
    cuda = torch.device(device).type == "cuda"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if cuda:
            log.info("deterministic kernels on (CUDA): a resumed run equals an uninterrupted one bit for bit")
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = cuda  # fixed shapes: let cuDNN time its algorithms once
