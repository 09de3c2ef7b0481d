"""The transfer suite: every encoder x target x protocol x label fraction x seed -> result rows.

Which images are labelled depends only on the target, the seed, the draw and the fraction, never
on the method, so every method is probed with the same labels on the same seed (paired). For the
linear probe a fixed per-class share of the target's train split (``evaluate.validation``) is held
out as a validation split for choosing C; label draws come only from the rest, so labelled,
validation and test images never overlap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ssdd import live_log
from ssdd.checkpoint import Hooks
from ssdd.config import EvaluateConfig
from ssdd.data import ImageSet, Normalizer, stratified_split
from ssdd.errors import UserError
from ssdd.evaluate.finetune import finetune_accuracy
from ssdd.evaluate.linear import frozen_features, linear_probe, probe_extractor
from ssdd.models import Encoder

VALIDATION_SEED = 104_729  # the validation split is one fixed draw: the same for every method and seed


@dataclass
class Target:
    name: str
    train: ImageSet
    test: ImageSet


def validation_split(train: ImageSet, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, validation)`` indices of ``train``: ``round(fraction * n_c)`` images of each class
    (a fixed draw, independent of method and seed) form the validation split, the rest the pool
    that label draws come from. ``fraction = 0`` gives an empty validation split."""
    if train.labels is None:
        raise UserError(f"target {train.name}: the train split has no labels")
    if fraction <= 0:
        return np.arange(len(train)), np.zeros(0, dtype=np.int64)
    pool, val = stratified_split(train.labels, fraction, VALIDATION_SEED)
    return pool.numpy(), val.numpy()


def label_index(train: ImageSet, fraction: float, seed: int, draw: int = 0, validation: float = 0.0) -> np.ndarray:
    """Indices of the labelled part of ``train`` for one seed and draw (sorted).

    Each class gets ``max(1, round(fraction * n_c))`` images, ``n_c`` its count in the whole train
    split (so the label budget does not depend on ``validation``), drawn from the pool outside the
    validation split of :func:`validation_split` and capped at the pool's size; ``fraction >= 1``
    takes the whole pool. The draw depends only on ``(seed, draw, fraction)`` and the target, so it
    is the same for every method. With ``validation = 0`` it equals
    :func:`ssdd.data.stratified_fraction` with the same generator.
    """
    pool, _ = validation_split(train, validation)
    if fraction >= 1.0:
        return pool
    y = train.labels.numpy()
    rng = np.random.default_rng([seed, draw, int(round(fraction * 1e6))])
    in_pool = np.zeros(len(y), bool)
    in_pool[pool] = True
    picks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = max(1, int(round(len(members) * fraction)))
        candidates = members[in_pool[members]]
        picks.append(rng.choice(candidates, size=min(k, len(candidates)), replace=False))
    return np.sort(np.concatenate(picks))


def validation_score(encoder: Encoder, train: ImageSet, cfg: EvaluateConfig, seed: int,
                     device: torch.device | str = "cpu") -> float:
    """How well ``encoder`` transfers, measured on a target's *train* split alone: the mean validation
    accuracy of the linear probe (best C of the grid) over the label fractions below 1 (all when none is)
    and their draws, with the same labelled images and validation split the evaluation uses. The test split
    is not an argument: nothing chosen by this score can have read it (the pre-training recipe choice)."""
    from threadpoolctl import threadpool_limits

    from ssdd.evaluate.linear import select_c

    if cfg.validation <= 0:
        raise UserError("choosing a pre-training recipe needs a validation split: set evaluate.validation > 0")
    _, val = validation_split(train, cfg.validation)
    norm = Normalizer(*train.mean_std(), device=device)
    feats = frozen_features(encoder, train.images, norm, device, mode=cfg.probe_features)
    y = train.labels.numpy()
    fractions = [f for f in cfg.linear_fractions if f < 1.0] or list(cfg.linear_fractions)
    scores = []
    with threadpool_limits(limits=1, user_api="blas"):
        for fraction in fractions:
            for draw in range(cfg.linear_draws if fraction < 1.0 else 1):
                idx = label_index(train, fraction, seed, draw, cfg.validation)
                _, accs = select_c(feats[idx], y[idx], feats[val], y[val], cfg.linear_c_grid)
                scores.append(max(accs.values()))
    return float(np.mean(scores))


