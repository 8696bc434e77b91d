"""A second shipped example model: benign or malignant, from scikit-learn's breast-cancer data.

The data is the Wisconsin Diagnostic Breast Cancer set, which ships inside scikit-learn
(``sklearn.datasets.load_breast_cancer``; no download): 569 rows, one per breast mass, each with
30 real-valued features computed from a digitized image of a fine needle aspirate (mean, standard
error and worst value of ten measurements of the cell nuclei: radius, texture, perimeter, area,
smoothness, compactness, concavity, concave points, symmetry, fractal dimension). The target is
the diagnosis, 212 malignant and 357 benign. :func:`load_frame` names the feature columns in
snake_case (``mean radius`` → ``mean_radius``) and adds the label column ``diagnosis`` as the
strings ``"malignant"`` / ``"benign"``.

The split is fixed: a stratified ``train_test_split`` with ``random_state=SEED`` (13) and
``test_size=TEST_SIZE`` (0.25), i.e. 426 training and 143 test rows. The model is a scikit-learn
pipeline (``StandardScaler`` then ``LogisticRegression``) whose ``predict`` returns the label
strings.

:func:`register` (idempotent: nothing happens while ``breast-cancer@champion`` exists) logs one
MLflow run to the configured experiment with

* params: model type, ``C``, ``max_iter``, seed and test size;
* metrics: ``test_accuracy``, ``test_f1_malignant`` and ``test_roc_auc`` (malignant positive);
* artifacts ``reference/train.parquet`` and ``reference/test.parquet`` (features and label);
* the training data as an MLflow dataset input (context ``training``);
* the model (sklearn flavor, column-based signature of the 30 double features → string label),
  registered as ``breast-cancer``, aliased ``champion`` and tagged ``reference_data`` (the
  ``runs:/`` URI of the training parquet, a drift reference) and ``label_column``.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servecore.registry.client import get_client

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.pipeline import Pipeline

logger = logging.getLogger(__name__)

MODEL_NAME = "breast-cancer"
ALIAS = "champion"
SEED = 13
TEST_SIZE = 0.25
LABEL = "diagnosis"
POSITIVE = "malignant"
C = 1.0
MAX_ITER = 1000
METRICS = ("test_accuracy", "test_f1_malignant", "test_roc_auc")


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def load_frame() -> pd.DataFrame:
    """The 569 rows: 30 float64 snake_case feature columns, then ``LABEL`` as strings."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    features = bunch.data.rename(columns=_snake).astype("float64")
    names = [str(name) for name in bunch.target_names]  # index 0 malignant, 1 benign
    frame = features.copy()
    frame[LABEL] = [names[int(code)] for code in bunch.target]
    return frame


def feature_names() -> list[str]:
    """The 30 feature columns of :func:`load_frame`, in order."""
    from sklearn.datasets import load_breast_cancer

    return [_snake(str(name)) for name in load_breast_cancer().feature_names]


def split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fixed stratified (train, test) split of ``frame``, features and label, index reset."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        frame, test_size=TEST_SIZE, random_state=SEED, stratify=frame[LABEL]
    )
    return train.reset_index(drop=True), test.reset_index(drop=True)


def train(train_frame: pd.DataFrame) -> Pipeline:
    """Standardize, then logistic regression: features → label strings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=MAX_ITER))
    model.fit(train_frame[feature_names()], train_frame[LABEL])
    return model


def evaluate(model: Any, test_frame: pd.DataFrame) -> dict[str, float]:
    """Accuracy, F1 and ROC AUC on ``test_frame``, malignant as the positive class."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    x, y = test_frame[feature_names()], test_frame[LABEL].astype(str).to_numpy()
    predicted = model.predict(x)
    positive = list(model.classes_).index(POSITIVE)
    scores = model.predict_proba(x)[:, positive]
    return {
        "test_accuracy": float(accuracy_score(y, predicted)),
        "test_f1_malignant": float(f1_score(y, predicted, pos_label=POSITIVE)),
        "test_roc_auc": float(roc_auc_score(y == POSITIVE, scores)),
    }


def has_champion(client: MlflowClient) -> bool:
    """Whether ``breast-cancer@champion`` exists; an unreachable registry raises."""
    from servecore.registry.client import has_alias

    return has_alias(client, MODEL_NAME, ALIAS)


def register(client: MlflowClient | None = None) -> dict[str, Any]:
    """Train, log and register ``breast-cancer@champion`` unless it exists (idempotent).

    Returns ``{"registered": bool, "version": str, "metrics": {...}}``; when the champion already
    exists the metrics are those stored with its run.
    """
    client = client or get_client()
    if has_champion(client):
        mv = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
        stored = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        metrics = {k: float(stored[k]) for k in METRICS if k in stored}
        return {"registered": False, "version": str(mv.version), "metrics": metrics}

    import mlflow
    import mlflow.data
    import mlflow.sklearn
    import pandas as pd
    import sklearn
    from mlflow.models import infer_signature

    # The fluent API below must write where ``client`` reads.
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)
    from servecore.registry.client import experiment_id

    experiment = experiment_id(client)

    train_frame, test_frame = split(load_frame())
    model = train(train_frame)
    metrics = evaluate(model, test_frame)
    x_train = train_frame[feature_names()]
    signature = infer_signature(x_train, pd.Series(model.predict(x_train), name=LABEL))

    with mlflow.start_run(experiment_id=experiment, run_name=MODEL_NAME) as run:
        mlflow.log_params(
            {
                "model_type": "StandardScaler+LogisticRegression",
                "C": C,
                "max_iter": MAX_ITER,
                "seed": SEED,
                "test_size": TEST_SIZE,
            }
        )
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for part, frame in (("train", train_frame), ("test", test_frame)):
                path = Path(tmp) / f"{part}.parquet"
                frame.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), artifact_path="reference")
        dataset = mlflow.data.from_pandas(train_frame, targets=LABEL, name=f"{MODEL_NAME}-train")
        mlflow.log_input(dataset, context="training")
        info = mlflow.sklearn.log_model(
            sk_model=model,
            name=MODEL_NAME,
            signature=signature,
            input_example=x_train.head(3),
            registered_model_name=MODEL_NAME,
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", "pandas", "numpy"],
        )
        run_id = run.info.run_id

    version = str(info.registered_model_version)
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    client.set_model_version_tag(
        MODEL_NAME, version, "reference_data", f"runs:/{run_id}/reference/train.parquet"
    )
    client.set_model_version_tag(MODEL_NAME, version, "label_column", LABEL)
    logger.info("registered %s version %s as @%s: %s", MODEL_NAME, version, ALIAS, metrics)
    return {"registered": True, "version": version, "metrics": metrics}
