"""``python -m bench``: every measurement in one run, then the table, the ratios and the JSON.

Order: the model classes in-process (the compute ceiling), the served graph over HTTP (a private
Ray cluster in this process, shut down afterwards; with its latency budget at c=1 and its memory
idle and under load), the stream path (the same graph with a stream consumer, on a private
``redis-server``), then the two FastAPI peers and MLServer with adaptive batching, one at a
time, each in its own process stopped by PID afterwards. Nothing else runs alongside a
measurement. MLServer runs from a virtual environment of its own, built on first use
(``.cache/bench/mlserver-venv``); where that cannot be built the section is skipped with the
reason, and the ratios against it say "not measured". A section that fails is logged, recorded
in the JSON and turns the exit status to 1; the other sections still run. Failed requests in a
measured run also make the status 1.

Options: ``--quick`` (tiny counts for a smoke test, about two minutes), ``--config PATH``
(default ``serve_config.yaml``), ``--output DIR`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report as reporting
from bench.loadgen import LoadResult, LoadSpec, TextCycler, measure, percentiles, warm_up

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
RAW_BATCH_SIZE = 32
SERVED_BATCH_CONCURRENCY = 4


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does (counts and time bounds)."""

    raw_texts: int
    raw_passes: int
    batch_requests: int
    """(a): stop after this many 32-text requests ..."""
    batch_seconds: float
    """... or after this many seconds, whichever comes first."""
    single_requests: int
    """(b) and the peers: stop after this many one-text requests ..."""
    single_seconds: float
    """... or after this many seconds."""
    first_warmup_s: float
    """Warm-up right after deploying, before (a); the encoder autoscaler acts in this window."""
    warmup_s: float
    """Warm-up before every other measured run."""
    max_settle_s: float
    """Extra warm-up allowed while the encoder's replica set is still changing."""
    idle_settle_s: float
    """Wait after deploying before the idle memory is read."""
    stream_messages: int
    """The stream path's backlog at saturation (messages put on the stream at once)."""
    stream_steady_s: float
    """How long messages are offered at the steady rate."""

    @classmethod
    def full(cls) -> Plan:
        return cls(
            raw_texts=640,
            raw_passes=3,
            batch_requests=300,
            batch_seconds=20.0,
            single_requests=2000,
            single_seconds=15.0,
            first_warmup_s=20.0,
            warmup_s=5.0,
            max_settle_s=90.0,  # a replica loads in ~25 s on 2 busy cores
            idle_settle_s=10.0,
            stream_messages=4000,
            stream_steady_s=20.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            raw_texts=64,
            raw_passes=1,
            batch_requests=8,
            batch_seconds=3.0,
            single_requests=40,
            single_seconds=3.0,
            first_warmup_s=1.0,
            warmup_s=1.0,
            max_settle_s=0.0,
            idle_settle_s=1.0,
            stream_messages=200,
            stream_steady_s=3.0,
        )

    def single_text(self, concurrency: int) -> LoadSpec:
        return LoadSpec(concurrency, 1, self.single_requests, self.single_seconds)

    def batch_of_32(self) -> LoadSpec:
        return LoadSpec(
            SERVED_BATCH_CONCURRENCY, RAW_BATCH_SIZE, self.batch_requests, self.batch_seconds
        )


def repeat_to(texts: Sequence[str], count: int) -> list[str]:
    """``texts`` repeated in order until there are ``count`` of them."""
    if not texts:
        raise ValueError("no texts to benchmark with")
    return [texts[i % len(texts)] for i in range(count)]


def http_row(result: LoadResult, unit: str, **detail: Any) -> dict[str, Any]:
    return {"unit": unit, **result.to_dict(), "detail": detail}


# --- sections ----------------------------------------------------------------------------------


