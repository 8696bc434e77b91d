"""The benchmark's outputs: the markdown table, the target ratios, machine facts and the JSON files.

Every row carries its error count. A target only counts as met when its ratio clears the bar and
every measurement it is computed from finished without a single failed request.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ray", "torch", "transformers", "fastapi", "uvicorn", "httpx", "numpy", "mlflow")
CONCURRENCIES = (1, 8, 32)
PROTOCOL_CONCURRENCIES = (1, 32)
"""Where the OIP v2 fronts (REST and gRPC) are measured beside v1."""
BUSY_LOAD_PER_CPU = 0.5
"""A 1-minute load average above this many per CPU at the start marks the run as disturbed."""


def row_id(system: str, concurrency: int) -> str:
    """Key of a single-text measurement: ``served_c8``, ``unbatched_c32``, ..."""
    return f"{system}_c{concurrency}"


ROW_TITLES: dict[str, str] = {
    "raw": "raw in-process, batch 32 (latency per batch)",
    "served_batch32": "served (a): 32 texts/request, c=4",
    **{row_id("served", c): f"served (b): 1 text/request, c={c}" for c in CONCURRENCIES},
    "served_cached_c8": "served, response-cache hits: 1 repeated text/request, c=8",
    "stream_saturation": "stream path: a backlog on a Redis stream, results out (end to end)",
    "stream_steady": "stream path at a steady rate, half of saturation (end to end)",
    **{
        row_id("served_v2", c): f"served, OIP v2 REST: 1 text/request, c={c}"
        for c in PROTOCOL_CONCURRENCIES
    },
    **{
        row_id("served_grpc", c): f"served, OIP v2 gRPC: 1 text/request, c={c}"
        for c in PROTOCOL_CONCURRENCIES
    },
    **{row_id("unbatched", c): f"unbatched FastAPI peer, c={c}" for c in CONCURRENCIES},
    **{row_id("microbatch", c): f"micro-batching FastAPI peer, c={c}" for c in CONCURRENCIES},
    **{row_id("mlserver", c): f"MLServer adaptive batching, c={c}" for c in CONCURRENCIES},
}


@dataclass(frozen=True)
class Ratio:
    key: str
    title: str
    numerator: str
    denominator: str
    metric: str
    """``texts_per_s``, ``requests_per_s`` or ``p50_ms``."""
    target: float | None
    at_most: bool = False
    """The target is a ceiling (latency), not a floor (throughput)."""


RATIOS = (
    Ratio(
        "served_vs_microbatch_c32",
        "served c=32 req/s ÷ micro-batching peer c=32 req/s",
        row_id("served", 32),
        row_id("microbatch", 32),
        "requests_per_s",
        0.85,
    ),
    Ratio(
        "served_vs_mlserver_c32",
        "served c=32 req/s ÷ MLServer c=32 req/s",
        row_id("served", 32),
        row_id("mlserver", 32),
        "requests_per_s",
        1.0,
    ),
    Ratio(
        "served_vs_unbatched_c1_p50",
        "served c=1 p50 ÷ unbatched peer c=1 p50 (lower is better)",
        row_id("served", 1),
        row_id("unbatched", 1),
        "p50_ms",
        1.5,
        at_most=True,
    ),
    Ratio(
        "served_vs_raw",
        "(a) 32 texts/request c=4: served texts/s ÷ raw texts/s",
        "served_batch32",
        "raw",
        "texts_per_s",
        0.90,
    ),
    Ratio(
        "served_vs_unbatched_c32",
        "served c=32 req/s ÷ unbatched peer c=32 req/s",
        row_id("served", 32),
        row_id("unbatched", 32),
        "requests_per_s",
        None,
    ),
    Ratio(
        "served_c32_vs_c8",
        "served c=32 req/s ÷ served c=8 req/s (never falls)",
        row_id("served", 32),
        row_id("served", 8),
        "requests_per_s",
        1.0,
    ),
    Ratio(
        "v2_rest_vs_v1_c32",
        "served OIP v2 REST c=32 req/s ÷ served v1 c=32 req/s",
        row_id("served_v2", 32),
        row_id("served", 32),
        "requests_per_s",
        0.90,
    ),
    Ratio(
        "v2_rest_vs_v1_c1_p50",
        "served OIP v2 REST c=1 p50 ÷ served v1 c=1 p50 (lower is better)",
        row_id("served_v2", 1),
        row_id("served", 1),
        "p50_ms",
        None,
        at_most=True,
    ),
    Ratio(
        "grpc_vs_v1_c32",
        "served OIP v2 gRPC c=32 req/s ÷ served v1 c=32 req/s",
        row_id("served_grpc", 32),
        row_id("served", 32),
        "requests_per_s",
        None,
    ),
    Ratio(
        "grpc_vs_v1_c1_p50",
        "served OIP v2 gRPC c=1 p50 ÷ served v1 c=1 p50 (lower is better)",
        row_id("served_grpc", 1),
        row_id("served", 1),
        "p50_ms",
        None,
        at_most=True,
    ),
    Ratio(
        "stream_vs_raw",
        "stream path messages/s at saturation ÷ raw in-process texts/s",
        "stream_saturation",
        "raw",
        "texts_per_s",
        0.85,
    ),
    Ratio(
        "cache_hits_vs_model_c8",
        "served cache hits c=8 req/s ÷ served (b) c=8 req/s (the hit path against the models)",
        "served_cached_c8",
        row_id("served", 8),
        "requests_per_s",
        None,
    ),
)


def compute_ratios(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ratio in RATIOS:
        top, bottom = results.get(ratio.numerator), results.get(ratio.denominator)
        value = None
        errors = 0
        if top is not None and bottom is not None and bottom.get(ratio.metric):
            value = float(top[ratio.metric]) / float(bottom[ratio.metric])
            errors = int(top.get("errors", 0)) + int(bottom.get("errors", 0))
        if value is None:
            verdict = "n/a (not measured)"
        elif ratio.target is None:
            verdict = "(no target)"
        elif errors:
            verdict = f"NOT met ({errors} failed requests)"
        else:
            met = value <= ratio.target if ratio.at_most else value >= ratio.target
            verdict = "met" if met else "NOT met"
        out[ratio.key] = ratio_entry(
            ratio, value, verdict, "met", metric=ratio.metric, at_most=ratio.at_most
        )
    return out


def ratio_entry(ratio: Any, value: float | None, verdict: str, met_word: str, **extra: Any) -> dict:
    """The JSON record of one ratio (``ratio`` has title, numerator, denominator and target);
    ``met`` is whether ``verdict`` is ``met_word``, None for ratios without a target."""
    return {
        "title": ratio.title,
        "numerator": ratio.numerator,
        "denominator": ratio.denominator,
        **extra,
        "value": value,
        "target": ratio.target,
        "met": None if ratio.target is None or value is None else verdict == met_word,
        "verdict": verdict,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| Measurement | Throughput | p50 ms | p95 ms | p99 ms | Requests | Errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, title in ROW_TITLES.items():
        row = results.get(key)
        if row is None:
            lines.append(f"| {title} | not measured | – | – | – | – | – |")
            continue
        if row["unit"] == "texts/s":
            throughput = f"{row['texts_per_s']:.1f} texts/s"
        else:
            throughput = f"{row['requests_per_s']:.1f} req/s"
        lines.append(
            f"| {title} | {throughput} | {_ms(row.get('p50_ms'))} | {_ms(row.get('p95_ms'))} | "
            f"{_ms(row.get('p99_ms'))} | {row.get('requests', 0)} | {row.get('errors', 0)} |"
        )
    return "\n".join(lines)


def markdown_ratios(ratios: Mapping[str, Mapping[str, Any]], bold_targets: bool = False) -> str:
    """The ratio table; ``bold_targets`` sets the titles of ratios with a target in bold."""
    lines = ["| Ratio | Value | Target | Verdict |", "|---|---:|---:|---|"]
    for item in ratios.values():
        value = "–" if item["value"] is None else f"{item['value']:.2f}"
        sign = "≤" if item.get("at_most") else "≥"
        target = "–" if item["target"] is None else f"{sign} {item['target']:.2f}"
        title = item["title"]
        if bold_targets and item["target"] is not None:
            title = f"**{title}**"
        lines.append(f"| {title} | {value} | {target} | {item['verdict']} |")
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, latest_name: str) -> None:
    """``--config`` and ``--output``, shared by the benchmarks."""
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "serve_config.yaml",
        help="Serve config with the 'intent' application (default: serve_config.yaml)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "bench" / "results",
        help=f"folder for {latest_name} and the timestamped copy (default: bench/results)",
    )


def render(report: Mapping[str, Any]) -> str:
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    parts = [
        f"## Benchmark ({report['mode']}, {report['started_at']}, {report['duration_s']:.0f}s)",
        "",
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), torch threads "
        f"{machine['torch_threads']}, load average at start {machine['loadavg_start']}; "
        f"{versions}.",
        "",
        markdown_table(report["results"]),
        "",
        markdown_ratios(report["ratios"]),
    ]
    cpu = report["results"].get("served_c32", {}).get("detail", {}).get("encoder", {})
    cpu = cpu.get("cpu_ms_per_request") if isinstance(cpu, dict) else None
    if cpu:
        parts += ["", markdown_cpu(cpu)]
    found = report["results"].get("served_budget_c1", {}).get("budget")
    if found:
        from bench.budget import markdown as budget_markdown

        parts += ["", budget_markdown(found)]
    memory = report["results"].get("served_memory")
    if memory:
        parts += ["", markdown_memory(memory)]
    skipped = report["results"].get("mlserver_skipped")
    if skipped:
        parts += ["", f"MLServer peer skipped: {skipped['reason']}"]
    notes = run_notes(report)
    if notes:
        parts += ["", *(f"- {note}" for note in notes)]
    if report["failures"]:
        parts += ["", "**Sections that failed:**", ""]
        parts += [f"- {f['section']}: {f['error']}" for f in report["failures"]]
    return "\n".join(parts) + "\n"


def markdown_cpu(cpu_ms: Mapping[str, float]) -> str:
    """Where the machine's CPU went during served (b) at c=32, per answered request."""
    lines = [
        "Where the CPU goes, served (b) c=32 (ms of CPU per request, all processes):",
        "",
        "| process | ms/request |",
        "|---|---:|",
    ]
    lines += [f"| {group} | {ms:.1f} |" for group, ms in cpu_ms.items()]
    lines.append(f"| **total** | **{sum(cpu_ms.values()):.1f}** |")
    return "\n".join(lines)


