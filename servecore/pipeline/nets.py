"""Torch modules of the trained models, shared by training (bootstrap) and serving (stages)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from servecore.pipeline.features import hashed_features, text_features

__all__ = ["ClassifierHead", "HashedBagOfWords", "hash_texts", "text_features"]


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


def hash_texts(
    texts: Sequence[str], num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`servecore.pipeline.features.hashed_features` in ``nn.EmbeddingBag`` input form."""
    indices, offsets, weights = hashed_features(texts, num_buckets)
    return torch.from_numpy(indices), torch.from_numpy(offsets), torch.from_numpy(weights)


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
