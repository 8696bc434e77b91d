"""The bag-of-words model's text features, in plain Python and numpy (no torch).

Shared by the model itself (:func:`servecore.pipeline.nets.hash_texts` wraps these arrays for
``nn.EmbeddingBag``) and by the edge bundle's predictor, which copies this file beside itself:
a device hashes exactly as the server does.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def text_features(text: str) -> Counter[str]:
    """Word unigrams, word bigrams and character trigrams of a lowercased text."""
    words = _TOKEN.findall(text.lower())
    features: Counter[str] = Counter(f"w:{w}" for w in words)
    features.update(f"b:{a} {b}" for a, b in zip(words, words[1:], strict=False))
    for w in words:
        padded = f"<{w}>"
        features.update(f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2))
    return features


def hashed_features(
    texts: Sequence[str], num_buckets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hashed, log-scaled, L2-normalised features: bucket ``indices`` (int64), each text's first
    position in them (``offsets``, int64) and the ``weights`` (float32).

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
        np.asarray(indices, dtype=np.int64),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(weights, dtype=np.float32),
    )
