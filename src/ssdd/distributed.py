"""Data parallelism on torch.distributed: the few collectives the stages use, and no-ops when one
process runs alone (no torchrun), so every stage has one code path.

``torchrun --nproc_per_node=N -m ssdd run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup`
then joins the process group (``nccl`` on GPUs, ``gloo`` on CPU) and gives each rank its device.
Rank 0 alone writes artifacts, logs and progress bars (see :func:`ssdd.artifacts.atomic_path`).
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from ssdd.errors import UserError

T = TypeVar("T")

# Ranks that replicate a long single-process unit (an MKDT distillation, say) meet again only at its
# end; the default 30-minute collective timeout would kill them there.
TIMEOUT = timedelta(hours=48)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or any launcher setting the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> str:
    """Join the process group when launched with several processes; returns this rank's device
    string: ``cuda:LOCAL_RANK`` for ``auto``, ``cuda`` and ``cuda:N`` on a GPU machine (one GPU per
    rank; NCCL refuses two ranks on one GPU). Idempotent."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu and (device in ("auto", "cuda") or device.startswith("cuda:")):
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun: LOCAL_RANK {local} has no GPU of its own ({torch.cuda.device_count()} "
                            f"visible); start at most {torch.cuda.device_count()} processes per node, or add --device cpu")
        device = f"cuda:{local}"
    if not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(_teardown)
    if not is_main():  # one voice: the other ranks only warn
        logging.getLogger("ssdd").setLevel(logging.WARNING)
    return device if device != "auto" else "cpu"


def _teardown() -> None:
    """Leave the group at exit (NCCL warns, and can hang, when a process exits inside it)."""
    global _control
    if dist.is_initialized():
        _control = None
        dist.destroy_process_group()


_control: Any = None


def _control_group() -> Any:
    """The group for control messages (stop flags, decisions, small objects): gloo on the CPU, so
    they never pickle into GPU memory or wait on a CUDA stream. The default group under gloo."""
    global _control
    if dist.get_backend() != "nccl":
        return None
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return _control


def barrier() -> None:
    if active():
        dist.barrier(group=_control_group())


def share(n: int, of_rank: int | None = None, ranks: int | None = None) -> slice:
    """This rank's (or rank ``of_rank`` of ``ranks``') contiguous part of ``n`` items: sizes differ by
    at most one, earlier ranks larger."""
    r = rank() if of_rank is None else of_rank
    w = world() if ranks is None else ranks
    size, extra = divmod(n, w)
    return slice(r * size + min(r, extra), (r + 1) * size + min(r + 1, extra))


def units(items: Sequence[T]) -> list[T]:
    """This rank's share of independent work units, round-robin."""
    return list(items[rank()::world()])


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place, in one collective."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
                      for t in tensors])
    dist.all_reduce(flat)
    pos = 0
    for t in tensors:
        t.copy_(flat[pos:pos + t.numel()].view_as(t))
        pos += t.numel()


def sum_gradients_(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over the ranks: with :func:`gather_keep_grad` each rank's gradient holds the
    part of the global loss that flows through its own share of the batch, so the sum is the
    single-process gradient. Parameters without a gradient are skipped identically on every rank."""
    all_reduce_sum_([p.grad for p in params if p.grad is not None])


def any_true(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request must stop all ranks at one step)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, group=_control_group())
    return bool(t.item() > 0)


def broadcast(obj: T) -> T:
    """Rank 0's value of a picklable ``obj`` on every rank (decisions every rank must share)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` on every rank, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (in rank order); None on the others."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_control_group())
    return out


def gather_keep_grad(t: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's share (:func:`share` of ``total`` rows) of ``t`` concatenated in rank order,
    differentiable only in this rank's part: a loss over the global batch (Barlow Twins'
    cross-correlation) computed on every rank then gives each rank the gradient through its own
    share, and :func:`sum_gradients_` adds them up."""
    if not active():
        return t
    sizes = [len(range(total)[share(total, r)]) for r in range(world())]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank()] = t
    return torch.cat(parts)


class _RankSum(torch.autograd.Function):
    """A sum over the ranks in the forward pass, the backward pass, or both: which one a computation
    needs depends on how each rank uses the result (see the three callers below)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, in_forward: bool, in_backward: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.in_backward = in_backward
        return _summed(t) if in_forward else t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return (_summed(grad) if ctx.in_backward else grad), None, None


def _summed(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out


def all_reduce_grad(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the ranks whose result each rank uses on its own data (global BatchNorm
    statistics): every rank's gradient reaches every contribution."""
    return _RankSum.apply(t, True, True) if active() else t


def sum_shares(t: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's contribution ``t`` (computed from its share), differentiable for a
    result that every rank then uses identically: the gradient reaches each share unchanged."""
    return _RankSum.apply(t, True, False) if active() else t


def share_input(t: torch.Tensor) -> torch.Tensor:
    """A replicated tensor as it enters a rank's share of a computation (identity); its gradient is
    summed over the ranks, so every rank gets the whole gradient. With :func:`sum_shares` this makes
    a data-parallel step inside a differentiable unrolled loop (trajectory matching)."""
    return _RankSum.apply(t, False, True) if active() else t
