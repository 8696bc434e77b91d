"""Tokenizer stage: texts → token ids, on the CPU. Loads from the encoder's registered model."""

from __future__ import annotations

import os

import numpy as np

from servecore.pipeline.batching import Batch
from servecore.registry.client import open_model


class Tokenizer:
    """``{"text": str[n]}`` → ``{"input_ids": int64[n, L], "attention_mask": int64[n, L]}``.

    ``L`` is the longest text of the batch (capped at ``max_length``), so short batches stay short.
    """

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        max_length: int = 256,
    ) -> None:
        from transformers import AutoTokenizer

        self.model_ref, path = open_model(model_uri, model_dir, artifact="transformer")
        self.max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))

    def __call__(self, batch: Batch) -> Batch:
        encoded = self._tokenizer(
            [str(t) for t in batch["text"]],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
            return_token_type_ids=False,
        )
        return {
            "input_ids": encoded["input_ids"].astype(np.int64, copy=False),
            "attention_mask": encoded["attention_mask"].astype(np.int64, copy=False),
        }
