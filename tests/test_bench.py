"""The benchmark's own parts: the in-process pipeline it measures as the ceiling, and its maths."""

from __future__ import annotations

import pytest

from bench.loadgen import percentiles
from bench.report import compute_ratios, markdown_ratios
from servecore import LABELS
from tests.conftest import ROOT, STAGES


def test_in_process_pipeline_runs_the_registered_models(registry):
    from bench.pipeline import InProcessPipeline, load_spec

    pipeline = InProcessPipeline(load_spec(ROOT / "serve_config.yaml"))
    seconds: dict[str, float] = {}
    out = pipeline(["I was charged twice", "my parcel never arrived"], stage_seconds=seconds)
    assert out["label"].tolist() == ["billing", "delivery"]
    assert out["probs"].shape == (2, len(LABELS))
    assert set(seconds) == set(STAGES)
    assert [m["stage"] for m in pipeline.models()] == [
        "Tokenizer",
        "Encoder",
        "LinearHead",
        "MLPHead",
        "BagOfWords",
    ]


def test_the_batch_benchmarks_plain_loop_scores_and_writes_every_row(registry, tmp_path):
    import pyarrow.parquet as pq

    from bench.batch import run_plain, write_input

    texts = ["I was charged twice", "my parcel never arrived", "reset my password"]
    source = write_input(texts, 10, tmp_path / "input.parquet")
    result = run_plain(ROOT / "serve_config.yaml", source, tmp_path / "plain.parquet", 4)
    assert result.rows == 10 and result.labels == tuple(LABELS)
    assert set(result.model_versions) >= {"Encoder", "LinearHead", "MLPHead", "BagOfWords"}
    written = pq.read_table(tmp_path / "plain.parquet").to_pydict()
    assert written["label"][:3] == ["billing", "delivery", "account_access"]
    assert len(written["label"]) == 10 and written["id"] == sorted(written["id"])


def test_percentiles_in_milliseconds():
    stats = percentiles([0.001 * i for i in range(1, 101)])
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert percentiles([])["p99_ms"] is None


def _row(rps: float, tps: float | None = None, errors: int = 0, p50: float = 10.0) -> dict:
    return {
        "requests_per_s": rps,
        "texts_per_s": tps if tps is not None else rps,
        "errors": errors,
        "p50_ms": p50,
    }


def test_ratio_verdicts_need_the_target_and_no_errors():
    results = {
        "raw": _row(2.0, 64.0),
        "served_batch32": _row(2.0, 60.0),
        "served_c1": _row(50.0, p50=15.0),
        "unbatched_c1": _row(70.0, p50=10.0),
        "served_c8": _row(20.0),
        "served_c32": _row(30.0, errors=1),
        "unbatched_c32": _row(15.0),
        "microbatch_c32": _row(60.0),
    }
    ratios = compute_ratios(results)
    assert ratios["served_vs_raw"]["value"] == pytest.approx(60 / 64)
    assert ratios["served_vs_raw"]["met"] is True  # 0.94 against a floor of 0.90
    assert ratios["served_vs_microbatch_c32"]["value"] == pytest.approx(0.5)
    assert ratios["served_vs_microbatch_c32"]["met"] is False  # a failed request voids it too
    assert ratios["served_vs_unbatched_c32"]["met"] is None  # no target
    assert ratios["served_vs_mlserver_c32"]["verdict"] == "n/a (not measured)"
    # Latency is a ceiling: 1.5 times the peer's p50 is the most that still meets it.
    assert ratios["served_vs_unbatched_c1_p50"]["value"] == pytest.approx(1.5)
    assert ratios["served_vs_unbatched_c1_p50"]["met"] is True
    slower = compute_ratios({**results, "served_c1": _row(50.0, p50=15.1)})
    assert slower["served_vs_unbatched_c1_p50"]["met"] is False
    assert "≤ 1.50" in markdown_ratios(slower)
