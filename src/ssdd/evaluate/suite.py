"""The transfer suite: every encoder x target x protocol x label fraction x seed -> result rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdd.config import EvaluateConfig
from ssdd.data import ImageSet, Normalizer, stratified_fraction
from ssdd.errors import UserError
from ssdd.evaluate.finetune import finetune_accuracy
from ssdd.evaluate.linear import frozen_features, linear_probe_accuracy
from ssdd.models import Encoder


@dataclass
class Target:
    name: str
    train: ImageSet
    test: ImageSet


def label_index(train: ImageSet, fraction: float, seed: int, draw: int = 0) -> np.ndarray:
    """Indices of the labelled part of ``train`` for one seed and draw: the same for every method (paired)."""
    if fraction >= 1.0:
        return np.arange(len(train))
    rng = np.random.default_rng([seed, draw, int(round(fraction * 1e6))])
    return stratified_fraction(train.labels, fraction, rng).numpy()


def evaluate_encoder(method: str, seed: int, encoder: Encoder, target: Target, cfg: EvaluateConfig,
                     device: str = "cpu", progress: bool = True) -> list[dict]:
    """All protocols of one (method, seed) encoder on one target."""
    in_channels = next(encoder.parameters()).shape[1]
    if in_channels != target.train.shape[0]:
        raise UserError(f"target {target.name}: {target.train.shape[0]}-channel images, but encoder "
                        f"'{method}' takes {in_channels} channels")
    norm = Normalizer(*target.train.mean_std(), device=device)
    rows = []
    arch = getattr(encoder, "arch", type(encoder).__name__)
    row = lambda protocol, fraction, acc: {"method": method, "target": target.name, "protocol": protocol,  # noqa: E731
                                           "label_fraction": float(fraction), "seed": seed, "accuracy": acc,
                                           "arch": arch}
    if "linear" in cfg.protocols:
        train_x = frozen_features(encoder, target.train.images, norm, device)
        test_x = frozen_features(encoder, target.test.images, norm, device)
        train_y, test_y = target.train.labels.numpy(), target.test.labels.numpy()
        for fraction in cfg.linear_fractions:
            draws = cfg.linear_draws if fraction < 1.0 else 1
            accs = []
            for draw in range(draws):
                idx = label_index(target.train, fraction, seed, draw)
                accs.append(linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y))
            rows.append(row("linear", fraction, float(np.mean(accs))))
    if "finetune" in cfg.protocols:
        for fraction in cfg.finetune_fractions:
            labelled = target.train.subset(label_index(target.train, fraction, seed))
            acc = finetune_accuracy(encoder, labelled, target.test, norm, cfg, seed, device, progress,
                                    desc=f"finetune {method} s{seed} {fraction:g}")
            rows.append(row("finetune", fraction, acc))
    return rows
