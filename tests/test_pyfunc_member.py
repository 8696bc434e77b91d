"""A user's own MLflow pyfunc model as an ensemble member: a real scikit-learn model registered in
the real (temporary) store, added to the pipeline spec by URI, and served by real Serve."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pandas as pd
import pytest

from deployments.pyfunc_member import PyfuncMember, to_probabilities
from servecore import LABELS
from servecore.config_check import load_app_spec
from servecore.dataset import load_split
from servecore.registry.client import configure_mlflow
from servecore.settings import get_settings
from tests.conftest import ROOT
from tests.fixtures import delete_app, fake_graph

NAME = "intent-sklearn"


def test_outputs_become_probabilities_in_the_services_label_order():
    labels = ["a", "b", "c"]
    probs = to_probabilities(np.array([[0.2, 0.8, 0.0]]), ["c", "a", "b"], labels)
    np.testing.assert_allclose(probs, [[0.8, 0.0, 0.2]])
    frame = pd.DataFrame({"b": [2.0], "a": [1.0], "c": [1.0]})
    np.testing.assert_allclose(to_probabilities(frame, None, labels), [[0.25, 0.5, 0.25]])
    one_hot = to_probabilities(np.array(["b", "a"], dtype=object), None, labels)
    np.testing.assert_allclose(one_hot, [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="does not know"):
        to_probabilities(np.array(["zzz"], dtype=object), None, labels)
    with pytest.raises(ValueError, match="columns"):
        to_probabilities(np.ones((1, 2)), None, labels)
    with pytest.raises(ValueError, match="negative"):
        to_probabilities(np.array([[-1.0, 1.0, 1.0]]), None, labels)


@pytest.fixture(scope="module")
def sklearn_model(registry) -> Iterator[str]:
    """TF-IDF + logistic regression on the training split, registered as a pyfunc that returns
    ``predict_proba`` (columns in ``classes_`` order, recorded as its ``labels`` metadata)."""
    import mlflow
    import mlflow.sklearn
    from sklearn.compose import make_column_transformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts, labels = load_split("train")
    pipeline = make_pipeline(
        make_column_transformer((TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), "text")),
        LogisticRegression(max_iter=1000),
    )
    pipeline.fit(pd.DataFrame({"text": texts}), labels)
    configure_mlflow()
    # The bootstrap's experiment keeps its artifacts beside the temporary store, not in ./mlruns.
    experiment = mlflow.get_experiment_by_name(get_settings().experiment_name)
    assert experiment is not None
    with mlflow.start_run(run_name=NAME, experiment_id=experiment.experiment_id):
        info = mlflow.sklearn.log_model(
            pipeline,
            name=NAME,
            registered_model_name=NAME,
            pyfunc_predict_fn="predict_proba",
            metadata={"labels": [str(c) for c in pipeline.classes_]},
            input_example=pd.DataFrame({"text": texts[:2]}),
            serialization_format="cloudpickle",
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", version)
    yield f"models:/{NAME}@champion"
    client.delete_registered_model(NAME)  # the registry is shared by the session


def test_the_member_class_scores_the_test_split(sklearn_model):
    member = PyfuncMember(model_uri=sklearn_model)
    assert member.model_ref.name == NAME
    texts, labels = load_split("test")
    probs = member({"text": np.asarray(texts, dtype=object)})["probs"]
    assert probs.shape == (len(texts), len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    predicted = [LABELS[i] for i in probs.argmax(1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, labels, strict=True)])
    assert accuracy > 0.75


@pytest.mark.serve
def test_a_pyfunc_member_added_by_uri_is_served_and_named(serve_instance, sklearn_model):
    """The member runs in the real stage wrapper and ensemble beside fake stages (so the app
    deploys in seconds): the others answer uniformly, so the ensemble's label is the member's."""
    from ray import serve

    from servecore.pipeline.spec import PipelineSpec

    args = load_app_spec(ROOT / "serve_config.yaml", "intent").model_dump()
    args["members"].append(
        {
            "name": "sk",
            "deployment": "SklearnText",
            "input": "text",
            "flavor": "pyfunc",
            "model_uri": sklearn_model,
        }
    )
    args["ensemble"]["weights"]["sk"] = 0.25
    # A deployment of its own (its libraries need not share a process with torch): the shipped
    # Pipeline group then reads the member's column from it.
    args["groups"].append({"name": "SklearnText", "stages": ["SklearnText"]})
    spec = PipelineSpec.model_validate(args)
    serve.run(fake_graph(spec), name="pyfunc", route_prefix="/pyfunc")
    try:
        texts = ["I was charged twice for the same order", "my parcel never arrived"]
        response = httpx.post(
            f"{serve_instance.base_url}/pyfunc/v1/predict", json={"texts": texts}, timeout=60
        )
        assert response.status_code == 200, response.text
        body = response.json()
        models = {m["stage"]: m for m in body["models"]}
        assert models["SklearnText"]["name"] == NAME
        assert models["SklearnText"]["uri"] == sklearn_model
        member = PyfuncMember(model_uri=sklearn_model)
        expected = member({"text": np.asarray(texts, dtype=object)})["probs"]
        assert [p["label"] for p in body["predictions"]] == [LABELS[i] for i in expected.argmax(1)]
    finally:
        delete_app("pyfunc")
