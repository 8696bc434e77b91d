"""Latency against throughput, drawn from one serving-benchmark result.

``python -m bench.plot [RESULT_JSON] [--output PNG]`` draws ``bench/results/latest.json`` into
``bench/results/latency-throughput.png``; ``python -m bench`` calls :func:`write_plots` right after
it has saved its JSON. Each system measured at several concurrencies (the ``<system>_c<N>`` rows)
is one colour: p50 solid with markers, p95 dashed, every point labelled with its concurrency.

matplotlib is imported only when a figure is drawn, so importing this module never needs it. The
figure is drawn on an Agg canvas of its own (no pyplot, no global backend) at a fixed size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report as reporting

logger = logging.getLogger("bench.plot")

RESULTS_DIR = reporting.ROOT / "bench" / "results"
LATEST_PNG = "latency-throughput.png"
FIGURE_INCHES = (8.0, 5.0)
DPI = 120

SCENARIO = re.compile(r"(?P<system>.+)_c(?P<concurrency>\d+)")
"""A single-text measurement at one concurrency: ``served_c8``, ``microbatch_c32``, ..."""

SYSTEM_TITLES = {
    "served": "served graph (Ray Serve)",
    "unbatched": "unbatched FastAPI peer",
    "microbatch": "micro-batching FastAPI peer",
}
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass(frozen=True)
class Point:
    """One measured run of a system at one concurrency."""

    concurrency: int
    texts_per_s: float
    p50_ms: float
    p95_ms: float | None
    errors: int = 0


def curves(result: Mapping[str, Any]) -> dict[str, list[Point]]:
    """The systems measured at two or more concurrencies, each with its points by concurrency.

    ``result`` is a whole benchmark report (its ``results`` map is read). Rows without a
    ``_c<N>`` suffix (``raw``, ``served_batch32``) are left out, and so are systems with one
    point only (``served_cached_c8``): a single point is no curve. Systems keep the order in
    which the report lists them.
    """
    grouped: dict[str, list[Point]] = {}
    for key, row in result.get("results", {}).items():
        match = SCENARIO.fullmatch(key)
        if match is None or row.get("texts_per_s") is None or row.get("p50_ms") is None:
            continue
        grouped.setdefault(match["system"], []).append(
            Point(
                concurrency=int(match["concurrency"]),
                texts_per_s=float(row["texts_per_s"]),
                p50_ms=float(row["p50_ms"]),
                p95_ms=None if row.get("p95_ms") is None else float(row["p95_ms"]),
                errors=int(row.get("errors", 0)),
            )
        )
    return {
        system: sorted(points, key=lambda point: point.concurrency)
        for system, points in grouped.items()
        if len(points) >= 2
    }


def subtitle(result: Mapping[str, Any]) -> str:
    """Which run the numbers come from: mode, start time, machine and commit."""
    machine = result.get("machine", {})
    parts = [f"{result.get('mode', '?')} run {result.get('started_at', '?')}"]
    cpus = machine.get("cpu_count")
    if cpus:
        model = machine.get("cpu_model")
        parts.append(f"{cpus} CPUs" + (f" ({model})" if model else ""))
    commit = machine.get("git_commit")
    if commit:
        parts.append(
            f"commit {commit[:7]}" + (" + local changes" if machine.get("git_dirty") else "")
        )
    return ", ".join(parts)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "the latency/throughput plot needs matplotlib, which comes with the dev extra: "
            "pip install -e '.[dev]' (or `make install`)"
        ) from e
    return Figure, FigureCanvasAgg


def plot_latency_throughput(result: Mapping[str, Any], path: Path) -> Path:
    """Draw p50 and p95 latency against texts/s for every system in ``result`` into ``path``."""
    lines = curves(result)
    if not lines:
        raise ValueError("no system was measured at two or more concurrencies; nothing to plot")
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    handles = []
    labels: list[tuple[Point, str]] = []
    for index, (system, points) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        throughput = [point.texts_per_s for point in points]
        axes.plot(throughput, [p.p50_ms for p in points], "-o", color=colour, markersize=6)
        tails = [(p.texts_per_s, p.p95_ms) for p in points if p.p95_ms is not None]
        if tails:
            axes.plot(*zip(*tails, strict=True), "--", color=colour, marker="o", markersize=3)
        labels += [(point, colour) for point in points]
        handles.append(
            Line2D([], [], color=colour, marker="o", label=SYSTEM_TITLES.get(system, system))
        )
    raw = result.get("results", {}).get("raw", {}).get("texts_per_s")
    if raw:
        axes.axvline(raw, color="grey", linestyle=":", linewidth=1)
        handles.append(
            Line2D([], [], color="grey", linestyle=":", label="in-process ceiling (batch 32)")
        )

    # Latency spans tens of milliseconds to seconds: a log axis keeps c=1 readable next to c=32.
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    low, high = axes.get_ylim()
    axes.set_ylim(low / 1.3, high * 1.2)  # room for the labels under the lowest points
    axes.set_xlim(0, axes.get_xlim()[1])
    _label_points(axes, labels)
    axes.set_xlabel("throughput (texts/s, one text per request)")
    axes.set_ylabel("latency per request (ms, log scale)")
    axes.grid(True, which="major", alpha=0.4)
    axes.add_artist(axes.legend(handles=handles, loc="upper left", fontsize=8))
    axes.legend(
        handles=[
            Line2D([], [], color="black", marker="o", label="p50"),
            Line2D([], [], color="black", linestyle="--", marker="o", markersize=3, label="p95"),
        ],
        loc="lower right",
        fontsize=8,
        title="c = requests in flight",
        title_fontsize=8,
    )
    figure.suptitle("Latency against throughput, one text per request", fontsize=12)
    axes.set_title(subtitle(result), fontsize=9)

    path.parent.mkdir(parents=True, exist_ok=True)
    # A fixed size (no tight bounding box) and no matplotlib version in the PNG's metadata.
    figure.savefig(path, format="png", metadata={"Software": None})
    logger.info("latency/throughput plot written to %s", path)
    return path


LABEL_OFFSETS = ((6, -12), (6, 4), (-6, -12), (-6, 4), (6, -22), (-6, 14))
"""Where a concurrency label may sit, in points from its marker: right first, then left."""


def _label_points(axes: Any, labels: Sequence[tuple[Point, str]]) -> None:
    """Write ``c=N`` next to each p50 marker, at the first offset clear of the lines, markers and
    labels already drawn (systems that reach the same throughput would overlap otherwise)."""
    to_points = 72.0 / axes.figure.dpi
    taken: list[tuple[float, float, float, float]] = []
    for line in axes.get_lines():
        vertices = line.get_transform().transform(line.get_xydata()) * to_points
        for (x0, y0), (x1, y1) in itertools.pairwise(vertices):
            steps = max(1, int(math.hypot(x1 - x0, y1 - y0) / 3))
            for step in range(steps + 1):
                x, y = x0 + (x1 - x0) * step / steps, y0 + (y1 - y0) * step / steps
                taken.append((x - 2, y - 2, x + 2, y + 2))
        taken += [(x - 4, y - 4, x + 4, y + 4) for x, y in vertices]
    for point, colour in labels:
        text = f"c={point.concurrency}" + (f", {point.errors} failed" if point.errors else "")
        x, y = axes.transData.transform((point.texts_per_s, point.p50_ms)) * to_points
        width, height = 4.8 * len(text), 8.0  # 8-point text, roughly
        chosen = LABEL_OFFSETS[0]
        for dx, dy in LABEL_OFFSETS:
            left = x + dx if dx >= 0 else x + dx - width
            box = (left, y + dy, left + width, y + dy + height)
            if not any(_overlap(box, other) for other in taken):
                chosen = (dx, dy)
                break
        dx, dy = chosen
        left = x + dx if dx >= 0 else x + dx - width
        taken.append((left, y + dy, left + width, y + dy + height))
        axes.annotate(
            text,
            (point.texts_per_s, point.p50_ms),
            xytext=chosen,
            textcoords="offset points",
            ha="left" if dx >= 0 else "right",
            va="bottom",
            fontsize=8,
            color=colour,
        )


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def write_plots(result: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """``latency-throughput.png`` and ``bench-<stamp>.png`` next to the run's JSON files."""
    latest = plot_latency_throughput(result, output_dir / LATEST_PNG)
    stamped = output_dir / f"bench-{reporting.stamp(result)}.png"
    shutil.copyfile(latest, stamped)
    logger.info("latency/throughput plot copied to %s", stamped)
    return [latest, stamped]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plot",
        description="Draw p50/p95 latency against throughput from a serving-benchmark result.",
    )
    parser.add_argument(
        "result",
        nargs="?",
        type=Path,
        default=RESULTS_DIR / "latest.json",
        help="result JSON written by `python -m bench` (default: bench/results/latest.json)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR / LATEST_PNG,
        help=f"PNG to write (default: bench/results/{LATEST_PNG})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = json.loads(args.result.read_text())
        plot_latency_throughput(result, args.output)
    except (OSError, ValueError, ImportError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