def bench_raw(config: Path, texts: list[str], plan: Plan) -> dict[str, dict[str, Any]]:
    """The plain classes chained in-process, batch 32, torch at the process's default threads."""
    from bench.pipeline import InProcessPipeline, load_spec

    pipeline = InProcessPipeline(load_spec(config))
    pool = repeat_to(texts, plan.raw_texts)
    batches = [pool[i : i + RAW_BATCH_SIZE] for i in range(0, len(pool), RAW_BATCH_SIZE)]
    pipeline(batches[0])  # warm-up: first-call allocations, lazy initialisation
    rates: list[float] = []
    batch_latencies: list[float] = []
    stage_seconds: dict[str, float] = {}
    total_s = 0.0
    for number in range(plan.raw_passes):
        started = time.perf_counter()
        for batch in batches:
            batch_started = time.perf_counter()
            output = pipeline(batch, stage_seconds)
            batch_latencies.append(time.perf_counter() - batch_started)
            if len(output["label"]) != len(batch):
                raise RuntimeError(
                    f"pipeline returned {len(output['label'])} rows for {len(batch)}"
                )
        elapsed = time.perf_counter() - started
        total_s += elapsed
        rates.append(len(pool) / elapsed)
        logger.info("raw pass %d: %.1f texts/s", number + 1, rates[-1])
    del pipeline
    gc.collect()
    texts_per_s = statistics.median(rates)
    row = {
        "unit": "texts/s",
        "texts_per_s": texts_per_s,
        "requests_per_s": texts_per_s / RAW_BATCH_SIZE,
        "requests": len(batches) * plan.raw_passes,
        "errors": 0,
        **percentiles(batch_latencies),
        "detail": {
            "texts_per_pass": len(pool),
            "batch_size": RAW_BATCH_SIZE,
            "passes_texts_per_s": rates,
            "latency_is": "per batch of 32 texts",
            "stage_share": {k: v / total_s for k, v in stage_seconds.items()},
        },
    }
    return {"raw": row}


def bench_served(config: Path, texts: list[str], plan: Plan) -> dict[str, dict[str, Any]]:
    """The shipped config deployed on a private Ray cluster, measured over HTTP."""
    from bench.memory import PeakMemory, settled_memory
    from bench.served import serve_graph, warm_settle_measure

    cycler = TextCycler(texts)
    rows: dict[str, dict[str, Any]] = {}
    with serve_graph(config) as graph:
        idle = settled_memory(plan.idle_settle_s)
        logger.info("served graph idle: %.0f MiB PSS", idle.pss_bytes / 2**20)
        result, replicas = warm_settle_measure(
            graph,
            plan.batch_of_32(),
            cycler,
            plan.first_warmup_s,
            plan.max_settle_s,
            "served (a) 32 texts/request c=4",
        )
        rows["served_batch32"] = http_row(result, "texts/s", encoder=replicas)
        peak = None
        for concurrency in reporting.CONCURRENCIES:
            with PeakMemory() as memory:
                result, replicas = warm_settle_measure(
                    graph,
                    plan.single_text(concurrency),
                    cycler,
                    plan.warmup_s,
                    plan.max_settle_s,
                    f"served (b) c={concurrency}",
                )
            rows[reporting.row_id("served", concurrency)] = http_row(
                result, "req/s", encoder=replicas
            )
            if peak is None or memory.peak.pss_bytes > peak.pss_bytes:
                peak = memory.peak
            if concurrency == 1:
                rows["served_budget_c1"] = budget_row(graph, config, cycler, plan)
        # The same one-text load through the OIP v2 fronts, REST and gRPC (issue 16): the same
        # traffic core behind each, so the difference is what each protocol's front costs.
        rows.update(bench_protocols(graph, cycler, plan))
        rows["served_memory"] = {
            "unit": "MiB",
            "errors": 0,
            "idle": idle.to_dict(),
            "under_load": None if peak is None else peak.to_dict(),
        }
        # The response cache's hit path: one text asked again and again (compare with (b) c=8,
        # the same load through the models).
        hits = dataclasses.replace(plan.single_text(8), use_cache=True, headers=graph.headers)
        one_text = TextCycler(texts[:1])
        warm_up(graph.predict_url, hits, one_text, plan.warmup_s, "served cache hits c=8")
        rows["served_cached_c8"] = http_row(
            measure(graph.predict_url, hits, one_text, "served cache hits c=8"), "req/s"
        )
    return rows


