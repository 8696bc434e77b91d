"""Export, gate and register: the release behind the serving config's aliases becomes ONNX
variants, each scored on the fixed test split exactly as it will run on a device (through the
bundle's own predictor), and only a variant within the gate gets registered and the ``edge``
alias.

The gate: macro-F1 at most :data:`MAX_F1_DROP` (1.0 point) below the torch ensemble's, on the
same texts, with the same metric code as the bootstrap (:mod:`servecore.evaluation`). Agreement
with the torch release's labels and the largest probability difference are reported beside it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import write_bundle
from edge.onnx_export import export_fp32, quantize_int8

logger = logging.getLogger("edge")

EDGE_MODEL = "intent-edge"
EDGE_ALIAS = "edge"
MAX_F1_DROP = 0.01
"""A variant may lose at most this much macro-F1 (1.0 point) against the torch ensemble."""
MAX_LENGTH = 256
SOURCES = {"Encoder": "transformer", "LinearHead": "head", "MLPHead": "head", "BagOfWords": "bow"}
"""The stages a bundle is made of, and the artifact each one's registered model keeps."""


@dataclass(frozen=True)
class Variant:
    name: str
    int8: bool = False
    layers: int | None = None
    """Encoder layers kept (None: all six): the shrinking step."""


VARIANTS = {
    "fp32": Variant("fp32"),
    "int8": Variant("int8", int8=True),
    "shrunk": Variant("shrunk", int8=True, layers=4),
}


class GateRefused(Exception):
    """The variant to ship did not pass the gate; nothing was registered or moved."""


def source_release(spec: Any) -> dict[str, dict[str, Any]]:
    """Each source stage's registered model (name, version) and its artifact folder."""
    from servecore.registry.client import fetch, pyfunc_artifact

    found = {}
    for plan in spec.stage_plans():
        if plan.deployment in SOURCES:
            ref, folder = fetch(plan.init_kwargs["model_uri"])
            found[plan.deployment] = {
                "name": ref.name,
                "version": ref.version,
                "path": pyfunc_artifact(folder, SOURCES[plan.deployment]),
            }
    return found


def scores(
    labels: list[str], probs: np.ndarray, reference: np.ndarray, names: list[str]
) -> dict[str, float]:
    from servecore.evaluation import accuracy, macro_f1

    predicted = [names[i] for i in probs.argmax(axis=1)]
    return {
        "test_accuracy": accuracy(labels, predicted),
        "test_macro_f1": macro_f1(labels, predicted, names),
        "agreement": float(np.mean(probs.argmax(axis=1) == reference.argmax(axis=1))),
        "max_probability_difference": float(np.abs(probs - reference).max()),
    }


def torch_reference(spec: Any, texts: list[str]) -> np.ndarray:
    """The served classes' ensemble probabilities, in process, batch 64."""
    from bench.pipeline import InProcessPipeline

    pipeline = InProcessPipeline(spec)
    return np.concatenate(
        [pipeline(texts[i : i + 64])["probs"] for i in range(0, len(texts), 64)]
    ).astype(np.float32)


def next_version(client: Any) -> str:
    versions = client.search_model_versions(f"name='{EDGE_MODEL}'")
    return str(max((int(v.version) for v in versions), default=0) + 1)


