"""Class-balanced starts and per-class real batches, shared by the labelled matching baselines (DM, DSA).

Both published methods start from real images of each class and compare real and synthetic images
class by class, so the synthetic set is laid out class by class and every image carries the position
of its class (its *group*).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ssdd.errors import UserError


@dataclass
class BalancedStart:
    index: torch.Tensor  # (m,) source indices, grouped by class, classes in ascending order
    classes: torch.Tensor  # (k,) the class ids used, ascending
    group: torch.Tensor  # (m,) position in ``classes`` of each synthetic image's class

    @property
    def images_per_class(self) -> int:
        """The published methods' "ipc": m // k (the shares differ by at most one where m % k != 0)."""
        return len(self.index) // len(self.classes)


def balanced_start(labels: torch.Tensor, m: int, seed: int) -> BalancedStart:
    """``m`` real images spread as evenly as possible over the classes present, chosen at random in each.

    With fewer images than classes (``m < k``) a seeded random choice of ``m`` classes gets one image
    each (seeded rather than "the most frequent", which on a balanced source would always mean the
    lowest class ids). Shares differ by at most one; the classes that get the extra image are a seeded
    random choice. A class smaller than its share gives all its images and the rest go to the others.
    """
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels)
    present = (counts > 0).nonzero().squeeze(1)
    if m > int(counts.sum()):
        raise UserError(f"distill.m={m} is larger than the source ({int(counts.sum())} images)")
    if m < len(present):
        present = present[torch.randperm(len(present), generator=gen)[:m]].sort().values
    room = counts[present].clone()
    share = torch.zeros_like(room)
    order = torch.randperm(len(present), generator=gen)  # who gets the remainder first
    left = m
    while left > 0:
        open_ = order[room[order] > share[order]]
        each = left // len(open_)
        if each == 0:
            share[open_[:left]] += 1
            break
        add = torch.minimum(room[open_] - share[open_], torch.tensor(each))
        share[open_] += add
        left -= int(add.sum())
    parts, groups = [], []
    for j, (c, s) in enumerate(zip(present.tolist(), share.tolist())):
        members = (labels == c).nonzero().squeeze(1)
        parts.append(members[torch.randperm(len(members), generator=gen)[:s]].sort().values)
        groups.append(torch.full((s,), j, dtype=torch.long))
    return BalancedStart(torch.cat(parts), present, torch.cat(groups))


class ClassBatches:
    """Random real batches of ``per_class`` images from each of ``classes`` (all of a smaller class),
    drawn without replacement within a class, as the published ``get_images(c, n)``."""

    def __init__(self, labels: torch.Tensor, classes: torch.Tensor):
        labels = labels.cpu()
        self.members = [(labels == c).nonzero().squeeze(1) for c in classes.tolist()]

    def sample(self, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Source indices (grouped by class) and the group of each."""
        index, group = [], []
        for j, members in enumerate(self.members):
            pick = members[torch.randperm(len(members), generator=generator)[:per_class]]
            index.append(pick)
            group.append(torch.full((len(pick),), j, dtype=torch.long))
        return torch.cat(index), torch.cat(group)


@dataclass
class ImageOptimisation:
    """The resumable state DM and DSA share: the synthetic images, their SGD optimiser, the generator of
    every draw and the loss curve (``from_resume`` restores it, ``state`` is the checkpoint)."""

    x_s: torch.Tensor
    opt: torch.optim.Optimizer
    gen: torch.Generator
    losses: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, x0: torch.Tensor, lr: float, momentum: float, seed: int,
              resume: dict | None) -> "ImageOptimisation":
        x_s = x0.detach().clone().requires_grad_(True)
        run = cls(x_s, torch.optim.SGD([x_s], lr=lr, momentum=momentum), torch.Generator().manual_seed(seed))
        if resume is not None:
            with torch.no_grad():
                x_s.copy_(resume["x_s"])
            run.opt.load_state_dict(resume["opt"])
            run.gen.set_state(resume["gen"])
            run.losses = list(resume["losses"])
        return run

    def state(self) -> dict:
        return {"step": len(self.losses), "x_s": self.x_s.detach().clone(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(), "losses": list(self.losses)}
