"""``python -m edge bench``: the edge variants side by side, in process, then served.

In process, per variant (torch fp32 = the served classes; ONNX fp32, int8 and shrunk = the
bundles ``python -m edge export`` wrote and gated): size on disk, load time, one text at a time
(p50/p99 over the test split), batch-32 throughput over the test split (median of three passes),
accuracy and macro-F1 (from the export's report: the gate's numbers). Then the served graph on the
int8 profile (``serve_config.onnx.yaml``) next to the torch one (``serve_config.yaml``), one text
per request at c=1 and c=32, measured as ``make bench`` measures (same load generator, warm-up
while the encoder autoscaler settles, ``Cache-Control: no-cache``). Prints the tables and writes
``bench/results/edge-latest.json``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.loadgen import percentiles

logger = logging.getLogger("edge")

ROOT = Path(__file__).resolve().parents[1]
PASSES = 3


def _timed(predict: Any, texts: list[str]) -> dict[str, Any]:
    predict(texts[:32])  # first-call allocations
    single = []
    for text in texts:
        started = time.perf_counter()
        predict([text])
        single.append(time.perf_counter() - started)
    rates = []
    for _ in range(PASSES):
        started = time.perf_counter()
        for i in range(0, len(texts), 32):
            predict(texts[i : i + 32])
        rates.append(len(texts) / (time.perf_counter() - started))
    found = percentiles(single)
    return {
        "p50_ms": found["p50_ms"],
        "p99_ms": found["p99_ms"],
        "batch32_texts_per_s": statistics.median(rates),
    }


def in_process(export_dir: Path, spec: Any, texts: list[str]) -> dict[str, dict[str, Any]]:
    from bench.pipeline import InProcessPipeline
    from edge.predictor import EdgePredictor

    report = json.loads((export_dir / "report.json").read_text())
    rows: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    pipeline = InProcessPipeline(spec)
    load_s = time.perf_counter() - started
    from servecore.registry.client import fetch

    size = 0
    for plan in spec.stage_plans():
        if "model_uri" in plan.init_kwargs and plan.deployment != "Tokenizer":
            _, folder = fetch(plan.init_kwargs["model_uri"])
            size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    rows["torch fp32 (served)"] = {
        "bytes": size,
        "load_s": load_s,
        **_timed(pipeline, texts),
        "test_accuracy": report["torch"]["test_accuracy"],
        "test_macro_f1": report["torch"]["test_macro_f1"],
        "gate": "–",
    }
    del pipeline
    for name, variant in report["variants"].items():
        bundle = Path(variant["staging"])
        started = time.perf_counter()
        predictor = EdgePredictor(bundle)
        load_s = time.perf_counter() - started
        rows[f"ONNX {name}"] = {
            "bytes": variant["onnx_bytes"],
            "load_s": load_s,
            **_timed(predictor.probabilities, texts),
            "test_accuracy": variant["test_accuracy"],
            "test_macro_f1": variant["test_macro_f1"],
            "gate": variant["gate"],
        }
        logger.info("%s: %s", name, rows[f"ONNX {name}"])
    return rows


def served(texts: list[str]) -> dict[str, dict[str, Any]]:
    from bench.loadgen import TextCycler, measure, warm_up
    from bench.run import Plan
    from bench.served import serve_graph

    plan = Plan.full()
    rows: dict[str, dict[str, Any]] = {}
    for label, config in (
        ("torch profile (serve_config.yaml)", ROOT / "serve_config.yaml"),
        ("int8 profile (serve_config.onnx.yaml)", ROOT / "serve_config.onnx.yaml"),
    ):
        cycler = TextCycler(texts)
        with serve_graph(config) as graph:
            for concurrency in (1, 32):
                spec = plan.single_text(concurrency)
                spec = type(spec)(**{**spec.__dict__, "headers": graph.headers})
                warm_up(graph.predict_url, spec, cycler, plan.first_warmup_s, label)
                result = measure(graph.predict_url, spec, cycler, f"{label} c={concurrency}")
                rows[f"{label} c={concurrency}"] = {
                    "requests_per_s": result.requests_per_s,
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "errors": result.errors,
                }
    return rows


def tables(results: dict[str, Any]) -> str:
    lines = [
        "| variant | size MB | load s | 1 text p50 ms | 1 text p99 ms | batch 32 texts/s "
        "| accuracy | macro-F1 | gate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results["in_process"].items():
        lines.append(
            f"| {name} | {r['bytes'] / 2**20:.1f} | {r['load_s']:.2f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['batch32_texts_per_s']:.1f} | {r['test_accuracy']:.4f} | "
            f"{r['test_macro_f1']:.4f} | {r['gate']} |"
        )
    if results.get("served"):
        lines += ["", "| served, 1 text/request | req/s | p50 ms | p99 ms | errors |"]
        lines.append("|---|---:|---:|---:|---:|")
        for name, r in results["served"].items():
            lines.append(
                f"| {name} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['errors']} |"
            )
    return "\n".join(lines)


def run(export_dir: Path, spec: Any, with_served: bool, output: Path) -> dict[str, Any]:
    from servecore.dataset import load_split

    texts, _ = load_split("test")
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "texts": len(texts),
        "in_process": in_process(export_dir, spec, texts),
    }
    if with_served:
        results["served"] = served(texts)
    output.mkdir(parents=True, exist_ok=True)
    (output / "edge-latest.json").write_text(json.dumps(results, indent=2))
    return results