def bench_stream_path(config: Path, texts: list[str], plan: Plan) -> dict[str, dict[str, Any]]:
    """Redis stream in, the served graph, results out (``bench/streams.py``)."""
    from bench.streams import bench_streams

    return bench_streams(
        config,
        texts,
        plan.stream_messages,
        plan.stream_steady_s,
        plan.first_warmup_s,
        plan.max_settle_s,
    )


def bench_protocols(graph: Any, texts: TextCycler, plan: Plan) -> dict[str, dict[str, Any]]:
    """One text per request through OIP v2 over REST and over gRPC, at c=1 and c=32."""
    from bench.mlserver_peer import V2, infer_url
    from bench.served import warm_settle_measure

    rows: dict[str, dict[str, Any]] = {}
    targets = (("served_v2", "v2 REST", infer_url(graph.base_url)), ("served_grpc", "gRPC", None))
    for concurrency in reporting.PROTOCOL_CONCURRENCIES:
        for system, label, url in targets:
            spec = plan.single_text(concurrency)
            if url is not None:
                spec = dataclasses.replace(spec, protocol=V2)
            result, replicas = warm_settle_measure(
                graph,
                spec,
                texts,
                plan.warmup_s,
                plan.max_settle_s,
                f"served {label} c={concurrency}",
                url=url or graph.grpc_target,
            )
            rows[reporting.row_id(system, concurrency)] = http_row(
                result, "req/s", encoder=replicas
            )
    return rows


def budget_row(graph: Any, config: Path, texts: TextCycler, plan: Plan) -> dict[str, Any]:
    """A c=1 run of its own with the metrics scraped around it: the latency budget."""
    from bench import budget
    from bench.pipeline import APP_NAME, load_spec
    from servecore.pipeline.graph import PREDICTION, Layout

    route = [(hop.group, hop.stages) for hop in Layout(load_spec(config)).route(PREDICTION)]
    spec = dataclasses.replace(plan.single_text(1), headers=graph.headers)

    def read() -> budget.Samples:
        return budget.scrape(graph.metrics_port)

    def requests(samples: budget.Samples) -> float:
        return budget.histogram({}, samples, budget.REQUEST_LATENCY, outcome="ok").count

    before = budget.settled(read, requests)  # the earlier runs' requests all exported
    result = measure(graph.predict_url, spec, texts, "served budget c=1")

    def exported(old: budget.Samples, new: budget.Samples) -> bool:
        return requests(new) - requests(old) >= result.ok

    budget.wait_for_export(read, before, exported)
    after = budget.settled(read, requests)
    found = budget.latency_budget(before, after, result.mean_ms or 0.0, APP_NAME, route)
    return {**http_row(result, "req/s"), "budget": found}


def bench_peer(
    mode: str, config: Path, texts: list[str], plan: Plan, log_dir: Path
) -> dict[str, dict[str, Any]]:
    """One FastAPI peer in its own process, one text per request at each concurrency."""
    from bench.peers import fetch_stats, peer_server

    cycler = TextCycler(texts)
    rows: dict[str, dict[str, Any]] = {}
    with peer_server(mode, config, log_dir) as base_url:
        url = f"{base_url}/v1/predict"
        for concurrency in reporting.CONCURRENCIES:
            label = f"{mode} peer c={concurrency}"
            spec = plan.single_text(concurrency)
            warm_up(url, spec, cycler, plan.warmup_s, label)
            before = fetch_stats(base_url)
            result = measure(url, spec, cycler, label)
            rows[reporting.row_id(mode, concurrency)] = http_row(
                result, "req/s", server_batches=batch_delta(before, fetch_stats(base_url))
            )
    return rows


