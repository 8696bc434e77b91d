"""ONNX encoder stage: the edge bundle's encoder (MiniLM-L6 with pooling and normalisation inside
the graph; fp32 or int8) on onnxruntime, a drop-in for :class:`deployments.encoder.Encoder`.

Chosen in the pipeline spec with ``encoder: {runtime: onnx, model_uri: models:/intent-edge@edge}``
(``serve_config.onnx.yaml``); the same plain class then runs in the Serve graph and in Ray Data.
It takes the tokenizer stage's output and gives the same columns as the torch encoder.
"""

from __future__ import annotations

import os

import numpy as np

from deployments.encoder import _as_matrix, length_chunks
from servecore.pipeline.batching import Batch
from servecore.registry.client import open_model


def granted_threads(num_threads: int | None) -> int:
    """Threads for onnxruntime: as asked, else the CPUs Ray granted this process, else all."""
    if num_threads:
        return num_threads
    granted = os.environ.get("OMP_NUM_THREADS")
    return int(granted) if granted and granted.isdigit() else (os.cpu_count() or 1)


class OnnxEncoder:
    """Token ids → ``{"embedding": float32[n, 384], "num_tokens": int64[n]}``."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        num_threads: int | None = None,
        max_rows_per_forward: int = 64,
    ) -> None:
        import onnxruntime as ort

        self.model_ref, path = open_model(model_uri, model_dir, artifact="bundle")
        options = ort.SessionOptions()
        options.intra_op_num_threads = granted_threads(num_threads)
        self._session = ort.InferenceSession(
            str(path / "encoder.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.max_rows_per_forward = max_rows_per_forward
        self.dimension = int(self._session.get_outputs()[0].shape[-1])

    def __call__(self, batch: Batch) -> Batch:
        ids = _as_matrix(batch["input_ids"])
        mask = _as_matrix(batch["attention_mask"])
        lengths = mask.sum(axis=1)
        out = np.empty((len(ids), self.dimension), dtype=np.float32)
        for rows, width in length_chunks(lengths, self.max_rows_per_forward):
            feed = {
                "input_ids": np.ascontiguousarray(ids[rows, :width], dtype=np.int64),
                "attention_mask": np.ascontiguousarray(mask[rows, :width], dtype=np.int64),
            }
            (embedding,) = self._session.run(None, feed)
            out[rows] = embedding
        return {"embedding": out, "num_tokens": lengths.astype(np.int64)}