def evaluate_encoder(method: str, seed: int, encoder: Encoder, target: Target, cfg: EvaluateConfig,
                     device: str = "cpu", progress: bool = True,
                     finetune_hooks: Callable[[float], Hooks] | None = None) -> list[dict]:
    """All protocols of one (method, seed) encoder on one target.

    ``finetune_hooks(fraction)`` gives each fine-tune its checkpoint / resume hooks (none: no checkpoints).

    Rows: ``method, target, protocol, label_fraction, seed, accuracy, arch`` plus ``n_labels`` (per
    draw), ``c`` (the linear probe's C chosen most often over the draws; None for fine-tuning),
    ``c_draws`` and ``val_accuracy`` (mean validation accuracy at the chosen C; None without a
    validation split, and for fine-tuning).
    """
    in_channels = next(encoder.parameters()).shape[1]
    if in_channels != target.train.shape[0]:
        raise UserError(f"target {target.name}: {target.train.shape[0]}-channel images, but encoder "
                        f"'{method}' takes {in_channels} channels")
    norm = Normalizer(*target.train.mean_std(), device=device)
    rows = []
    arch = getattr(encoder, "arch", type(encoder).__name__)

    def row(protocol: str, fraction: float, acc: float, n_labels: int, cs: list[float] | None = None,
            val_acc: float | None = None) -> dict:
        c = None if cs is None else min(Counter(cs).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
        return {"method": method, "target": target.name, "protocol": protocol, "label_fraction": float(fraction),
                "seed": seed, "accuracy": acc, "arch": arch, "n_labels": int(n_labels), "c": c,
                "c_draws": cs, "val_accuracy": val_acc}

    if "linear" in cfg.protocols:
        probe_extractor(encoder, cfg.probe_features)  # a wrong probe_features fails before any work
        pool, val = validation_split(target.train, cfg.validation)
        feats = frozen_features(encoder, target.train.images, norm, device, mode=cfg.probe_features)
        test_x = frozen_features(encoder, target.test.images, norm, device, mode=cfg.probe_features)
        train_y, test_y = target.train.labels.numpy(), target.test.labels.numpy()
        grid = list(cfg.linear_c_grid) if len(val) else [1.0]
        for fraction in cfg.linear_fractions:
            draws = cfg.linear_draws if fraction < 1.0 else 1
            results, n = [], 0
            for draw in range(draws):
                idx = label_index(target.train, fraction, seed, draw, cfg.validation)
                n = len(idx)
                results.append(linear_probe(feats[idx], train_y[idx], test_x, test_y,
                                            feats[val] if len(val) else None, train_y[val] if len(val) else None,
                                            grid))
            rows.append(row("linear", fraction, float(np.mean([r.accuracy for r in results])), n,
                            [r.c for r in results],
                            float(np.mean([r.val_accuracy for r in results])) if len(val) else None))
    if "finetune" in cfg.protocols:
        for fraction in cfg.finetune_fractions:
            # fine-tuning takes its labels from the whole train split: it selects nothing on validation
            idx = label_index(target.train, fraction, seed)
            labelled = target.train.subset(torch.from_numpy(idx))
            with live_log.scope(f"labels{fraction:g}"):
                acc = finetune_accuracy(encoder, labelled, target.test, norm, cfg, seed, device, progress,
                                        desc=f"finetune {method} s{seed} {fraction:g}",
                                        hooks=finetune_hooks(fraction) if finetune_hooks else None)
            rows.append(row("finetune", fraction, acc, len(idx)))
    return rows
