"""Distillation methods by name: each returns one :class:`DistilledSet` from a :class:`DistillContext`.

How to add a method (one module, one registration, one test):

1. Write ``src/ssdd/distill/<name>.py`` with one entry point::

       @register("my_method", needs=("distill.my_method",), prep=("experts",))
       def my_method(ctx: DistillContext) -> DistilledSet:
           ...  # ctx.source, ctx.teacher, ctx.norm, ctx.spec, ctx.cfg, ctx.seed, ctx.init_index, ctx.prep[...]

   ``needs`` names the config keys (beyond the common ones) whose change must redo it; put its
   options in a nested table ``distill.<name>`` of :mod:`ssdd.config` (the one home of every default).
   ``prep`` names preparatory stages (see :func:`register_prep`), each with its own artifact,
   checkpoint and resume, shared by every method and seed that needs it.
2. Import the module in ``ssdd/distill/__init__.py`` (that import is the registration).
3. Add a test that runs it for a few steps on a tiny slice and checks the artifact.

A preset's ``methods = [...]`` then drives distill, pretrain, evaluate, report and compare;
nothing else names methods. ``kind="encoder"`` methods (``no_pretrain``, ``full_ssl``) make no set:
the pipeline builds their encoders directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ssdd.checkpoint import Hooks
from ssdd.config import DistillConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.errors import UserError


@dataclass
class DistilledSet:
    """What every method returns. ``images`` live in ``image_space`` (see DistillConfig);
    ``targets`` is None when pre-training is self-supervised (``objective="barlow_twins"``)."""

    images: torch.Tensor
    targets: torch.Tensor | None
    lr: float | None = None  # a learned pre-training learning rate (MKDT); None = pretrain.lr
    objective: str = "mse"  # how pretrain uses the set: "mse" to targets, "cross_entropy" to class
    # probabilities (labelled methods: one-hot or soft labels), or "barlow_twins" on the images
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts about the run (index, losses, ...)


@dataclass
class SourceLabels:
    """The source's class labels, aligned with ``DistillContext.source``. Only labelled baselines read
    them (through :meth:`DistillContext.require_labels`); KRR-ST and the SSL methods never do."""

    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    _on: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The labels on ``device`` (copied there once, then kept)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._on:
            self._on[device] = self.labels.to(device)
        return self._on[device]

    def one_hot(self, index: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 one-hot rows of ``labels[index]``: on the CPU, or with ``device`` made there from the
        labels kept on it (no copy of ``index`` back to the host: per-step use in FRePo and KIP)."""
        if device is None:
            return torch.nn.functional.one_hot(self.labels[index.cpu()], self.num_classes).float()
        labels = self.on(device)
        index = index.to(labels.device, non_blocking=labels.device.type == "cuda")  # usually there already
        return torch.nn.functional.one_hot(labels[index], self.num_classes).float()


