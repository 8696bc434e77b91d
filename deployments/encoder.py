"""Encoder stage: MiniLM-L6 sentence embeddings (mean pooling over the mask, L2-normalised).

The heaviest stage: in Serve it batches with ``@serve.batch`` and may sit on a GPU fraction; in Ray
Data it runs in an actor pool. Either way the weights are loaded once, in the constructor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from servecore.pipeline.batching import Batch
from servecore.pipeline.devices import resolve_device, set_torch_threads
from servecore.registry.client import open_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Weight precisions the encoder runs in. Half precision is for GPUs (the benchmark in
:mod:`bench.gpu` measures it); pooling and normalisation stay in float32 either way."""


def _as_matrix(column: np.ndarray) -> np.ndarray:
    """Token ids as a 2-D matrix; Ray Data may hand ragged rows as an object array."""
    if column.dtype != object and column.ndim == 2:
        return column
    rows = [np.asarray(r, dtype=np.int64) for r in column]
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def length_chunks(lengths: np.ndarray, max_rows: int) -> Iterator[tuple[np.ndarray, int]]:
    """Rows longest first, ``max_rows`` at a time, each chunk with its longest row's length: cut
    to that width, a chunk wastes little on padding."""
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), max_rows):
        rows = order[start : start + max_rows]
        yield rows, max(int(lengths[rows].max()), 1)


class Encoder:
    """Token ids → ``{"embedding": float32[n, 384], "num_tokens": int64[n]}``."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        max_rows_per_forward: int = 64,
        dtype: str = "float32",
    ) -> None:
        from transformers import AutoModel

        set_torch_threads(num_threads)
        self.model_ref, path = open_model(model_uri, model_dir, artifact="transformer")
        self.device = resolve_device(device)
        self.max_rows_per_forward = max_rows_per_forward
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        model = AutoModel.from_pretrained(str(path), dtype=self.dtype)
        self._model = model.to(self.device).eval()
        self.dimension = int(self._model.config.hidden_size)

    def __call__(self, batch: Batch) -> Batch:
        ids = _as_matrix(batch["input_ids"])
        mask = _as_matrix(batch["attention_mask"])
        lengths = mask.sum(axis=1)
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        with torch.inference_mode():
            for rows, width in length_chunks(lengths, self.max_rows_per_forward):
                chunk_ids = torch.from_numpy(ids[rows, :width]).to(self.device)
                chunk_mask = torch.from_numpy(mask[rows, :width]).to(self.device)
                hidden = self._model(input_ids=chunk_ids, attention_mask=chunk_mask)[0].float()
                weights = chunk_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                out[rows] = F.normalize(pooled, p=2, dim=1).cpu().numpy()
        return {"embedding": out, "num_tokens": lengths.astype(np.int64)}
