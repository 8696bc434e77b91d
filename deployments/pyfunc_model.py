"""Any MLflow pyfunc model as a stage: the generic application's model (``graphs/model.py``).

``PyfuncModel(model_uri)`` loads the model once (any flavor that ``mlflow.pyfunc`` loads:
scikit-learn, XGBoost, a ``PythonModel``, torch, ...) and maps a batch of rows to a batch of
outputs: ``dict[str, np.ndarray]`` in, ``dict[str, np.ndarray]`` out, rows on axis 0, as every
stage of the project does, so Serve (``deployments/stage.py``) and Ray Data (``python -m batch``)
run the same class on the same batch.

What ``predict`` is given follows the model's signature (:mod:`servecore.signature`): a DataFrame
of the signature's columns in its order and dtypes, or the tensor(s) of a tensor signature. Its
answer becomes output columns: a DataFrame's columns, a dict's entries, or for an array one column
named ``predictions`` (the fronts give it the signature's name where a protocol names outputs).
A model logged without a signature is refused at load with the reason.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from servecore.errors import RegistryError
from servecore.pipeline.batching import Batch
from servecore.registry.client import ModelRef, resolve
from servecore.signature import PREDICTIONS, schema_of


def output_columns(output: Any) -> Batch:
    """``predict``'s answer as columns with one entry per row."""
    import pandas as pd

    if isinstance(output, pd.DataFrame):
        return {str(c): _column(output[c].to_numpy()) for c in output.columns}
    if isinstance(output, dict):
        return {str(k): _column(np.asarray(v)) for k, v in output.items()}
    if isinstance(output, pd.Series):
        output = output.to_numpy()
    # Named "predictions" whatever the signature calls it: the gateway answers /invocations with
    # a list for it, as MLflow's server answers an array, and names it after the signature in
    # OIP (servecore.signature.named_outputs).
    return {PREDICTIONS: _column(np.asarray(output))}


def _column(array: np.ndarray) -> np.ndarray:
    if array.ndim == 0:
        array = array.reshape(1)
    if array.dtype.kind in "USO":  # strings (and objects) travel as Python objects
        array = array.astype(object)
    return array


def load_pyfunc(
    model_uri: str | None, model_dir: str | os.PathLike[str] | None
) -> tuple[ModelRef, Any, str]:
    """A pyfunc model from a registry URI (resolved to its exact version first) or a folder:
    the reference answers name, the loaded model, and the URI it was loaded from. A loader
    failure is a :class:`~servecore.errors.RegistryError`."""
    import mlflow.pyfunc

    from servecore.registry.client import configure_mlflow

    if (model_uri is None) == (model_dir is None):
        raise ValueError("give exactly one of model_uri or model_dir")
    if model_uri is not None:
        configure_mlflow()
        ref = resolve(model_uri)
        load_uri = f"models:/{ref.name}/{ref.version}"
    else:
        ref = ModelRef.local(model_dir)  # type: ignore[arg-type]
        load_uri = str(model_dir)
    try:
        return ref, mlflow.pyfunc.load_model(load_uri), load_uri
    except Exception as e:  # noqa: BLE001 - any loader failure is a registry problem here
        raise RegistryError(f"cannot load pyfunc model {load_uri}: {e}") from e


class PyfuncModel:
    """Rows (the signature's inputs) → outputs, through ``mlflow.pyfunc``."""

    def __init__(
        self,
        model_uri: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.model_ref, self.model, load_uri = load_pyfunc(model_uri, model_dir)
        self.schema = schema_of(self.model.metadata.signature, load_uri)
        torch = sys.modules.get("torch")
        if num_threads is not None and torch is not None:  # a torch flavor: one thread per CPU
            torch.set_num_threads(num_threads)

    def model_input(self, batch: Batch) -> Any:
        """What ``predict`` takes for these rows."""
        import pandas as pd

        if self.schema.kind == "tensors":
            if self.schema.unnamed_input:
                return batch[self.schema.inputs[0].name]
            return {name: batch[name] for name in self.schema.input_names if name in batch}
        return pd.DataFrame(
            {name: batch[name] for name in self.schema.input_names if name in batch}
        )

    def __call__(self, batch: Batch) -> Batch:
        return output_columns(self.model.predict(self.model_input(batch)))
