"""Torch modules of the trained models, shared by training (bootstrap) and serving (stages)."""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class ClassifierHead(nn.Module):
    """A classifier over sentence embeddings: ``linear`` (logistic regression) or ``mlp``."""

    def __init__(self, kind: str, input_dim: int, num_labels: int, hidden_dim: int = 256):
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(input_dim, num_labels)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(input_dim, hidden_dim),
                nn.GELU(),
                nn.Dropout(0.2),
                nn.Linear(hidden_dim, num_labels),
            )
        else:
            raise ValueError(f"unknown head kind {kind!r}: expected 'linear' or 'mlp'")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClassifierHead:
        return cls(
            kind=config["kind"],
            input_dim=config["input_dim"],
            num_labels=len(config["labels"]),
            hidden_dim=config.get("hidden_dim", 256),
        )


def text_features(text: str) -> Counter[str]:
    """Word unigrams, word bigrams and character trigrams of a lowercased text."""
    words = _TOKEN.findall(text.lower())
    features: Counter[str] = Counter(f"w:{w}" for w in words)
    features.update(f"b:{a} {b}" for a, b in zip(words, words[1:], strict=False))
    for w in words:
        padded = f"<{w}>"
        features.update(f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2))
    return features


def hash_texts(
    texts: Sequence[str], num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hashed, log-scaled, L2-normalised features in ``nn.EmbeddingBag`` input form.

    ``zlib.crc32`` is stable across processes (Python's ``hash`` is salted per process).
    """
    indices: list[int] = []
    offsets: list[int] = []
    weights: list[float] = []
    for text in texts:
        offsets.append(len(indices))
        buckets: Counter[int] = Counter()
        for feature, count in text_features(text).items():
            buckets[zlib.crc32(feature.encode()) % num_buckets] += count
        values = np.log1p(np.fromiter(buckets.values(), dtype=np.float32, count=len(buckets)))
        norm = float(np.linalg.norm(values)) or 1.0
        indices.extend(buckets.keys())
        weights.extend((values / norm).tolist())
    return (
        torch.tensor(indices, dtype=torch.long),
        torch.tensor(offsets, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
    )


class HashedBagOfWords(nn.Module):
    """A linear model over hashed n-gram features: another model family, no transformer."""

    def __init__(self, num_buckets: int, num_labels: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.weights = nn.EmbeddingBag(num_buckets, num_labels, mode="sum")
        self.bias = nn.Parameter(torch.zeros(num_labels))
        nn.init.zeros_(self.weights.weight)

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.weights(indices, offsets, per_sample_weights=weights) + self.bias
