"""Linear probe: logistic regression (L-BFGS, scikit-learn) on frozen features.

The inverse regularisation strength C is chosen on a validation split (never on the test split):
:func:`linear_probe` fits one model per C of the grid on the labelled images, scores each on the
validation images, keeps the C with the best validation accuracy and only then scores the test
images, once, at that C.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # scikit-learn takes ~1 s to import: only the evaluate stage pays for it
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

from ssdd.data import Normalizer
from ssdd.errors import UserError
from ssdd.models import Encoder
from ssdd.precision import autocast

PROBE_FEATURES = ("gap", "flatten")


def probe_extractor(encoder: Encoder, mode: str = "gap") -> Callable[[torch.Tensor], torch.Tensor]:
    """The function mapping normalised images to the probe's feature vectors.

    ``"gap"``: ``encoder.features`` (globally pooled for the conv stacks). ``"flatten"``: the last
    conv map before global pooling, flattened (C·H·W values per image, as MKDT probes its ConvNet).
    Works for backbones that are an ``nn.Sequential`` ending in ``AdaptiveAvgPool2d(1), Flatten``
    (what :func:`ssdd.models.registry.pooled_encoder` builds); a backbone that already ends in a
    plain ``Flatten`` gives its features unchanged.
    """
    if mode == "gap":
        return encoder.features
    arch = getattr(encoder, "arch", type(encoder).__name__)
    if mode != "flatten":
        raise UserError(f"evaluate.probe_features must be one of {', '.join(PROBE_FEATURES)}, got {mode!r}")
    backbone = getattr(encoder, "backbone", None)
    plain = type(encoder).features is Encoder.features if isinstance(encoder, Encoder) else False
    if plain and isinstance(backbone, nn.Sequential) and len(backbone) >= 2 and isinstance(backbone[-1], nn.Flatten):
        last = backbone[-2]
        if isinstance(last, nn.AdaptiveAvgPool2d) and last.output_size in (1, (1, 1)):
            trunk = backbone[:-2]
            return lambda x: trunk(x).flatten(1)
        if not isinstance(last, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return encoder.features  # the backbone already flattens its last map
    raise UserError(f"evaluate.probe_features=flatten: cannot find the conv map before global pooling in "
                    f"encoder '{arch}' (needs a backbone ending in AdaptiveAvgPool2d(1), Flatten); use "
                    f"evaluate.probe_features=gap")


@torch.no_grad()
def frozen_features(encoder: Encoder, images_u8: torch.Tensor, norm: Normalizer, device: torch.device | str,
                    chunk: int = 512, mode: str = "gap") -> np.ndarray:
    """Features of ``images_u8`` (uint8, N×C×H×W) as float32, ``mode`` as :func:`probe_extractor`."""
    encoder.eval()
    extract = probe_extractor(encoder, mode)
    with autocast(device):
        out = [extract(norm(images_u8[i:i + chunk].to(device))).float().cpu()
               for i in range(0, len(images_u8), chunk)]
    return torch.cat(out).numpy()


@dataclass
class ProbeResult:
    accuracy: float  # test accuracy at the chosen C
    c: float  # the chosen inverse regularisation strength
    val_accuracy: float  # validation accuracy at the chosen C (NaN without a validation split)
    val_accuracies: dict[float, float]  # every C tried -> its validation accuracy


def _fit(train_x: np.ndarray, train_y: np.ndarray, c: float, max_iter: int,
         warm: LogisticRegression | None = None) -> LogisticRegression:
    """Fit at ``c``; ``warm`` (a fitted model) is copied and its solution used as the starting point."""
    from sklearn.linear_model import LogisticRegression

    clf = copy.deepcopy(warm) if warm is not None else LogisticRegression(max_iter=max_iter, warm_start=True)
    clf.set_params(C=c)
    with warnings.catch_warnings():
        # one label per class (1 % of a 100-image-per-class target) is a valid probe, not a regression
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        clf.fit(train_x, train_y)
    return clf


def _score(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.predict(x) == y).mean())


def _sweep(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c_grid: Sequence[float],
           max_iter: int) -> tuple[StandardScaler, float, dict[float, float], LogisticRegression]:
    if len(c_grid) == 0:
        raise UserError("evaluate.linear_c_grid must hold at least one value")
    if any(not c > 0 for c in c_grid):
        raise UserError(f"evaluate.linear_c_grid values must be positive, got {list(c_grid)}")
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(val_x)
    accs: dict[float, float] = {}
    models: dict[float, LogisticRegression] = {}
    clf = None
    for c in sorted({float(c) for c in c_grid}):  # ascending C, warm-started: each fit starts near its optimum
        clf = models[c] = _fit(tx, train_y, c, max_iter, clf)
        accs[c] = _score(clf, vx, val_y)
    best = max(accs.values())
    chosen = min(c for c, a in accs.items() if a == best)
    return scaler, chosen, accs, models[chosen]


def select_c(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             c_grid: Sequence[float], max_iter: int = 1000) -> tuple[float, dict[float, float]]:
    """The C of ``c_grid`` with the best validation accuracy (ties: the smallest C, the strongest
    regularisation) and every C's validation accuracy. Features are standardised with the labelled
    subset's statistics. The test split is not an argument: it cannot influence the choice."""
    _, chosen, accs, _ = _sweep(train_x, train_y, val_x, val_y, c_grid, max_iter)
    return chosen, accs


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
                 c_grid: Sequence[float] = (1.0,), max_iter: int = 1000) -> ProbeResult:
    """Choose C on the validation split and report the test accuracy of the model fitted at that C.

    Without validation images the grid is not searched: C = 1 (or the grid's only value). The test
    images are scored once, after the choice.

    NumPy's BLAS runs single-threaded here: the probe's matrices are small, and its threads cost more
    than they save (the demo's probes: 28.8 s with two threads, 9.7 s with one, on a 2-core EPYC).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _linear_probe(train_x, train_y, test_x, test_y, val_x, val_y, c_grid, max_iter)


def _linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  val_x: np.ndarray | None, val_y: np.ndarray | None, c_grid: Sequence[float],
                  max_iter: int) -> ProbeResult:
    if val_x is not None and val_y is not None and len(val_y) > 0:
        scaler, c, accs, clf = _sweep(train_x, train_y, val_x, val_y, c_grid, max_iter)
        return ProbeResult(_score(clf, scaler.transform(test_x), test_y), c, accs[c], accs)
    from sklearn.preprocessing import StandardScaler

    c = float(c_grid[0]) if len(c_grid) == 1 else 1.0
    scaler = StandardScaler().fit(train_x)
    clf = _fit(scaler.transform(train_x), train_y, c, max_iter)
    return ProbeResult(_score(clf, scaler.transform(test_x), test_y), c, float("nan"), {})


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          max_iter: int = 1000, c: float = 1.0) -> float:
    """Standardise with the labelled subset's statistics, fit multinomial logistic regression at ``c``, score."""
    return linear_probe(train_x, train_y, test_x, test_y, c_grid=(c,), max_iter=max_iter).accuracy
