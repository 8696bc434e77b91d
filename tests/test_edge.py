"""The edge path (issue 19): export, gate, register, bundle, a device's predictor in a fresh
virtual environment, and field updates over a local HTTP server.

One module-wide export from the session's bootstrapped registry (a few seconds: the ONNX exporter
and onnxruntime's quantizer on MiniLM-L6); every variant is scored through its own bundle.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.bundle import archive, write_bundle
from edge.predictor import (
    BundleError,
    EdgePredictor,
    check_files,
    current_version,
    rollback,
    update,
)
from edge.release import EDGE_ALIAS, EDGE_MODEL, VARIANTS, GateRefused, build
from servecore.config_check import load_app_spec
from servecore.dataset import load_split
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec() -> Any:
    return load_app_spec(ROOT / "serve_config.yaml", "intent")


@pytest.fixture(scope="module")
def exported(registry, spec, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("edge")
    report = build(spec, out, [VARIANTS[n] for n in ("fp32", "int8", "shrunk")], ship="int8")
    return {"report": report, "out": out}


def client() -> Any:
    from servecore.registry.client import get_client

    return get_client()


def test_variants_are_gated_and_only_a_passing_one_gets_the_alias(exported, registry):
    report = exported["report"]
    variants = report["variants"]
    assert variants["fp32"]["agreement"] == 1.0
    assert variants["fp32"]["max_probability_difference"] < 1e-4
    assert variants["int8"]["gate"] == "passed" and variants["int8"]["agreement"] >= 0.99
    assert variants["int8"]["onnx_bytes"] < variants["fp32"]["onnx_bytes"] / 3
    assert variants["shrunk"]["gate"] == "refused"
    assert set(report["registered"]) == {"fp32", "int8"}  # the refused one is not registered
    found = client().get_model_version_by_alias(EDGE_MODEL, EDGE_ALIAS)
    assert str(found.version) == report["registered"]["int8"]
    assert found.tags["variant"] == "int8" and found.tags["gate"] == "passed"
    sources = {k.removeprefix("source."): v for k, v in found.tags.items() if "source." in k}
    assert (
        sources
        == report["sources"]
        == {
            plan.deployment: plan.init_kwargs["model_uri"].removeprefix("models:/").split("@")[0]
            + "/1"
            for plan in load_app_spec(ROOT / "serve_config.yaml", "intent").stage_plans()
            if plan.deployment in sources
        }
    )
    run = client().get_run(found.run_id)
    assert run.data.metrics["test_macro_f1"] == pytest.approx(variants["int8"]["test_macro_f1"])


def test_a_worse_variant_is_refused_and_moves_nothing(exported, spec, tmp_path):
    before = str(client().get_model_version_by_alias(EDGE_MODEL, EDGE_ALIAS).version)
    count = len(client().search_model_versions(f"name='{EDGE_MODEL}'"))
    with pytest.raises(GateRefused) as refused:
        build(spec, tmp_path, [VARIANTS["shrunk"]], ship="shrunk")
    assert "variant 'shrunk' refused: macro-F1" in str(refused.value)
    assert "nothing registered, no alias moved" in str(refused.value)
    assert str(client().get_model_version_by_alias(EDGE_MODEL, EDGE_ALIAS).version) == before
    assert len(client().search_model_versions(f"name='{EDGE_MODEL}'")) == count


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory) -> Path:
    from edge.__main__ import main

    out = tmp_path_factory.mktemp("bundle") / "intent-edge"
    assert main(["bundle", "--output", str(out)]) == 0
    return out


def test_the_bundle_runs_in_a_fresh_environment_without_torch_ray_or_mlflow(bundle, spec, tmp_path):
    manifest = check_files(bundle)
    assert manifest["version"] == str(
        client().get_model_version_by_alias(EDGE_MODEL, EDGE_ALIAS).version
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(bundle / "requirements.txt")],
        check=True,
    )
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for absent in ("torch", "ray", "mlflow", "servecore"):
        probe = subprocess.run(
            [str(python), "-c", f"import {absent}"], capture_output=True, cwd=tmp_path, env=clean
        )
        assert probe.returncode != 0, f"{absent} is importable in the fresh environment"
    texts, _ = load_split("test")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    ran = subprocess.run(
        [
            str(python),
            str(bundle / "predictor.py"),
            "--bundle",
            str(bundle),
            str(tmp_path / "texts.txt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # nothing of the project on the path
        env=clean,
        check=True,
    )
    answers = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [a["text"] for a in answers] == texts
    # The same bundle in this process, and the served classes (torch) on the same texts.
    here = EdgePredictor(bundle).predict(texts)
    assert [a["label"] for a in answers] == [h["label"] for h in here]
    from edge.release import torch_reference
    from servecore import LABELS

    torch_labels = [LABELS[i] for i in torch_reference(spec, texts).argmax(axis=1)]
    agreement = np.mean([a["label"] == t for a, t in zip(answers, torch_labels, strict=True)])
    assert agreement >= 0.99, agreement


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def channel(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, as a device's update channel."""
    folder = tmp_path / "channel"
    folder.mkdir()
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _republish(bundle: Path, version: str, scratch: Path) -> Path:
    """The same files as ``bundle`` under another version number (what a newer release is to
    a device)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("files")
    onnx = scratch / f"onnx-{version}"
    onnx.mkdir()
    for part in ("encoder", "linear", "mlp", "bow", "ensemble"):
        shutil.copyfile(bundle / f"{part}.onnx", onnx / f"{part}.onnx")
    out = scratch / f"bundle-{version}"
    write_bundle(onnx, bundle / "tokenizer", {**manifest, "version": version}, out)
    return out


def test_field_updates_pick_up_newer_refuse_corrupt_and_roll_back(bundle, channel, tmp_path):
    folder, base = channel
    root = tmp_path / "device"
    first = str(json.loads((bundle / "manifest.json").read_text())["version"])
    archive(bundle, folder)
    url = f"{base}latest.json"
    assert update(root, url) == first
    assert current_version(root) == first
    assert update(root, url) is None  # nothing newer

    newer = str(int(first) + 1)
    archive(_republish(bundle, newer, tmp_path), folder)
    assert update(root, url) == newer
    assert current_version(root) == newer
    assert EdgePredictor(root / "current").predict(["my parcel never arrived"])[0]["label"]

    # A corrupted download (same size, other bytes) and a half-downloaded one are refused.
    broken = str(int(first) + 2)
    tar, latest = archive(_republish(bundle, broken, tmp_path), folder)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        update(root, url)
    tar.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BundleError, match="incomplete or wrong file"):
        update(root, url)
    assert current_version(root) == newer
    assert not (root / "versions" / broken).exists()
    assert EdgePredictor(root / "current").predict(["refund please"])[0]["label"]

    assert rollback(root) == first
    assert current_version(root) == first
    assert rollback(root) == newer  # and forward again


@pytest.mark.serve
def test_the_int8_profile_serves_the_same_api_and_passes_its_parity_gate(
    exported, bundle, serve_instance, tmp_path, capsys
):
    """``serve_config.onnx.yaml``'s application (the int8 encoder on onnxruntime, registered
    above) over the same /v1/predict, and ``python -m batch parity`` against it with the label
    agreement the accuracy gate allows."""
    import csv

    import httpx
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray import serve

    from batch import cli
    from servecore.dataset import dataset_path
    from tests.fixtures import delete_app, fake_graph

    config = ROOT / "serve_config.onnx.yaml"
    spec = load_app_spec(config, "intent")
    plans = {plan.deployment: (plan.stage_class, plan.init_kwargs) for plan in spec.stage_plans()}
    assert plans["Encoder"][0] == "deployments.onnx_encoder:OnnxEncoder"
    serve.run(fake_graph(spec, plans), name="edge-int8", route_prefix="/edge-int8")
    url = f"{serve_instance.base_url}/edge-int8"
    try:
        answer = httpx.post(
            f"{url}/v1/predict", json={"texts": ["I was charged twice for my order"]}, timeout=60
        ).json()
        assert answer["predictions"][0]["label"] == "billing"
        encoder = next(m for m in answer["models"] if m["stage"] == "Encoder")
        edge = client().get_model_version_by_alias(EDGE_MODEL, EDGE_ALIAS)
        assert (encoder["name"], encoder["version"]) == (EDGE_MODEL, str(edge.version))

        with open(dataset_path(), newline="") as f:
            rows = [(r["id"], r["text"]) for r in csv.DictReader(f) if r["split"] == "test"]
        source = tmp_path / "test-split.parquet"
        pq.write_table(pa.table({"id": [i for i, _ in rows], "body": [t for _, t in rows]}), source)
        argv = ["parity", "--config", str(config), "--input", str(source), "--url", url]
        # The accuracy gate allows 1% of labels to move; one row per encoder run makes every
        # text's answer independent of its batch, so the probabilities keep the default bound.
        gate = ["--label-agreement", "0.99"]
        code = cli.main([*argv, *gate, "--text-column", "body", "--no-progress"])
        out = capsys.readouterr().out
        print(out)
        assert code == 0, out
        assert f"parity PASS: {len(rows)} rows, 0 label mismatches" in out

        # The device's predictor (the bundle the fresh-environment test ran) against the served
        # answers: the same int8 encoder, ONNX heads and vote instead of torch ones.
        from batch.parity import predict_online

        texts = [t for _, t in rows]
        served_labels, _ = predict_online(url, texts, 60.0)
        device = [a["label"] for a in EdgePredictor(bundle).predict(texts)]
        agreement = np.mean([a == b for a, b in zip(device, served_labels, strict=True)])
        assert agreement >= 0.99, agreement
    finally:
        delete_app("edge-int8")
