"""Any registered MLflow model, served by configuration alone (``graphs.model:build_app``).

Two applications beside the intent pipeline, in the session's Serve instance:

* ``breast-cancer``, the shipped config's second application (the bootstrap's scikit-learn model on
  scikit-learn's Wisconsin data): its answers on the fixed test split equal ``mlflow.pyfunc`` in
  process, bad inputs get exact 4xx bodies in each protocol's shape, and per-feature drift shows.
* ``fraud``, a model this project does not ship: a scikit-learn pipeline built here on synthetic
  data (a number, a category, an integer), logged with a signature into the test registry and
  added to the shipped config as a few lines of YAML would add it. It is driven over OIP v2 REST,
  v2 gRPC with the real ``tritonclient``, MLflow's ``/invocations`` in its four JSON formats and a
  batch job, each compared with ``mlflow.pyfunc``; then its alias moves under load and the answers
  switch to the new version with no failed request, and back (rollback).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.clients import run_model_check
from tests.conftest import ROOT, ServeInstance

pytestmark = pytest.mark.serve

FRAUD = "fraud-score"
FRAUD_APP = "fraud"
CANCER = "/breast-cancer"


# --- the unshipped model ---------------------------------------------------------------------


def synthetic(seed: int, n: int = 400, threshold: float = 150.0) -> tuple[pd.DataFrame, Any]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "amount": rng.gamma(2.0, 60.0, n),
            "merchant": rng.choice(["grocery", "travel", "online", "fuel"], n),
            "hour": rng.integers(0, 24, n).astype("int64"),
        }
    )
    risky = ((frame.amount > threshold) & frame.merchant.isin(["travel", "online"])) | (
        frame.hour < 4
    )
    return frame, np.where(risky, "fraud", "ok")


def register_fraud_model(threshold: float) -> str:
    """Train the fraud pipeline (labels drawn at ``threshold``) and register a version of it."""
    import mlflow
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from servecore.registry.client import configure_mlflow

    configure_mlflow()
    frame, labels = synthetic(7, threshold=threshold)
    model = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [
                        ("numbers", StandardScaler(), ["amount", "hour"]),
                        ("merchant", OneHotEncoder(handle_unknown="ignore"), ["merchant"]),
                    ]
                ),
            ),
            ("classifier", LogisticRegression(max_iter=1000, C=10.0)),
        ]
    ).fit(frame, labels)
    with mlflow.start_run(run_name=f"{FRAUD}-{threshold:g}"):
        info = mlflow.sklearn.log_model(
            sk_model=model,
            name="model",
            signature=infer_signature(frame, model.predict(frame)),
            input_example=frame.head(3),
            registered_model_name=FRAUD,
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", "pandas", "numpy"],
        )
    return str(info.registered_model_version)


def move_alias(version: str) -> None:
    from servecore.registry.client import get_client

    get_client().set_registered_model_alias(FRAUD, "champion", version)


def pyfunc(version: str) -> Any:
    import mlflow.pyfunc

    from servecore.registry.client import configure_mlflow

    configure_mlflow()
    return mlflow.pyfunc.load_model(f"models:/{FRAUD}/{version}")


FRAUD_ENTRY = """
name: fraud
route_prefix: /fraud
import_path: graphs.model:build_app
args:
  model_uri: models:/fraud-score@champion
deployments:
  - name: Gateway
    max_ongoing_requests: 256
    ray_actor_options: {num_cpus: 0, num_gpus: 0}
    user_config: {registry_poll_s: 1, monitoring: {sample_rate: 1.0}}
  - name: Model
    max_ongoing_requests: 32
    ray_actor_options: {num_cpus: 0, num_gpus: 0}
    user_config: {max_batch_size: 16, registry_poll_s: 1}
  - name: Monitor
    ray_actor_options: {num_cpus: 0, num_gpus: 0}
