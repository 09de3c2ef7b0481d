"""BatchNorm with statistics over the global batch of all ranks (Barlow Twins under torchrun).

torch's SyncBatchNorm runs on GPUs only; this one works on every backend (gloo on CPU too), so it is
what runs, and is tested, on CPUs. Statistics are two differentiable all-reduces (sum, then centred sum
of squares); with one process it is exactly BatchNorm. Under NCCL :func:`to_global` picks torch's
SyncBatchNorm instead: one fused all-gather forward and one all-reduce backward, where this one makes
a blocking host-to-device copy and six collectives per layer. Converting keeps parameter and buffer
names, so state dicts and checkpoints do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from ssdd import distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Training-mode statistics over every rank's share of the batch; eval mode as BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.active()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32 statistics; fp64 kept
        count = distributed.all_reduce_grad(torch.tensor([float(xf.numel() // xf.shape[1])], device=x.device))
        mean = distributed.all_reduce_grad(xf.sum(dims)) / count
        var = distributed.all_reduce_grad((xf - mean.view(shape)).pow(2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                momentum = (1.0 / float(self.num_batches_tracked + 1) if self.momentum is None  # cumulative
                            else self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def to_global(model: nn.Module) -> dict[str, type]:
    """Swap every BatchNorm for a :class:`GlobalBatchNorm` in place (torch's SyncBatchNorm under NCCL);
    returns what :func:`to_local` needs."""
    nccl = distributed.active() and torch.distributed.get_backend() == "nccl"
    kinds = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm,
                                                                                           nn.SyncBatchNorm)):
            kinds[name] = type(module)
            if nccl:
                module.__class__ = nn.SyncBatchNorm
                module.process_group = None  # the default group: every rank
            else:
                module.__class__ = GlobalBatchNorm
    return kinds


def to_local(model: nn.Module, kinds: dict[str, type]) -> None:
    """Undo :func:`to_global` (the saved model is plain BatchNorm)."""
    for name, module in model.named_modules():
        if name in kinds:
            module.__class__ = kinds[name]


__all__ = ["GlobalBatchNorm", "to_global", "to_local"]
