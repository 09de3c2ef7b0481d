"""Distillation methods by name: each returns one :class:`DistilledSet` from a :class:`DistillContext`.

How to add a method (one module, one test):

1. Write ``src/ssdd/distill/methods/<name>.py`` (``ssdd.distill`` imports every module there: that
   import is the registration) with its options, its smoke settings and one entry point
   (``Role``, ``roles``, ``positive``, ``nonnegative`` come from :mod:`ssdd.config`; small examples:
   ``kmeans`` in ``methods/subsets.py``, ``methods/dm.py``)::

       @dataclass
       class MyMethodConfig:                      # the table distill.my_method, defaults in one place
           steps: int = 100
           ROLES: ClassVar[dict[str, Role]] = roles("steps")   # how each key counts in fingerprints
           CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}  # allowed values of string keys (optional)

           def check(self, at: str, distill) -> None:          # runs when the config loads (optional)
               positive(at, self, "steps")                     # UserError "config: distill.my_method.steps ..."

       SMOKE = {"distill.my_method.steps": 2}    # tests/test_methods.py runs every method with these

       @register("my_method", config=MyMethodConfig, needs=("distill.experts",), prep=("experts",))
       def my_method(ctx: DistillContext) -> DistilledSet:
           ...  # ctx.source, ctx.teacher, ctx.norm, ctx.spec, ctx.cfg, ctx.seed, ctx.init_index, ctx.prep[...]

   ``config`` becomes ``distill.<name>`` (TOML table, ``--set distill.my_method.steps=...``; its checks
   run in :func:`ssdd.settings.load_config`, before any work). The method's own section is always among
   its inputs; ``needs`` names the other keys it reads (beyond the common ``distill.m`` ...), and reading
   an undeclared one raises. ``prep`` names preparatory stages (see :func:`register_prep`, which takes a
   ``config`` too), each with its own artifact, checkpoint and resume, shared by every method and seed
   that needs it. A method imports engines (``ssdd.distill.engines``), never another method.
2. Add a test of what it computes (``tests/test_<name>.py``); ``tests/test_methods.py`` already runs
   every registered method end to end with its ``SMOKE`` settings.

A preset's ``methods = [...]`` then drives distill, pretrain, evaluate, report and compare;
nothing else names methods. ``kind="encoder"`` methods (``no_pretrain``, ``full_ssl``) make no set:
the pipeline builds their encoders directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ssdd import config as config_mod
from ssdd.checkpoint import Hooks
from ssdd.config import DistillCommon
from ssdd.data import ImageSet, Normalizer
from ssdd.errors import UserError


@dataclass
class DistilledSet:
    """What every method returns. ``images`` live in ``image_space`` (see DistillCommon);
    ``targets`` is None when pre-training is self-supervised (``objective="barlow_twins"``)."""

    images: torch.Tensor
    targets: torch.Tensor | None
    lr: float | None = None  # a learned pre-training learning rate (MKDT); None = pretrain.lr
    objective: str = "mse"  # how pretrain uses the set: "mse" to targets, "cross_entropy" to class
    # probabilities (labelled methods: one-hot or soft labels), or "barlow_twins" on the images
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able facts about the run (index, losses, ...)
    # with distill.views: the targets (m, K-1, d) of views 1..K-1 that the method learned; None = the
    # teacher's on the set's views (the distill stage computes them: ssdd.views)
    view_targets: torch.Tensor | None = None


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
    cfg: DistillCommon  # the whole distill config (ssdd.settings.DistillConfig), as declared (DeclaredConfig)
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

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Synthetic-space images -> [0, 1] pixels, for pictures: :meth:`to_space` undone, clamped."""
        return self.norm.to_unit(images) if self.cfg.image_space == "normalized" else images.clamp(0, 1)

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

    @torch.no_grad()
    def teacher_view_targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's features (m, K-1, d) of views 1..K-1 (``distill.views``) of a set's ``images``
        (in the set's space), in chunks: the view targets of a set of real images."""
        from ssdd.views import apply_view, count

        k = count(self.cfg.views)
        out = []
        for i in range(0, len(images), 256):
            x = images[i:i + 256].to(self.device)
            if self.cfg.image_space != "normalized":
                x = self.norm.normalize_unit(x)
            out.append(torch.stack([self.teacher(apply_view(x, self.cfg.views, v)).float() for v in range(1, k)], 1))
        return torch.cat(out)


COMMON = ("distill.m", "distill.batch", "distill.image_space", "distill.flip", "distill.crop_pad",
          "distill.target_views", "distill.views", "distill.view_store",
          "distill.view_approx_hidden")  # read by every method: part of every set's fingerprint


class DeclaredConfig:
    """The ``distill`` config as one method (or prep stage) may read it: its ``needs`` and the common keys.

    Reading any other key raises, so an input that a method reads without declaring it cannot be left out
    of its fingerprint (which would reuse stale sets after that key changed). A declared section is handed
    over as the real dataclass; above it, another view."""

    def __init__(self, obj: Any, allowed: tuple[str, ...], owner: str, prefix: str = "distill."):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path, allowed = self._prefix + name, self._allowed
        value = getattr(self._obj, name)
        if any(path == a or path.startswith(a + ".") for a in allowed):
            return value
        if any(a.startswith(path + ".") for a in allowed):
            return DeclaredConfig(value, allowed, self._owner, path + ".")
        raise AttributeError(f"{path} is not among the declared inputs of {self._owner} (add it to its "
                             "register(..., needs=...), so that a change of it redoes its sets)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._prefix}{name}: the config is read-only inside {self._owner}")


def replaced(cfg: DistillCommon, **changes: Any) -> DistillCommon:
    """``dataclasses.replace`` for the config a method is handed (a :class:`DeclaredConfig`, or a plain one)."""
    if isinstance(cfg, DeclaredConfig):
        inner = dataclasses.replace(cfg._obj, **changes)
        return DeclaredConfig(inner, cfg._allowed, cfg._owner, cfg._prefix)  # type: ignore[return-value]
    return dataclasses.replace(cfg, **changes)


def declared(cfg: DistillCommon, owner: str, needs: tuple[str, ...]) -> DistillCommon:
    """``cfg`` as the method or prep stage ``owner`` may read it (see :class:`DeclaredConfig`)."""
    return DeclaredConfig(cfg, COMMON + tuple(needs), owner)  # type: ignore[return-value]


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
    version: int = 1  # part of its sets' fingerprints: bump when a change moves its numbers on purpose


@dataclass
class Prep:
    """A preparatory stage: ``run(ctx) -> tensors`` saved as ``distilled/prep/<name>.safetensors``."""

    name: str
    run: Callable[[DistillContext], dict[str, torch.Tensor]]
    needs: tuple[str, ...] = ()
    enabled: Callable[[DistillCommon], bool] = lambda cfg: True  # an optional stage runs only when this says so


_METHODS: dict[str, Method] = {}
_PREPS: dict[str, Prep] = {}


def _own_section(name: str, config: type | None, needs: tuple[str, ...]) -> tuple[str, ...]:
    """``needs`` with ``distill.<name>`` first when ``config`` declares that section (recorded in ssdd.config)."""
    if config is None:
        return tuple(needs)
    config_mod.add_section(name, config)
    own = f"distill.{name}"
    return (own,) + tuple(n for n in needs if n != own)


def register(name: str, *, config: type | None = None, kind: str = "set", needs: tuple[str, ...] = (),
             prep: tuple[str, ...] = (), preflight: Callable[[DistillContext], None] | None = None,
             version: int = 1) -> Callable:
    """Decorator registering a method's entry point under ``name``. ``config``: the dataclass of its own
    section ``distill.<name>`` (see :func:`ssdd.config.add_section`), which is then among its inputs;
    ``preflight``, ``version``: see :class:`Method`."""
    def wrap(fn: Callable[[DistillContext], DistilledSet] | None) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn is not None and fn.__doc__ else ""
        _METHODS[name] = Method(name, fn, kind, _own_section(name, config, needs), tuple(prep), doc, preflight,
                                version)
        return fn
    return wrap


def register_prep(name: str, *, config: type | None = None, needs: tuple[str, ...] = (),
                  enabled: Callable[[DistillCommon], bool] = lambda cfg: True) -> Callable:
    """Decorator registering a prep stage under ``name``; ``config``: its own section, as for :func:`register`."""
    def wrap(fn: Callable[[DistillContext], dict[str, torch.Tensor]]) -> Callable:
        _PREPS[name] = Prep(name, fn, _own_section(name, config, needs), enabled)
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