"""
"""The few lines of YAML a team adds to ``serve_config.yaml`` to serve its model."""


def config_with(
    gateway: dict[str, Any] | None = None, monitor: dict[str, Any] | None = None
) -> Any:
    """The shipped config plus the fraud application (``gateway``: more live knobs of its
    gateway; ``monitor``: the breast-cancer app's monitor knobs for the drift test)."""
    from servecore.config_check import load_config

    config = load_config(ROOT / "serve_config.yaml")
    entry = yaml.safe_load(FRAUD_ENTRY)
    entry["deployments"][0]["user_config"].update(gateway or {})
    # A fallback model deployed from the start, idle until a test turns the gateway's
    # ``fallback`` knob on: a live knob, where adding the deployment would rebuild the app (two
    # rebuilds cost the fallback test ~20 s). By an alias of the primary's own model, as the
    # README shows it: it must stay at that alias whatever the champion does.
    entry["args"]["fallback_uri"] = f"models:/{FRAUD}@fallback"
    entry["deployments"].append(
        {"name": "Fallback", "ray_actor_options": {"num_cpus": 0, "num_gpus": 0}}
    )
    config["applications"].append(entry)
    if monitor is not None:
        cancer = next(a for a in config["applications"] if a["name"] == "breast-cancer")
        for deployment in cancer["deployments"]:
            if deployment["name"] == "Monitor":
                deployment["user_config"] = {**deployment["user_config"], **monitor}
            if deployment["name"] == "Gateway":
                deployment["user_config"] = {
                    **deployment["user_config"],
                    "monitoring": {"sample_rate": 1.0, "flush_interval_s": 0.2},
                }
    return config


@pytest.fixture(scope="module")
def fraud(registry) -> dict[str, Any]:
    v1 = register_fraud_model(threshold=150.0)
    v2 = register_fraud_model(threshold=60.0)
    move_alias(v1)
    from servecore.registry.client import get_client

    get_client().set_registered_model_alias(FRAUD, "fallback", v1)
    probe, _ = synthetic(11, n=40)
    answers = {v: pyfunc(v).predict(probe).tolist() for v in (v1, v2)}
    assert answers[v1] != answers[v2], "the two versions must answer differently to see a swap"
    return {"v1": v1, "v2": v2, "probe": probe, "answers": answers}


@pytest.fixture(scope="module")
def apps(shipped_app, fraud, tmp_path_factory) -> str:
    """The shipped config with the fraud application added, checked as ``make validate`` checks
    it, then deployed; the base URL."""
    from servecore.config_check import check_config, check_fit, check_registry

    path = tmp_path_factory.mktemp("config") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config_with()))
    assert check_config(path) == []
    assert check_registry(path) == []
    assert check_fit(path, cpus=2, gpus=0) == []
    base = shipped_app(config_with())
    _wait_ok(f"{base}/fraud/readyz")
    _wait_ok(f"{base}{CANCER}/readyz")
    return base


