"""Classification metrics, in numpy (no scikit-learn needed at run time)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for label in labels:
        tp = float(np.sum((pred == label) & (true == label)))
        fp = float(np.sum((pred == label) & (true != label)))
        fn = float(np.sum((pred != label) & (true == label)))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))
