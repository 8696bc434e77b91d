"""Input drift: a reference profile of what a model release saw in training, and how far a window
of live traffic has moved from it. Plain numpy, no Ray: :mod:`batch.reference` computes profiles
with Ray Data, :mod:`deployments.monitor` scores live windows.

Two signals, each a number in [0, 1] (0 = same distribution, 1 = disjoint):

``embedding``
    Every text gets one score: the cosine similarity of its sentence embedding to the nearest
    *label centroid* (the mean training embedding of each intent). In-domain texts sit close to
    one intent; text from another domain is far from all of them. The drift score is the
    two-sample Kolmogorov-Smirnov statistic between the window's scores and the reference scores
    (the training texts' own scores, each computed leave-one-out, i.e. against centroids without
    that text, so that the reference is not optimistic compared with texts never seen).
``label``
    Total variation distance between the window's predicted-label distribution and the one the
    pipeline predicted on the training data.

A signal alarms when its score exceeds its threshold (defaults 0.3 and 0.3) once the window holds
at least ``min_samples`` texts. KS is an effect size here, not a significance test: with large
windows tiny, harmless shifts are significant, and a fixed threshold on D does not move with
traffic volume. Under no drift, D of a window of n texts against a large reference stays below
1.63/sqrt(n) 99% of the time (0.16 for n=100), so 0.3 leaves room for noise.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

REFERENCE_TAG = "drift_reference"
"""Model-version tag holding the artifact URI of the version's reference profile."""
REFERENCE_ARTIFACT = "drift/reference.json"
QUANTILES = 1001
"""Reference scores are stored as this many quantiles (exact for smaller training sets)."""


class ReferenceProfile(BaseModel):
    """What a release's inputs looked like in training (stored as JSON in MLflow)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    computed_at: str
    release: dict[str, str]
    """Stage → ``name/version`` of every registered model the profile was computed with."""
    encoder: str
    """Pinned URI of the encoder (``models:/intent-encoder/1``): embeddings depend on it."""
    rows: int
    labels: list[str]
    centroids: list[list[float]]
    """Unit-length mean training embedding per label, in ``labels`` order."""
    similarity: list[float]
    """Sorted reference scores (leave-one-out nearest-centroid similarity), or their quantiles."""
    label_distribution: dict[str, float]
    """Share of each predicted label over the training data."""

    def centroid_matrix(self) -> np.ndarray:
        return np.asarray(self.centroids, dtype=np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def nearest_centroid_similarity(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row to its most similar centroid."""
    sims = _unit(np.asarray(embeddings, dtype=np.float32)) @ centroids.T
    return sims.max(axis=1)


def label_shares(labels: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    counts = collections.Counter(str(label) for label in labels)
    total = max(sum(counts.values()), 1)
    return {name: counts.get(name, 0) / total for name in names}


def build_profile(
    embeddings: np.ndarray,
    true_labels: Sequence[str],
    predicted_labels: Sequence[str],
    labels: Sequence[str],
    *,
    release: dict[str, str],
    encoder: str,
) -> ReferenceProfile:
    """The profile of training data: centroids per true label, leave-one-out reference scores,
    predicted-label shares."""
    x = _unit(np.asarray(embeddings, dtype=np.float64))
    if len(x) != len(true_labels) or len(x) != len(predicted_labels):
        raise ValueError("embeddings, true labels and predicted labels differ in length")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(t) for t in true_labels} - set(index))
    if unknown:
        raise ValueError(f"training labels {unknown} are not among {list(labels)}")
    y = np.asarray([index[str(t)] for t in true_labels])
    counts = np.bincount(y, minlength=len(labels))
    if (counts < 2).any():
        raise ValueError("every label needs at least two training texts for a profile")
    sums = np.zeros((len(labels), x.shape[1]))
    np.add.at(sums, y, x)
    centroids = _unit(sums / counts[:, None])
    similarity = x @ centroids.T
    # Each text's own label: the centroid of the *other* texts of that label.
    own = _unit(sums[y] - x)
    similarity[np.arange(len(x)), y] = np.einsum("ij,ij->i", x, own)
    scores = np.sort(similarity.max(axis=1))
    if len(scores) > QUANTILES:
        scores = np.quantile(scores, np.linspace(0.0, 1.0, QUANTILES))
    return ReferenceProfile(
        computed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        release=dict(release),
        encoder=encoder,
        rows=len(x),
        labels=list(labels),
        centroids=centroids.astype(np.float32).tolist(),
        similarity=[float(s) for s in scores],
        label_distribution=label_shares(predicted_labels, labels),
    )


def ks_statistic(sample: Sequence[float], reference_sorted: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a = np.sort(np.asarray(sample, dtype=np.float64))
    b = np.asarray(reference_sorted, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return 0.0
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


class DriftSettings(BaseModel):
    """Live knobs of drift scoring (part of the monitor's ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    window_size: int = Field(default=500, ge=10, le=1_000_000)
    """Most recent scored texts the signals are computed over."""
    min_samples: int = Field(default=100, ge=10, le=1_000_000)
    """No alarm (status ``warming_up``) until the window holds this many texts."""
    embedding_threshold: float = Field(default=0.3, gt=0.0, le=1.0)
    label_threshold: float = Field(default=0.3, gt=0.0, le=1.0)


class DriftWindow:
    """The sliding window of live texts: (nearest-centroid similarity, predicted label)."""

    def __init__(self, profile: ReferenceProfile, size: int) -> None:
        self.profile = profile
        self.centroids = profile.centroid_matrix()
        self.scores: collections.deque[float] = collections.deque(maxlen=size)
        self.labels: collections.deque[str] = collections.deque(maxlen=size)
        self.seen = 0

    def resize(self, size: int) -> None:
        self.scores = collections.deque(self.scores, maxlen=size)
        self.labels = collections.deque(self.labels, maxlen=size)

    def add(self, embeddings: np.ndarray, labels: Sequence[str]) -> None:
        similarity = nearest_centroid_similarity(embeddings, self.centroids)
        self.scores.extend(float(s) for s in similarity)
        self.labels.extend(str(label) for label in labels)
        self.seen += len(labels)

    def report(self, settings: DriftSettings) -> dict[str, Any]:
        n = len(self.scores)
        ready = n >= settings.min_samples
        live = label_shares(list(self.labels), self.profile.labels)
        embedding = ks_statistic(list(self.scores), self.profile.similarity) if n else 0.0
        label = total_variation(live, self.profile.label_distribution) if n else 0.0
        signals = {
            "embedding": {
                "statistic": "kolmogorov_smirnov(nearest_centroid_cosine)",
                "score": embedding,
                "threshold": settings.embedding_threshold,
                "alarm": ready and embedding > settings.embedding_threshold,
                "live_median": float(np.median(self.scores)) if n else None,
                "reference_median": float(np.median(self.profile.similarity)),
            },
            "label": {
                "statistic": "total_variation(predicted_label)",
                "score": label,
                "threshold": settings.label_threshold,
                "alarm": ready and label > settings.label_threshold,
                "live": live,
                "reference": self.profile.label_distribution,
            },
        }
        alarm = any(s["alarm"] for s in signals.values())
        return {
            "status": "drift" if alarm else ("ok" if ready else "warming_up"),
            "alarm": alarm,
            "window": n,
            "window_size": self.scores.maxlen,
            "min_samples": settings.min_samples,
            "seen": self.seen,
            "signals": signals,
            "reference": {
                "encoder": self.profile.encoder,
                "release": self.profile.release,
                "rows": self.profile.rows,
                "computed_at": self.profile.computed_at,
            },
        }
