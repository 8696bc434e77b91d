"""MLflow pyfunc wrappers of the shipped models, so each registered version is usable on its own.

``mlflow.pyfunc.load_model("models:/intent-head-mlp@champion").predict(embeddings)`` works anywhere
this package is installed. ``predict`` carries no type hints on purpose: MLflow would try to derive
a schema from them, while each model is logged with an explicit signature. The serving stages do not
go through pyfunc: they read the same artifacts directly (see
:func:`servecore.registry.client.open_model`). Imported only by the bootstrap and by MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from servecore.pipeline.batching import text_batch


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        return [str(t) for t in model_input["text"]]
    return [str(t) for t in np.asarray(model_input).reshape(-1)]


class EncoderModel(PythonModel):
    """texts (a ``text`` column) → L2-normalised MiniLM embeddings."""

    def load_context(self, context: Any) -> None:
        from deployments.encoder import Encoder
        from deployments.tokenizer import Tokenizer

        folder = context.artifacts["transformer"]
        self.tokenizer = Tokenizer(model_dir=folder)
        self.encoder = Encoder(model_dir=folder)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints
        return self.encoder(self.tokenizer(text_batch(_texts(model_input))))["embedding"]


class HeadModel(PythonModel):
    """embeddings ``float32[n, 384]`` → label probabilities ``float32[n, 6]``."""

    def load_context(self, context: Any) -> None:
        from deployments.heads import ClassifierHead

        self.head = ClassifierHead(model_dir=context.artifacts["head"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints
        embeddings = np.asarray(model_input, dtype=np.float32)
        return self.head({"embedding": embeddings})["probs"]


class BagOfWordsModel(PythonModel):
    """texts (a ``text`` column) → label probabilities ``float32[n, 6]``."""

    def load_context(self, context: Any) -> None:
        from deployments.bag_of_words import BagOfWords

        self.model = BagOfWords(model_dir=context.artifacts["bow"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints
        return self.model(text_batch(_texts(model_input)))["probs"]


class EdgeBundleModel(PythonModel):
    """texts (a ``text`` column) → label probabilities ``float32[n, 6]``, through an edge bundle
    (ONNX files on onnxruntime: :class:`edge.predictor.EdgePredictor`)."""

    def load_context(self, context: Any) -> None:
        from edge.predictor import EdgePredictor

        self.predictor = EdgePredictor(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - MLflow reads hints
        return self.predictor.probabilities(_texts(model_input))