def _wait_ok(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


# --- the shipped tabular example -------------------------------------------------------------


def cancer_split() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    from training import breast_cancer as bc

    train, test = bc.split(bc.load_frame())
    return train, test, bc.feature_names()


def cancer_pyfunc() -> Any:
    import mlflow.pyfunc

    from servecore.registry.client import configure_mlflow

    configure_mlflow()
    return mlflow.pyfunc.load_model("models:/breast-cancer@champion")


def test_breast_cancer_answers_equal_pyfunc_on_the_test_split(apps):
    _, test, features = cancer_split()
    rows = test[features]
    want = cancer_pyfunc().predict(rows).tolist()
    split = json.loads(rows.to_json(orient="split", index=False))
    r = httpx.post(f"{apps}{CANCER}/invocations", json={"dataframe_split": split}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": want}
    body = {
        "inputs": [
            {"name": name, "datatype": "FP64", "shape": [len(rows)], "data": rows[name].tolist()}
            for name in features
        ]
    }
    r = httpx.post(f"{apps}{CANCER}/v2/models/breast-cancer/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "diagnosis",
        "BYTES",
        [len(rows)],
    )
    assert output["data"] == want
    meta = httpx.get(f"{apps}{CANCER}/v2/models/breast-cancer", timeout=30).json()
    assert [i["name"] for i in meta["inputs"]] == features
    assert {i["datatype"] for i in meta["inputs"]} == {"FP64"}


def test_breast_cancer_bad_inputs_get_exact_4xx_bodies(apps, serve_instance: ServeInstance):
    from servecore.api.proto import inference_pb2 as pb
    from servecore.api.proto import inference_pb2_grpc

    _, test, features = cancer_split()
    row = test[features].iloc[0].to_dict()
    listed = ", ".join(features[:8]) + " (and 22 more)"
    url = f"{apps}{CANCER}/invocations"
    cases = [
        (
            {"dataframe_records": [{k: v for k, v in row.items() if k != "mean_area"}]},
            f"dataframe_records: column 'mean_area' is missing; the model's inputs: {listed}",
        ),
        (
            {"dataframe_records": [{**row, "mean_radius": "large"}]},
            "column 'mean_radius', row 0: 'large' is not a number (the model expects double)",
        ),
        (
            {"dataframe_split": {"columns": features, "data": [list(row.values())[:-1]]}},
            "dataframe_split.data[0] has 29 values for 30 columns",
        ),
        ({"dataframe_records": []}, "the request holds no rows"),
        (
            {"instances": "x"},
            "instances must be a list of rows or an object of columns",
        ),
    ]
    for body, message in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert (r.status_code, r.json()) == (
            400,
            {"error_code": "BAD_REQUEST", "message": message},
        ), body
    r = httpx.post(url, content=b"{", headers={"content-type": "application/json"}, timeout=30)
    assert (r.status_code, r.json()["message"]) == (400, "request body is not valid JSON")

    def tensors(rows: int = 1, **changes: Any) -> list[dict[str, Any]]:
        found = []
        for name in features:
            tensor = {"name": name, "datatype": "FP64", "shape": [rows], "data": [row[name]] * rows}
            found.append({**tensor, **changes.get(name, {})})
        return found

    v2 = f"{apps}{CANCER}/v2/models/breast-cancer/infer"
    v2_cases = [
        (
            {"inputs": [t for t in tensors() if t["name"] != "mean_area"]},
            f"input 'mean_area' is missing; the model's inputs: {listed}",
        ),
        (
            {"inputs": tensors(mean_radius={"datatype": "BYTES", "data": ["large"]})},
            "input 'mean_radius' has datatype BYTES; the model expects FP64",
        ),
        (
            {"inputs": tensors(mean_radius={"data": ["large"]})},
            "input 'mean_radius'[0]: 'large' is not a number (the model expects double)",
        ),
        (
            {"inputs": tensors(mean_radius={"shape": [1, 2], "data": [1.0, 2.0]})},
            "input 'mean_radius' has shape [1, 2]; a column takes shape [n] (or [n, 1])",
        ),
        ({"inputs": tensors(rows=0)}, "the request holds no rows"),
    ]
    for body, message in v2_cases:
        r = httpx.post(v2, json=body, timeout=30)
        assert (r.status_code, r.json()) == (400, {"error": message}), message
    with grpc.insecure_channel(serve_instance.grpc_target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="breast-cancer")
        request.inputs.add(name="mean_radius", datatype="FP64", shape=[1]).contents.fp64_contents[
            :
        ] = [row["mean_radius"]]
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(request, metadata=(("application", "breast-cancer"),))
        assert (raised.value.code(), raised.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input 'mean_texture' is missing; the model's inputs: {listed}",
        )


def test_breast_cancer_drift_per_feature(apps, shipped_app):
    train, _, features = cancer_split()
    shipped_app(config_with(monitor={"window_size": len(train), "min_samples": 100}))
    base = f"{apps}{CANCER}"

    def send(frame: pd.DataFrame) -> None:
        for start in range(0, len(frame), 100):
            part = frame.iloc[start : start + 100][features]
            body = {"dataframe_split": json.loads(part.to_json(orient="split", index=False))}
            r = httpx.post(f"{base}/invocations", json=body, timeout=60)
            assert r.status_code == 200, r.text

    def report_after(rows: int) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            report = httpx.get(f"{base}/v1/monitoring/drift", timeout=30).json()
            if report.get("rows") == rows and report["status"] in ("ok", "drift"):
                return report
            time.sleep(0.5)
        raise AssertionError(f"no drift report over {rows} rows: {report}")

    send(train)  # the reference's own rows: no feature may drift
    same = report_after(len(train))
    assert same["status"] == "ok" and same["drifted"] == []
    assert same["statistic"] == "psi" and same["reference"].endswith("reference/train.parquet")
    assert max(f["psi"] for f in same["features"].values()) < 0.05
    # every sampled row is in the prediction log, its inputs hashed (the shipped text policy)
    from servecore.settings import get_settings

    files = get_settings().prediction_log_folder.glob("predictions-breast-cancer-*")
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(records) >= len(train)
    assert {r["app"] for r in records} == {"breast-cancer"}
    assert all("text_hash" in r and "text" not in r for r in records)
    assert {r["outputs"]["predictions"] for r in records} <= {"malignant", "benign"}
    shifted = train.assign(mean_radius=train.mean_radius * 1.6)
    send(shifted)
    moved = report_after(len(train))
    assert moved["status"] == "drift" and moved["drifted"] == ["mean_radius"]
    assert moved["features"]["mean_radius"]["psi"] > 0.2
    shipped_app(config_with())


# --- a model the project does not ship ---------------------------------------------------------


def test_unshipped_model_over_every_protocol(apps, fraud, serve_instance, tmp_path):
    probe = fraud["probe"]
    want = fraud["answers"][fraud["v1"]]
    base = f"{apps}/fraud"
    meta = httpx.get(f"{base}/v2/models/{FRAUD}", timeout=30).json()
    assert meta["inputs"] == [
        {"name": "amount", "datatype": "FP64", "shape": [-1]},
        {"name": "merchant", "datatype": "BYTES", "shape": [-1]},
        {"name": "hour", "datatype": "INT64", "shape": [-1]},
    ]
    assert meta["versions"] == [fraud["v1"]]
    body = {
        "inputs": [
            {"name": "amount", "datatype": "FP64", "shape": [40], "data": probe.amount.tolist()},
            {"name": "merchant", "datatype": "BYTES", "shape": [40], "data": list(probe.merchant)},
            {"name": "hour", "datatype": "INT64", "shape": [40], "data": probe.hour.tolist()},
        ]
    }
    r = httpx.post(f"{base}/v2/models/{FRAUD}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == fraud["v1"]
    assert r.json()["outputs"][0]["data"] == want
    records = json.loads(probe.to_json(orient="records"))
    formats = {
        "dataframe_split": json.loads(probe.to_json(orient="split", index=False)),
        "dataframe_records": records,
        "instances": records,
        "inputs": {column: probe[column].tolist() for column in probe.columns},
    }
    for name, payload in formats.items():
        r = httpx.post(f"{base}/invocations", json={name: payload}, timeout=60)
        assert r.status_code == 200, (name, r.text)
        assert r.json() == {"predictions": want}, name
        assert r.headers["x-model-version"] == fraud["v1"]
    rows = tmp_path / "rows.json"
    rows.write_text(probe.to_json(orient="records"))
    report = run_model_check(
        f"127.0.0.1:{serve_instance.http_port}/fraud",
        serve_instance.grpc_target,
        FRAUD_APP,
        FRAUD,
        rows,
    )
    for protocol in ("http", "grpc"):
        seen = report[protocol]
        assert seen["ready"] == {"ok": True, "value": True}, protocol
        answer = seen["infer"]["value"]
        assert answer["model_version"] == fraud["v1"], protocol
        assert list(answer) == ["model_version", "predictions"], protocol
        assert answer["predictions"] == want, protocol
        assert seen["missing_input"]["ok"] is False
        assert seen["missing_input"]["message"] == (
            "input 'amount' is missing; the model's inputs: amount, merchant, hour"
        )
        assert {"name": FRAUD, "version": fraud["v1"], "state": "READY"} in seen["index"]


def test_batch_job_and_parity_on_the_unshipped_model(apps, fraud, tmp_path):
    from batch.cli import main

    frame, _ = synthetic(23, n=300)
    frame.insert(0, "id", [f"row-{i}" for i in range(len(frame))])
    frame.to_parquet(tmp_path / "rows.parquet")
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(config_with()))
    out = tmp_path / "scored"
    common = [
        "--config",
        str(config),
        "--app",
        FRAUD_APP,
        "--input",
        str(tmp_path / "rows.parquet"),
    ]
    assert main(["run", *common, "--output", str(out), "--no-progress"]) == 0
    scored = pd.read_parquet(out / "predictions").sort_values("id")
    expected = pd.Series(pyfunc(fraud["v1"]).predict(frame.drop(columns="id")), index=frame.id)
    assert len(scored) == len(frame)
    assert scored.predictions.tolist() == expected.loc[scored.id].tolist()
    assert set(scored.model_version) == {f"{FRAUD}/{fraud['v1']}"}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows_scored"], summary["rows_rejected"]) == (300, 0)
    assert main(["parity", *common, "--url", apps, "--no-progress"]) == 0


def test_alias_move_hot_swaps_and_rolls_back_with_no_failed_request(apps, fraud):
    probe = fraud["probe"]
    body = {"dataframe_split": json.loads(probe.to_json(orient="split", index=False))}
    url = f"{apps}/fraud/invocations"
    seen: list[tuple[int, str, Any]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline and len(seen) < 2000:
                r = client.post(url, json=body, headers={"Cache-Control": "no-cache"})
                answer = r.json().get("predictions") if r.status_code == 200 else r.text
                seen.append((r.status_code, r.headers.get("x-model-version", ""), answer))

    def wait_for(version: str, since: int = 0) -> None:
        """Until ``version`` answers a request sent after the first ``since`` answers (answers
        from before an alias move must not count as its effect)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(v == version for _, v, _ in seen[since:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"version {version} never answered; last: {seen[-1:]}")

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_for(fraud["v1"])
        moved_at = len(seen)
        move_alias(fraud["v2"])
        wait_for(fraud["v2"], moved_at)
        moved_at = len(seen)
        move_alias(fraud["v1"])  # rollback: the previous version is still loaded
        wait_for(fraud["v1"], moved_at)
    finally:
        stop.set()
        worker.join()
    failed = [(status, text) for status, _, text in seen if status != 200]
    assert failed == [], failed[:3]
    order = [v for i, (_, v, _) in enumerate(seen) if i == 0 or seen[i - 1][1] != v]
    assert order == [fraud["v1"], fraud["v2"], fraud["v1"]], order
    for _, version, answer in seen:
        assert answer == fraud["answers"][version]
    summary = httpx.get(f"{apps}/fraud/v1/models", timeout=30).json()
    assert summary["release_swaps"] == 2


def test_ab_split_between_aliases_with_a_shadow(apps, fraud, shipped_app):
    from servecore.registry.client import get_client

    get_client().set_registered_model_alias(FRAUD, "challenger", fraud["v2"])
    variants = [
        {"name": "champion", "alias": "champion", "weight": 1.0},
        {"name": "challenger", "alias": "challenger", "weight": 1.0},
    ]
    shipped_app(
        config_with(
            gateway={
                "experiment": {"variants": variants},
                "shadow": {"variant": "challenger", "fraction": 1.0},
            }
        )
    )
    base = f"{apps}/fraud"
    deadline = time.monotonic() + 60
    while len(httpx.get(f"{base}/v1/experiments", timeout=30).json()["variants"]) != 2:
        assert time.monotonic() < deadline, "the experiment never applied"
        time.sleep(0.5)
    probe = fraud["probe"].head(5)
    body = {"dataframe_split": json.loads(probe.to_json(orient="split", index=False))}
    want = {v: fraud["answers"][v][:5] for v in (fraud["v1"], fraud["v2"])}
    by_key: dict[str, set[str]] = {}
    with httpx.Client(timeout=30) as client:
        for _round in range(2):
            for key in range(24):
                r = client.post(
                    f"{base}/invocations", json=body, headers={"X-User-Key": f"user-{key}"}
                )
                assert r.status_code == 200, r.text
                version = r.headers["x-model-version"]
                assert r.headers["x-model-variant"] == (
                    "champion" if version == fraud["v1"] else "challenger"
                )
                assert r.json()["predictions"] == want[version]
                by_key.setdefault(str(key), set()).add(version)
    assert all(len(versions) == 1 for versions in by_key.values()), by_key  # sticky
    assert {v for versions in by_key.values() for v in versions} == {fraud["v1"], fraud["v2"]}
    deadline = time.monotonic() + 30
    while True:
        experiments = httpx.get(f"{base}/v1/experiments", timeout=30).json()
        if experiments["shadow"]["requests"] > 0:
            break
        assert time.monotonic() < deadline, experiments["shadow"]
        time.sleep(0.5)
    assert experiments["shadow"]["texts_compared"] >= 5
    assert {v["name"]: v["requests"] > 0 for v in experiments["variants"]} == {
        "champion": True,
        "challenger": True,
    }
    shipped_app(config_with())


def register_python_model(python_model: Any) -> str:
    import mlflow
    from mlflow.models import infer_signature

    from servecore.registry.client import configure_mlflow

    configure_mlflow()
    frame, _ = synthetic(7, n=20)
    frame = frame[frame.amount < 1000]
    with mlflow.start_run(run_name=type(python_model).__name__):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model,
            signature=infer_signature(frame, np.array(["ok"] * len(frame))),
            input_example=frame.head(3),
            registered_model_name=FRAUD,
            pip_requirements=["pandas", "numpy"],
        )
    return str(info.registered_model_version)


def test_fallback_model_answers_when_the_primary_fails_and_a_broken_version_is_never_served(
    apps, fraud, shipped_app
):
    from tests.pyfunc_models import BrokenFraudModel, PickyFraudModel

    picky = register_python_model(PickyFraudModel())
    broken = register_python_model(BrokenFraudModel())
    # The fallback (@fallback: version 1) is deployed with the app; turning it on is live.
    shipped_app(config_with(gateway={"fallback": {"stage": "Fallback", "deadline_s": 10}}))
    _wait_ok(f"{apps}/fraud/readyz")
    base = f"{apps}/fraud"
    probe = fraud["probe"].head(3).assign(amount=[50.0, 150.0, 5000.0])

    def ask(rows: pd.DataFrame) -> httpx.Response:
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        return httpx.post(
            f"{base}/invocations", json=body, headers={"Cache-Control": "no-cache"}, timeout=60
        )

    move_alias(picky)
    deadline = time.monotonic() + 60
    while ask(probe.head(2)).headers["x-model-version"] != picky:
        assert time.monotonic() < deadline, "the picky version was never served"
        time.sleep(0.5)
    assert ask(probe.head(2)).json() == {"predictions": ["ok", "fraud"]}
    r = ask(probe)  # the primary raises on 5000: the fallback (version 1) answers every row
    assert r.status_code == 200, r.text
    assert (r.headers["x-degraded"], r.headers["x-model-version"]) == ("true", fraud["v1"])
    assert r.json() == {"predictions": pyfunc(fraud["v1"]).predict(probe).tolist()}
    fallback = httpx.get(f"{base}/v1/experiments", timeout=30).json()["fallback"]
    assert fallback["fallbacks"] == {"error": 1}

    move_alias(broken)  # its warm-up call fails: the gateway keeps serving the picky version
    deadline = time.monotonic() + 60
    while True:
        summary = httpx.get(f"{base}/v1/models", timeout=30).json()
        if summary["release_error"] and "warm-up" in summary["release_error"]:
            break
        assert time.monotonic() < deadline, summary
        time.sleep(0.5)
    assert summary["release"] == f"{FRAUD}/{picky},{FRAUD}/{fraud['v1']}"
    r = ask(probe.head(2))
    assert (r.status_code, r.headers["x-model-version"]) == (200, picky)
    move_alias(fraud["v1"])
    shipped_app(config_with())


def test_config_check_refuses_a_model_without_signature(registry, tmp_path):
    import mlflow
    from sklearn.linear_model import LinearRegression

    from servecore.config_check import check_registry
    from servecore.registry.client import configure_mlflow

    configure_mlflow()
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            sk_model=LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]),
            name="model",
            registered_model_name="no-signature",
            pip_requirements=["scikit-learn"],
        )
    config = copy.deepcopy(yaml.safe_load(FRAUD_ENTRY))
    config["args"]["model_uri"] = "models:/no-signature/1"
    config["deployments"] = []
    path = Path(tmp_path / "config.yaml")
    path.write_text(yaml.safe_dump({"applications": [config]}))
    assert check_registry(path) == [
        "applications[fraud]: models:/no-signature/1: models:/no-signature/1 has no MLflow "
        "signature, so its inputs cannot be checked or described: log it with "
        "signature=mlflow.models.infer_signature(X, model.predict(X))"
    ]
    config["args"]["model_uri"] = "models:/not-registered@champion"
    path.write_text(yaml.safe_dump({"applications": [config]}))
    (problem,) = check_registry(path)
    assert problem.startswith(
        "applications[fraud]: models:/not-registered@champion does not resolve:"
    )
