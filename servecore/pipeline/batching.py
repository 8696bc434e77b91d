"""Helpers for the one batch layout every stage speaks: ``dict[str, np.ndarray]``, rows on axis 0.

Online, single requests are gathered into one such batch and split back afterwards; offline, Ray
Data hands the same layout to the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Batch = dict[str, np.ndarray]


def num_rows(batch: Batch) -> int:
    if not batch:
        return 0
    return len(next(iter(batch.values())))


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches row-wise.

    Two-dimensional columns of different widths (token ids padded to each request's longest text)
    are right-padded with zeros to the widest, which is the pad id and the masked value for BERT
    tokenizers.
    """
    if len(batches) == 1:
        return dict(batches[0])
    keys = batches[0].keys()
    out: Batch = {}
    for key in keys:
        columns = [b[key] for b in batches]
        if all(c.ndim == 2 for c in columns) and len({c.shape[1] for c in columns}) > 1:
            width = max(c.shape[1] for c in columns)
            columns = [np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in columns]
        out[key] = np.concatenate(columns, axis=0)
    return out


def split_batch(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Inverse of :func:`concat_batches` for row counts ``sizes`` (padding is kept)."""
    bounds = np.cumsum([0, *sizes])
    return [{k: v[bounds[i] : bounds[i + 1]] for k, v in batch.items()} for i in range(len(sizes))]


def text_batch(texts: Sequence[str]) -> Batch:
    arr = np.empty(len(texts), dtype=object)
    arr[:] = list(texts)
    return {"text": arr}
