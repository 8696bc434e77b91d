"""The online/offline parity gate: the same texts through the running Serve app and the batch path.

Rows that the batch path rejects are not sent online (the API would refuse them too). The gate
fails when any label differs or any probability differs by more than the tolerance; the report
lists the worst rows first (label mismatches, then by largest probability difference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batch.adapter import probability_column
from batch.pipeline import BatchPipeline, JobOptions, configure_progress
from batch.plan import ID, TEXT
from servecore import LABELS
from servecore.api.schemas import MAX_TEXTS_PER_REQUEST

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class RowDifference:
    id: Any
    text: str
    offline_label: str
    online_label: str
    max_abs_diff: float

    @property
    def label_differs(self) -> bool:
        return self.offline_label != self.online_label


@dataclass
class ParityReport:
    rows: int
    tolerance: float
    label_mismatches: int
    probability_mismatches: int
    max_abs_diff: float
    worst: list[RowDifference] = field(default_factory=list)
    min_label_agreement: float = 1.0
    """Share of rows whose labels must agree: 1.0 (every one) for the same weights on both
    paths; a quantised profile's batches differ in their activation scales, so its gate allows
    what its accuracy gate justified (``--label-agreement 0.99``)."""

    @property
    def label_agreement(self) -> float:
        return 1.0 - self.label_mismatches / self.rows if self.rows else 1.0

    @property
    def ok(self) -> bool:
        return self.label_agreement >= self.min_label_agreement and self.probability_mismatches == 0

    def format(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        lines = [
            f"parity {verdict}: {self.rows} rows, {self.label_mismatches} label mismatches, "
            f"{self.probability_mismatches} rows with a probability off by more than "
            f"{self.tolerance:g}; largest difference {self.max_abs_diff:.3g}"
        ]
        if self.min_label_agreement < 1.0:
            lines.append(
                f"label agreement {self.label_agreement:.4f} (at least "
                f"{self.min_label_agreement:g} required)"
            )
        if self.worst:
            lines.append("worst rows (id | offline label | online label | max |diff| | text):")
            for row in self.worst:
                text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
                lines.append(
                    f"  {row.id} | {row.offline_label} | {row.online_label} | "
                    f"{row.max_abs_diff:.3g} | {text!r}"
                )
        return "\n".join(lines)


def compare(
    ids: Sequence[Any],
    texts: Sequence[str],
    offline_labels: Sequence[str],
    offline_probs: np.ndarray,
    online_labels: Sequence[str],
    online_probs: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    worst: int = 10,
    min_label_agreement: float = 1.0,
) -> ParityReport:
    """Row i of the offline results against row i of the online ones (probabilities ``[n, labels]``
    in the same label order)."""
    offline = np.asarray(offline_probs, dtype=np.float64)
    online = np.asarray(online_probs, dtype=np.float64)
    if offline.shape != online.shape or len(offline_labels) != len(online_labels):
        raise ValueError(f"result shapes differ: offline {offline.shape}, online {online.shape}")
    diffs = np.abs(offline - online).max(axis=1) if len(offline) else np.zeros(0)
    labels_differ = np.array(
        [a != b for a, b in zip(offline_labels, online_labels, strict=True)], dtype=bool
    )
    off = diffs > tolerance
    order = sorted(range(len(diffs)), key=lambda i: (not labels_differ[i], -diffs[i]))
    shown = [i for i in order if labels_differ[i] or off[i]][:worst]
    return ParityReport(
        rows=len(diffs),
        tolerance=tolerance,
        label_mismatches=int(labels_differ.sum()),
        probability_mismatches=int(off.sum()),
        max_abs_diff=float(diffs.max()) if len(diffs) else 0.0,
        worst=[
            RowDifference(
                ids[i], texts[i], str(offline_labels[i]), str(online_labels[i]), float(diffs[i])
            )
            for i in shown
        ],
        min_label_agreement=min_label_agreement,
    )


def predict_online(
    url: str, texts: Sequence[str], timeout_s: float = 60.0
) -> tuple[list[str], np.ndarray]:
    """Labels and ``[n, labels]`` probabilities from ``POST {url}/v1/predict``, 64 texts a call."""
    import httpx

    labels: list[str] = []
    probs: list[list[float]] = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        for start in range(0, len(texts), MAX_TEXTS_PER_REQUEST):
            chunk = list(texts[start : start + MAX_TEXTS_PER_REQUEST])
            response = client.post("/v1/predict", json={"texts": chunk})
            response.raise_for_status()
            for prediction in response.json()["predictions"]:
                labels.append(prediction["label"])
                probs.append([float(prediction["probabilities"][label]) for label in LABELS])
    return labels, np.asarray(probs, dtype=np.float64).reshape(len(labels), len(LABELS))


def run_parity(
    options: JobOptions,
    url: str,
    tolerance: float = DEFAULT_TOLERANCE,
    worst: int = 10,
    timeout_s: float = 60.0,
    min_label_agreement: float = 1.0,
) -> ParityReport:
    """Score ``options.input`` offline (kept in memory) and online, and compare row by row."""
    options.keep_text = True
    configure_progress(options.progress)
    pipeline = BatchPipeline.prepare(options)
    offline = pipeline.predictions().to_pandas()
    logger.info("batch path scored %d rows; sending them to %s", len(offline), url)
    texts = offline[TEXT].tolist()
    online_labels, online_probs = predict_online(url, texts, timeout_s)
    offline_probs = offline[[probability_column(label) for label in LABELS]].to_numpy()
    return compare(
        offline[ID].tolist(),
        texts,
        offline["label"].tolist(),
        offline_probs,
        online_labels,
        online_probs,
        tolerance=tolerance,
        worst=worst,
        min_label_agreement=min_label_agreement,
    )
