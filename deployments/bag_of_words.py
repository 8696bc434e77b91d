"""Bag-of-words stage: a hashed n-gram linear model on raw text — a second model family.

It needs no transformer, so it runs beside the encoder path and is a natural fallback.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from servecore.pipeline.batching import Batch
from servecore.pipeline.devices import set_torch_threads
from servecore.pipeline.nets import HashedBagOfWords, hash_texts
from servecore.registry.client import open_model


class BagOfWords:
    """``{"text": str[n]}`` → ``{"probs": float32[n, labels]}``."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        set_torch_threads(num_threads)
        self.model_ref, path = open_model(model_uri, model_dir, artifact="bow")
        config = json.loads((path / "config.json").read_text())
        self.labels: tuple[str, ...] = tuple(config["labels"])
        self._net = HashedBagOfWords(config["num_buckets"], len(self.labels))
        self._net.load_state_dict(load_file(str(path / "weights.safetensors")))
        self._net.eval()

    def __call__(self, batch: Batch) -> Batch:
        features = hash_texts([str(t) for t in batch["text"]], self._net.num_buckets)
        with torch.inference_mode():
            probs = torch.softmax(self._net(*features), dim=-1)
        return {"probs": probs.numpy()}