def markdown_memory(memory: Mapping[str, Any]) -> str:
    """The served application's PSS, idle and at its peak under load, by role."""
    idle, load = memory["idle"], memory.get("under_load") or {}
    roles = list(idle["pss_mib_by_role"])
    roles += [r for r in load.get("pss_mib_by_role", {}) if r not in roles]
    lines = [
        "Memory of the served application (PSS, MiB; every process below the one that started "
        "Ray):",
        "",
        "| process | idle | peak under load |",
        "|---|---:|---:|",
    ]
    for role in roles:
        at_load = load.get("pss_mib_by_role", {}).get(role)
        lines.append(
            f"| {role} | {idle['pss_mib_by_role'].get(role, 0):.0f} | "
            f"{'–' if at_load is None else f'{at_load:.0f}'} |"
        )
    lines.append(
        f"| **total** ({idle['processes']} processes idle) | **{idle['pss_mib']:.0f}** | "
        f"**{load.get('pss_mib', 0):.0f}** |"
    )
    return "\n".join(lines)


def run_notes(report: Mapping[str, Any]) -> list[str]:
    """What a reader needs to interpret the rows: a busy machine, replicas, batch fill."""
    notes = []
    machine = report["machine"]
    load = machine.get("loadavg_start")
    cpus = machine.get("cpus_available") or 1
    if load and load[0] > BUSY_LOAD_PER_CPU * cpus:
        notes.append(
            f"**The machine was busy** (1-minute load average {load[0]} on {cpus} CPUs at the "
            "start): other processes competed for the cores; compare with a run on an idle machine."
        )
    results = report["results"]
    replicas = []
    short = {"served_batch32": "(a)", **{row_id("served", c): f"(b) c={c}" for c in CONCURRENCIES}}
    for key, label in short.items():
        seen = results.get(key, {}).get("detail", {}).get("encoder")
        if seen:
            replicas.append(f"{label}: {seen['after']['replica_states'].get('RUNNING', 0)}")
    if replicas:
        notes.append(
            "Replicas of the encoder's group running after each served run: " + "; ".join(replicas)
        )
    fills = []
    for c in CONCURRENCIES:
        delta = results.get(row_id("microbatch", c), {}).get("detail", {}).get("server_batches")
        if delta and delta.get("mean_texts_per_batch") is not None:
            fills.append(f"c={c}: {delta['mean_texts_per_batch']:.1f}")
    if fills:
        notes.append("Micro-batching peer, mean texts per batch: " + "; ".join(fills))
    return notes


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: cores, torch threads, versions, and how busy the machine was."""
    import torch

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    status = _git("status", "--porcelain")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_available": len(affinity) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def finish(report: dict[str, Any]) -> None:
    """Fill in what is known only at the end: load average, ratios."""
    report["machine"]["loadavg_end"] = _loadavg()
    report["ratios"] = compute_ratios(report["results"])


def stamp(report: Mapping[str, Any]) -> str:
    """The run's start as ``YYYYmmdd-HHMMSS`` (local time), for the names of its files."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(report["started_unix"]))


def write_json(report: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """``latest.json`` and ``bench-YYYYmmdd-HHMMSS.json`` in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"
    paths = [output_dir / "latest.json", output_dir / f"bench-{stamp(report)}.json"]
    for path in paths:
        path.write_text(text)
    return paths