@dataclass
class DistillContext:
    """Everything a method may read. Methods never see target tasks."""

    source: ImageSet  # unlabeled source (uint8); its labels are never read
    heldout: ImageSet | None  # held-out source images for checks (never distilled from)
    teacher: nn.Module  # frozen, eval mode: normalised images -> d-dim features
    norm: Normalizer  # the source's normalisation
    spec: dict  # the student / pool model spec, out_dim = d
    cfg: DistillConfig
    seed: int  # this distillation's seed (config seed + k for seed k)
    init_index: torch.Tensor  # the paired random draw of m source indices for this seed
    device: torch.device | str = "cpu"
    progress: bool = True
    hooks: Hooks = field(default_factory=Hooks)
    prep: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # outputs of declared prep stages
    cache: dict[str, Any] = field(default_factory=dict)  # shared across methods of one run (teacher features)
    labels: SourceLabels | None = None  # the source's labels when it has them; see require_labels

    def require_labels(self, method: str) -> SourceLabels:
        """The source's labels, or one clear error for a labelled method on an unlabelled source."""
        if self.labels is None:
            raise UserError(f"distill: method {method} needs a labelled source, but data.source has no labels "
                            f"(use an image folder with class sub-folders, cifar, or an npz with labels)")
        return self.labels

    def to_space(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 source images -> the synthetic image space of ``cfg.image_space``."""
        x = images_u8.to(self.device)
        return self.norm(x) if self.cfg.image_space == "normalized" else x.float() / 255

    @torch.no_grad()
    def teacher_features(self) -> torch.Tensor:
        """The teacher's features of the whole un-augmented source (computed once per run, cached)."""
        if "teacher_features" not in self.cache:
            x = self.source.images
            self.cache["teacher_features"] = torch.cat(
                [self.teacher(self.norm(x[i:i + 512].to(self.device))) for i in range(0, len(x), 512)])
        return self.cache["teacher_features"]

    @torch.no_grad()
    def targets_for(self, index: torch.Tensor) -> torch.Tensor:
        """Teacher targets of source images ``index``: plain features, or, with
        ``distill.target_views > 1``, the mean over that many crop/flip views (fixed per seed)."""
        from ssdd.data.augment import crop_flip

        if self.cfg.target_views <= 1:
            return self.teacher_features()[index.to(self.teacher_features().device)]
        real = self.source.images[index.cpu()].to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 31)
        total = 0
        for _ in range(self.cfg.target_views):
            total = total + self.teacher(self.norm(crop_flip(real, self.cfg.crop_pad, self.cfg.flip, gen)))
        return total / self.cfg.target_views


@dataclass
class Method:
    name: str
    run: Callable[[DistillContext], DistilledSet] | None
    kind: str = "set"  # "set": makes a distilled set; "encoder": the pipeline builds its encoders directly
    needs: tuple[str, ...] = ()
    prep: tuple[str, ...] = ()
    doc: str = ""
    # a cheap check of the settings against this machine (e.g. MKDT's memory estimate), raising UserError;
    # meant to run before the method's prep stages, so a refusal comes before hours of expert training
    preflight: Callable[[DistillContext], None] | None = None


@dataclass
class Prep:
    """A preparatory stage: ``run(ctx) -> tensors`` saved as ``distilled/prep/<name>.safetensors``."""

    name: str
    run: Callable[[DistillContext], dict[str, torch.Tensor]]
    needs: tuple[str, ...] = ()
    enabled: Callable[[DistillConfig], bool] = lambda cfg: True  # an optional stage runs only when this says so


_METHODS: dict[str, Method] = {}
_PREPS: dict[str, Prep] = {}


def register(name: str, *, kind: str = "set", needs: tuple[str, ...] = (), prep: tuple[str, ...] = (),
             preflight: Callable[[DistillContext], None] | None = None) -> Callable:
    """Decorator registering a method's entry point under ``name`` (``preflight``: see :class:`Method`)."""
    def wrap(fn: Callable[[DistillContext], DistilledSet] | None) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn is not None and fn.__doc__ else ""
        _METHODS[name] = Method(name, fn, kind, tuple(needs), tuple(prep), doc, preflight)
        return fn
    return wrap


def register_prep(name: str, *, needs: tuple[str, ...] = (),
                  enabled: Callable[[DistillConfig], bool] = lambda cfg: True) -> Callable:
    def wrap(fn: Callable[[DistillContext], dict[str, torch.Tensor]]) -> Callable:
        _PREPS[name] = Prep(name, fn, tuple(needs), enabled)
        return fn
    return wrap


def names() -> list[str]:
    return sorted(_METHODS)


def get(name: str) -> Method:
    if name not in _METHODS:
        raise UserError(f"config: methods: unknown method '{name}' (available: {', '.join(names())})")
    return _METHODS[name]


def get_prep(name: str) -> Prep:
    return _PREPS[name]


def random_index(n: int, m: int, seed: int) -> torch.Tensor:
    """The paired random draw of seed ``seed``: KRR-ST's start and the random-subset baseline."""
    if m > n:
        raise UserError(f"distill.m={m} is larger than the source ({n} images)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]