def bench_mlserver(
    config: Path, texts: list[str], plan: Plan, log_dir: Path
) -> dict[str, dict[str, Any]]:
    """MLServer with adaptive batching over the same classes (its own environment), one text
    per request at each concurrency; skipped, with the reason, where it cannot be built."""
    from bench.mlserver_peer import V2, ensure_env, infer_url, mlserver_server

    python = ensure_env()
    if isinstance(python, str):
        logger.warning("MLServer peer skipped: %s", python)
        return {"mlserver_skipped": {"unit": "", "errors": 0, "reason": python}}
    cycler = TextCycler(texts)
    rows: dict[str, dict[str, Any]] = {}
    with mlserver_server(config, log_dir, python) as base_url:
        url = infer_url(base_url)
        for concurrency in reporting.CONCURRENCIES:
            label = f"mlserver peer c={concurrency}"
            spec = dataclasses.replace(plan.single_text(concurrency), protocol=V2)
            warm_up(url, spec, cycler, plan.warmup_s, label)
            rows[reporting.row_id("mlserver", concurrency)] = http_row(
                measure(url, spec, cycler, label), "req/s"
            )
    return rows


def batch_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """Batches and texts a micro-batching peer ran during one measured run."""
    if "batches" not in before or "batches" not in after:
        return None
    batches = int(after["batches"]) - int(before["batches"])
    texts = int(after["texts"]) - int(before["texts"])
    return {
        "batches": batches,
        "texts": texts,
        "mean_texts_per_batch": texts / batches if batches else None,
    }


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the served intent graph against in-process and FastAPI peers.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts, for a smoke test (~2 minutes)"
    )
    reporting.add_common_arguments(parser, "latest.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One log line per request would flood the output and cost the load generator CPU.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from servecore.dataset import load_split

    plan = Plan.quick() if args.quick else Plan.full()
    config = args.config.resolve()
    texts, _ = load_split("test")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    started_unix = time.time()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_at": datetime.datetime.fromtimestamp(started_unix).isoformat(timespec="seconds"),
        "started_unix": started_unix,
        "config": str(config),
        "texts": {"split": "test", "unique": len(texts)},
        "plan": asdict(plan),
        "machine": reporting.machine_facts(),
        "peer_logs": str(log_dir),
        "results": {},
        "failures": [],
    }
    logger.info("benchmark (%s) of %s; peer logs in %s", report["mode"], config, log_dir)

    sections: list[tuple[str, Callable[[], dict[str, dict[str, Any]]]]] = [
        ("raw in-process", lambda: bench_raw(config, texts, plan)),
        ("served graph", lambda: bench_served(config, texts, plan)),
        ("stream path", lambda: bench_stream_path(config, texts, plan)),
        ("unbatched peer", lambda: bench_peer("unbatched", config, texts, plan, log_dir)),
        ("micro-batching peer", lambda: bench_peer("microbatch", config, texts, plan, log_dir)),
        ("MLServer peer", lambda: bench_mlserver(config, texts, plan, log_dir)),
    ]
    for name, section in sections:
        section_started = time.perf_counter()
        logger.info("== %s", name)
        try:
            report["results"].update(section())
        except Exception as e:  # noqa: BLE001 - recorded, reported, and fails the run at the end
            logger.exception("section %r failed", name)
            report["failures"].append({"section": name, "error": f"{type(e).__name__}: {e}"})
        logger.info("== %s done in %.0fs", name, time.perf_counter() - section_started)

    report["duration_s"] = time.time() - started_unix
    reporting.finish(report)
    paths = reporting.write_json(report, args.output)
    # After the JSON, and never fatal: a missing matplotlib or a bad row must not lose the numbers.
    try:
        from bench.plot import write_plots

        paths += write_plots(report, args.output)
    except Exception:  # noqa: BLE001 - the JSON is saved; the plot can be redrawn with bench.plot
        logger.exception("latency/throughput plot failed; redraw it with `python -m bench.plot`")
    print(reporting.render(report))
    logger.info("results written to %s", ", ".join(str(p) for p in paths))
    errors = sum(int(row.get("errors", 0)) for row in report["results"].values())
    if errors:
        logger.error("%d requests failed in measured runs; see error_samples in the JSON", errors)
    return 1 if report["failures"] or errors else 0
