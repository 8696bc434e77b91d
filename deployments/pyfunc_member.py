"""Any MLflow pyfunc model as an ensemble member on raw text.

A team registers its own model (scikit-learn, a custom ``PythonModel``, ...) as a pyfunc and adds it
to the pipeline spec with ``flavor: pyfunc``; this class runs it in the member's stage, in Serve and
in Ray Data alike. The model is fed ``DataFrame({"text": [...]})`` and may answer with

* a 2-D array or DataFrame of probabilities, one column per label: the column order is the
  member's ``labels``, else the model's ``labels`` metadata, else a DataFrame's column names, else
  the service's label order;
* or one label per row, taken as a probability of one for that label.

Rows are renormalised to sum to one. Labels the service does not know make the stage fail at load
(when the order is known) or at the call, never silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from deployments.pyfunc_model import load_pyfunc
from servecore import LABELS
from servecore.pipeline.batching import Batch


def to_probabilities(
    output: Any, columns: Sequence[str] | None, labels: Sequence[str]
) -> np.ndarray:
    """A pyfunc model's output as ``float32[n, len(labels)]`` in ``labels`` order."""
    import pandas as pd

    if isinstance(output, pd.DataFrame) and columns is None:
        columns = [str(c) for c in output.columns]
    array = np.asarray(
        output.to_numpy() if isinstance(output, pd.DataFrame | pd.Series) else output
    )
    if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1 and array.dtype == object):
        names = [str(v) for v in array.reshape(-1)]
        unknown = sorted(set(names) - set(labels))
        if unknown:
            raise ValueError(f"the model predicted labels the service does not know: {unknown}")
        probs = np.zeros((len(names), len(labels)), dtype=np.float32)
        for row, name in enumerate(names):
            probs[row, list(labels).index(name)] = 1.0
        return probs
    if array.ndim != 2:
        raise ValueError(f"expected probabilities per row, got an array of shape {array.shape}")
    columns = list(columns) if columns is not None else list(labels)
    if len(columns) != array.shape[1] or set(columns) != set(labels):
        raise ValueError(
            f"the model returns {array.shape[1]} columns {columns}; the service's labels are "
            f"{list(labels)}"
        )
    probs = array.astype(np.float32)[:, [columns.index(label) for label in labels]]
    totals = probs.sum(axis=1, keepdims=True)
    if np.any(~np.isfinite(probs)) or np.any(probs < 0) or np.any(totals <= 0):
        raise ValueError("the model returned negative, non-finite or all-zero probabilities")
    return probs / totals


class PyfuncMember:
    """``{"text": str[n]}`` → ``{"probs": float32[n, labels]}`` through an MLflow pyfunc model."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.model_ref, self.model, load_uri = load_pyfunc(model_uri, model_dir)
        self.labels: tuple[str, ...] = tuple(LABELS)
        metadata = getattr(self.model, "metadata", None)
        stored = (getattr(metadata, "metadata", None) or {}).get("labels")
        self.columns: list[str] | None = list(labels or stored or []) or None
        if self.columns is not None and set(self.columns) != set(self.labels):
            raise ValueError(
                f"pyfunc member {load_uri}: its labels {self.columns} are not the service's "
                f"{list(self.labels)}"
            )

    def __call__(self, batch: Batch) -> Batch:
        import pandas as pd

        texts = [str(t) for t in batch["text"]]
        output = self.model.predict(pd.DataFrame({"text": texts}))
        return {"probs": to_probabilities(output, self.columns, self.labels)}
