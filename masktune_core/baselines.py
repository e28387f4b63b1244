"""The two baselines run beside MaskTune: JTT's upsampled training set and DFR's retrained last layer.

JTT (Liu et al., ICML 2021, github.com/anniesch/jtt) never sees group labels: the splits it builds carry none.
DFR (Kirichenko et al., ICLR 2023, github.com/PolinaKirichenko/deep_feature_reweighting) follows the reference
``dfr_evaluate_spurious.py``: features standardised with validation statistics, L1 logistic regression
(liblinear) on group-balanced validation subsets, C chosen by worst-group accuracy on the other half of
validation, then the coefficients of ``resamples`` fits on balanced subsets of all of validation averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from .data import SplitRows
from .errors import DfrNeedsValGroups
from .models import head_name
from .training import LoopSettings, eval_outputs, predict_logits


# ---------------------------------------------------------------- JTT


def misclassified(model: nn.Module, train: SplitRows, batch_size: int, loop: LoopSettings) -> list[int]:
    """JTT's error set: positions of the training images ``model`` (eval mode, no augmentation) gets wrong."""
    wrong = predict_logits(model, train, batch_size, loop).argmax(1) != train.labels
    return torch.nonzero(wrong).flatten().tolist()


def upsampled(train: SplitRows, error_positions: np.ndarray, upweight: int) -> SplitRows:
    """The training split with each error-set image present ``upweight`` times, and no group labels."""
    positions = np.concatenate([np.arange(len(train)), np.repeat(error_positions, upweight - 1)]).astype(np.int64)
    return SplitRows(train.images, train.rows[positions], train.labels[positions],
                     torch.full((len(positions),), -1, dtype=torch.long))


def without_groups(split: SplitRows) -> SplitRows:
    return SplitRows(split.images, split.rows, split.labels, torch.full_like(split.groups, -1))


# ---------------------------------------------------------------- DFR


@torch.no_grad()
def penultimate_features(model: nn.Module, data: SplitRows, batch_size: int, loop: LoopSettings) -> np.ndarray:
    """The inputs of the classifier head (eval mode), float64 [N, d]."""
    head = model.get_submodule(head_name(model))
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().flatten(1)))
    try:
        for _ in eval_outputs(model, data, batch_size, loop):
            pass  # the hook keeps what reaches the head
    finally:
        hook.remove()
    return torch.cat(seen).cpu().double().numpy()


def _balanced(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of a subsample with as many images of each present group as the smallest has."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    smallest = min(len(m) for m in members)
    return np.concatenate([rng.permutation(m)[:smallest] for m in members])


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    # L1 as the reference's penalty="l1": scikit-learn 1.8 spells it l1_ratio=1 (earlier versions ignore l1_ratio here).
    return LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear").fit(x, y)


def _worst_group_accuracy(model: LogisticRegression, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    right = model.predict(x) == y
    return min(float(right[groups == g].mean()) for g in np.unique(groups))


def fit_dfr_head(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, num_classes: int,
                 c_grid: list[float], resamples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The last layer DFR retrains on validation features: (weight [K, d], bias [K]) acting on the raw
    features (the standardisation folded in), and what the tuning found."""
    if (groups < 0).any() or len(np.unique(groups)) == 0:
        raise DfrNeedsValGroups("DFR needs a group label on every validation image (a group column in the manifest, "
                                "or data.group_attribute for CelebA); this dataset has none")
    present = np.unique(labels)
    if len(present) != num_classes:
        raise DfrNeedsValGroups(f"DFR retrains the classifier on validation images, which hold only {len(present)} "
                                f"of the {num_classes} classes")
    rng = np.random.default_rng(seed)
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    # Tune C: fit on a balanced subset of one half, judge by worst-group accuracy on the other half.
    order = rng.permutation(len(x))
    judge, fit_half = order[: len(x) // 2], order[len(x) // 2:]
    picked = fit_half[_balanced(groups[fit_half], rng)]
    scores = {}
    if len(np.unique(labels[picked])) == num_classes and len(judge):
        for c in c_grid:
            scores[c] = _worst_group_accuracy(_fit(x[picked], labels[picked], c), x[judge], labels[judge], groups[judge])
    best_c = max(scores, key=scores.get) if scores else c_grid[0]  # first best: the grid's order breaks ties
    weights, biases = [], []
    for _ in range(resamples):
        picked = _balanced(groups, rng)
        fitted = _fit(x[picked], labels[picked], best_c)
        weights.append(fitted.coef_)
        biases.append(fitted.intercept_)
    w, b = np.mean(weights, axis=0), np.mean(biases, axis=0)
    if num_classes == 2:  # one score for class 1: logits (0, score) have the same argmax and softmax
        w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([np.zeros_like(b), b])
    # w (x - mean) / scale + b  ==  (w / scale) x + (b - (w / scale) mean)
    w = w / scaler.scale_
    b = b - w @ scaler.mean_
    info = {"c": best_c, "worst_group_accuracy_by_c": {str(c): s for c, s in scores.items()},
            "tuned": bool(scores), "resamples": resamples,
            "images_per_group": int(min(np.bincount(groups)[np.unique(groups)]))}
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), info


def set_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device).view_as(head.weight))
        head.bias.copy_(bias.to(head.bias.device))
