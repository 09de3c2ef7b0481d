"""Named pre-training recipes, so that no method is handicapped by another method's recipe (issue 19).

- ``short``: the preset's own ``pretrain`` section (its epochs, lr, ...; cosine schedule; a set's learned lr
  replaces ``pretrain.lr``): what every run did before recipes existed;
- ``krr_st``: the KRR-ST reference code's recipe: 1,000 epochs, SGD lr 0.1, momentum 0.9, weight decay 1e-3,
  batch 256, cosine schedule, no augmentation;
- ``mkdt``: MKDT's evaluation recipe (its ``pretrain.py`` / ``eval.py``): 20 epochs, SGD momentum 0.9, weight
  decay 1e-4, batch 256, constant lr: the set's learned lr, else 0.1.

With one name in ``pretrain.recipes`` every encoder uses it. With several, each (method, seed) pre-trains
one encoder per recipe and keeps the one whose linear probe scores best on the validation split of the
in-domain target's *train* split (:func:`ssdd.evaluate.suite.validation_score`); the test split is never
read. ``random_subset`` goes through the same choice as every method it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssdd.config import RECIPES as NAMES
from ssdd.config import Config, PretrainConfig


@dataclass(frozen=True)
class Recipe:
    """One pre-training schedule: SGD with momentum on the set's (view, target) pairs, no augmentation."""

    name: str
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch: int
    schedule: str  # "cosine" (to 0 over all steps) or "constant"
    learned_lr: bool = True  # a set's learned lr (MKDT) replaces ``lr``


def recipe(name: str, cfg: PretrainConfig) -> Recipe:
    """The recipe ``name``; ``short`` reads the preset's ``pretrain`` section."""
    if name == "short":
        return Recipe("short", cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch, "cosine")
    if name == "krr_st":
        return Recipe("krr_st", 1000, 0.1, 0.9, 1e-3, 256, "cosine", learned_lr=False)
    if name == "mkdt":
        return Recipe("mkdt", 20, 0.1, 0.9, 1e-4, 256, "constant")
    raise ValueError(f"pretrain.recipes: unknown recipe {name!r}; expected one of {', '.join(NAMES)}")


def choosing(cfg: Config) -> bool:
    """Whether each encoder is chosen among several recipes (on the validation split)."""
    return len(cfg.pretrain.recipes) > 1


def choice_target(cfg: Config) -> str:
    """The target whose validation split chooses the recipe: ``pretrain.choose_on``, else the in-domain one
    (the target that is ``data.source``), else the first."""
    if cfg.pretrain.choose_on:
        return cfg.pretrain.choose_on
    return cfg.data.source if cfg.data.source in cfg.data.targets else cfg.data.targets[0]
