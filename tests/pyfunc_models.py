"""MLflow ``PythonModel`` fakes for the generic model application's tests: importable by the
Serve replicas (the session puts the project on their ``PYTHONPATH``), so MLflow pickles them by
reference. Imports MLflow at import time: only tests that log these import this module."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np


class PickyFraudModel(mlflow.pyfunc.PythonModel):
    """Flags amounts over 100; raises for any amount over 1000 (a primary that fails on some
    inputs, for the fallback)."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        if (model_input["amount"] > 1000).any():
            raise ValueError("amount out of the trained range")
        return np.where(model_input["amount"] > 100, "fraud", "ok")


class BrokenFraudModel(mlflow.pyfunc.PythonModel):
    """Loads, and fails every prediction (a version that must never be served)."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        raise RuntimeError("this version is broken")
