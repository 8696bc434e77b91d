"""The benchmark's latency/throughput figure, drawn from a small made-up result (no Ray)."""

from __future__ import annotations

import sys

import pytest

from bench import report as reporting
from bench.plot import Point, curves, plot_latency_throughput, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(concurrency: int, texts_per_s: float, p50_ms: float, p95_ms: float) -> dict:
    return {
        "concurrency": concurrency,
        "texts_per_s": texts_per_s,
        "requests_per_s": texts_per_s,
        "p50_ms": p50_ms,
        "p95_ms": p95_ms,
        "errors": 0,
    }


@pytest.fixture
def result() -> dict:
    # Rows out of concurrency order, plus rows that are no curve: no `_c<N>` suffix, one point.
    return {
        "mode": "quick",
        "started_at": "2026-01-02T03:04:05",
        "started_unix": 1767322800.0,
        "machine": {"cpu_count": 2, "cpu_model": "test CPU", "git_commit": "0123456789abcdef"},
        "results": {
            "raw": {"texts_per_s": 80.0, "p50_ms": 400.0, "p95_ms": 500.0},
            "served_batch32": _row(4, 60.0, 2000.0, 2800.0),
            "served_c8": _row(8, 17.0, 460.0, 660.0),
            "served_c1": _row(1, 10.0, 100.0, 130.0),
            "served_c32": _row(32, 31.0, 950.0, 1500.0),
            "served_cached_c8": _row(8, 60.0, 130.0, 200.0),
            "peer_c1": _row(1, 25.0, 37.0, 60.0),
            "peer_c8": _row(8, 35.0, 225.0, 290.0),
            "peer_c32": _row(32, 55.0, 570.0, 680.0),
        },
    }


def test_curves_group_by_system_in_concurrency_order(result):
    lines = curves(result)
    assert list(lines) == ["served", "peer"]  # no raw, served_batch32 or served_cached
    assert lines["served"] == [
        Point(1, 10.0, 100.0, 130.0),
        Point(8, 17.0, 460.0, 660.0),
        Point(32, 31.0, 950.0, 1500.0),
    ]
    assert [p.concurrency for p in lines["peer"]] == [1, 8, 32]
    assert [p.texts_per_s for p in lines["peer"]] == [25.0, 35.0, 55.0]


def test_plot_is_a_png_of_fixed_size(result, tmp_path):
    path = plot_latency_throughput(result, tmp_path / "figures" / "plot.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (960, 600)  # 8 x 5 inches at 120 dpi


def test_write_plots_names_the_files_like_the_json(result, tmp_path):
    paths = write_plots(result, tmp_path)
    assert [p.name for p in paths] == [
        "latency-throughput.png",
        f"bench-{reporting.stamp(result)}.png",
    ]
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_nothing_to_plot_is_an_error(result, tmp_path):
    result["results"] = {"raw": result["results"]["raw"]}
    with pytest.raises(ValueError, match="two or more concurrencies"):
        plot_latency_throughput(result, tmp_path / "plot.png")


def test_missing_matplotlib_names_the_dev_extra(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"\.\[dev\]"):
        plot_latency_throughput(result, tmp_path / "plot.png")
