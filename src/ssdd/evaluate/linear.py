"""Linear probe: logistic regression (L-BFGS, scikit-learn) on frozen features."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ssdd.data import Normalizer
from ssdd.models import Encoder


@torch.no_grad()
def frozen_features(encoder: Encoder, images_u8: torch.Tensor, norm: Normalizer, device: torch.device | str,
                    chunk: int = 512) -> np.ndarray:
    encoder.eval()
    out = [encoder.features(norm(images_u8[i:i + chunk].to(device))).float().cpu()
           for i in range(0, len(images_u8), chunk)]
    return torch.cat(out).numpy()


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          max_iter: int = 1000) -> float:
    """Standardise with the labelled subset's statistics, fit multinomial logistic regression, score."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():
        # one label per class (1 % of a 100-image-per-class target) is a valid probe, not a regression
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())
