"""Ensemble stage: a weighted soft vote over the members' label probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from servecore import LABELS
from servecore.pipeline.batching import Batch


class Ensemble:
    """``{"<member>.probs": float32[n, labels], ...}`` → ``{"probs", "label"}``.

    Weights are normalised to sum to one; every member named in ``weights`` must be present.
    """

    model_ref = None

    def __init__(self, weights: Mapping[str, float], labels: Sequence[str] = LABELS) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"ensemble weights must be non-negative with a positive sum: {weights}"
            )
        total = float(sum(weights.values()))
        self.weights = {name: float(w) / total for name, w in weights.items()}
        self.labels = tuple(labels)
        self._label_array = np.array(self.labels, dtype=object)

    def __call__(self, batch: Batch) -> Batch:
        missing = [m for m in self.weights if f"{m}.probs" not in batch]
        if missing:
            raise KeyError(f"ensemble input lacks members {missing}; got {sorted(batch)}")
        probs = sum(w * batch[f"{m}.probs"].astype(np.float32) for m, w in self.weights.items())
        probs = np.asarray(probs, dtype=np.float32)
        return {"probs": probs, "label": self._label_array[probs.argmax(axis=1)]}