def build(
    spec: Any,
    out: Path,
    variants: list[Variant],
    ship: str = "int8",
    register: bool = True,
) -> dict[str, Any]:
    """Export every variant, score it through its own bundle, register the ones that pass and
    point ``edge`` at ``ship`` when it passed. Returns the report (also written as
    ``out/report.json``); raises :class:`GateRefused` when ``ship`` failed the gate."""
    from servecore import LABELS
    from servecore.dataset import load_split
    from servecore.evaluation import accuracy, macro_f1

    release = source_release(spec)
    sources = {stage: f"{s['name']}/{s['version']}" for stage, s in release.items()}
    paths = {
        "encoder": release["Encoder"]["path"],
        "linear": release["LinearHead"]["path"],
        "mlp": release["MLPHead"]["path"],
        "bow": release["BagOfWords"]["path"],
    }
    weights = dict(spec.ensemble.weights)
    texts, labels = load_split("test")
    reference = torch_reference(spec, texts)
    torch_predicted = [LABELS[i] for i in reference.argmax(axis=1)]
    baseline = {
        "test_accuracy": accuracy(labels, torch_predicted),
        "test_macro_f1": macro_f1(labels, torch_predicted, LABELS),
    }
    report: dict[str, Any] = {"sources": sources, "torch": baseline, "variants": {}}
    exported: dict[int | None, Path] = {}
    for variant in variants:
        started = time.perf_counter()
        if variant.layers not in exported:
            folder = out / "onnx" / f"fp32-{variant.layers or 'all'}"
            info = export_fp32(paths, weights, folder, variant.layers)
            exported[variant.layers] = folder
        onnx_dir = exported[variant.layers]
        if variant.int8:
            onnx_dir = out / "onnx" / f"{variant.name}"
            quantize_int8(exported[variant.layers], onnx_dir)
        manifest_info = {
            "name": EDGE_MODEL,
            "version": "unregistered",
            "variant": variant.name,
            "labels": list(LABELS),
            "num_buckets": info["num_buckets"],
            "max_length": MAX_LENGTH,
            "encoder_layers": variant.layers or 6,
            "sources": sources,
        }
        staging = out / "bundles" / variant.name
        write_bundle(onnx_dir, paths["encoder"], manifest_info, staging)
        from edge.predictor import EdgePredictor

        probs = EdgePredictor(staging).probabilities(texts)
        metrics = scores(labels, probs, reference, list(LABELS))
        size = sum(
            (onnx_dir / f).stat().st_size
            for f in ("encoder.onnx", "linear.onnx", "mlp.onnx", "bow.onnx", "ensemble.onnx")
        )
        drop = baseline["test_macro_f1"] - metrics["test_macro_f1"]
        passed = drop <= MAX_F1_DROP
        entry = {
            **metrics,
            "onnx_bytes": size,
            "macro_f1_drop": drop,
            "gate": "passed" if passed else "refused",
            "seconds": time.perf_counter() - started,
            "info": manifest_info,
            "staging": str(staging),
            "onnx_dir": str(onnx_dir),
        }
        report["variants"][variant.name] = entry
        logger.info(
            "%s: macro-F1 %.4f (torch %.4f, drop %.2f points), agreement %.4f, max |dp| %.4f: %s",
            variant.name,
            metrics["test_macro_f1"],
            baseline["test_macro_f1"],
            100 * drop,
            metrics["agreement"],
            metrics["max_probability_difference"],
            entry["gate"].upper(),
        )
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    shipped = report["variants"].get(ship)
    if shipped is None or shipped["gate"] != "passed":
        drop = None if shipped is None else 100 * shipped["macro_f1_drop"]
        raise GateRefused(
            f"variant {ship!r} refused: macro-F1 {drop:.2f} points below the torch ensemble's "
            f"(at most {100 * MAX_F1_DROP:.1f} allowed); nothing registered, no alias moved"
            if drop is not None
            else f"variant {ship!r} was not built"
        )
    if register:
        report["registered"] = _register(report, out, ship)
    return report


def _register(report: dict[str, Any], out: Path, ship: str) -> dict[str, str]:
    """Register every variant that passed (its own version of :data:`EDGE_MODEL`, the bundle as
    its artifact, metrics logged, sources as tags) and point ``edge`` at ``ship``."""
    import mlflow

    from servecore.registry.client import experiment_id, get_client
    from training.mlflow_models import EdgeBundleModel

    client = get_client()
    registered = {}
    for name, entry in report["variants"].items():
        if entry["gate"] != "passed":
            continue
        version = next_version(client)
        info = {**entry["info"], "version": version}
        info["metrics"] = {
            k: entry[k]
            for k in ("test_accuracy", "test_macro_f1", "agreement", "max_probability_difference")
        }
        bundle = out / "registered" / f"{name}-{version}"
        write_bundle(Path(entry["onnx_dir"]), Path(_tokenizer_dir(entry)), info, bundle)
        with mlflow.start_run(experiment_id=experiment_id(client), run_name=f"edge-{name}"):
            mlflow.log_metrics({**info["metrics"], "onnx_bytes": entry["onnx_bytes"]})
            mlflow.log_params({"variant": name, "encoder_layers": info["encoder_layers"]})
            logged = mlflow.pyfunc.log_model(
                name=EDGE_MODEL,
                python_model=EdgeBundleModel(),
                artifacts={"bundle": str(bundle)},
                pip_requirements=["onnxruntime", "numpy", "tokenizers"],
                registered_model_name=EDGE_MODEL,
            )
        got = str(logged.registered_model_version)
        if got != version:
            raise RuntimeError(f"registered {EDGE_MODEL} version {got}, the bundle says {version}")
        for stage, source in info["sources"].items():
            client.set_model_version_tag(EDGE_MODEL, version, f"source.{stage}", source)
        client.set_model_version_tag(EDGE_MODEL, version, "variant", name)
        client.set_model_version_tag(EDGE_MODEL, version, "gate", "passed")
        registered[name] = version
        logger.info("registered %s version %s (%s)", EDGE_MODEL, version, name)
    client.set_registered_model_alias(EDGE_MODEL, EDGE_ALIAS, registered[ship])
    logger.info("%s@%s -> version %s (%s)", EDGE_MODEL, EDGE_ALIAS, registered[ship], ship)
    return registered


def _tokenizer_dir(entry: dict[str, Any]) -> Path:
    return Path(entry["staging"]) / "tokenizer"
