"""The batch benchmark's pure parts: its input, the steady-state rate, the output check, the ratios.

None of these start Ray or load a model; the measurement itself runs in ``make bench``.
"""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.batch import (
    PLAIN_SCORING,
    PLAIN_WITH_LOAD,
    RAY_JOB,
    RAY_STEADY,
    PlainResult,
    RayResult,
    compare_outputs,
    compute_ratios,
    dataset_texts,
    input_table,
    render,
    steady_state,
    verdict,
    write_input,
)
from tests.conftest import ROOT

# --- input -------------------------------------------------------------------------------------


def test_input_cycles_the_texts_with_a_unique_string_id_per_row():
    table = input_table(["a", "b", "c"], 7)
    assert table.column_names == ["id", "text"]
    assert table.schema.field("id").type == pa.string()
    assert table.column("text").to_pylist() == ["a", "b", "c", "a", "b", "c", "a"]
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 7
    assert ids[0] == "row-0" and ids[-1] == "row-6"


def test_input_ids_sort_in_row_order():
    ids = input_table(["a"], 12).column("id").to_pylist()
    assert ids == sorted(ids)


def test_input_needs_texts():
    with pytest.raises(ValueError, match="no texts"):
        input_table([], 3)


def test_write_input_makes_one_parquet_file(tmp_path):
    path = write_input(["x", "y"], 5, tmp_path / "input" / "texts.parquet")
    assert list((tmp_path / "input").iterdir()) == [path]
    assert pq.read_table(path).num_rows == 5


def test_dataset_texts_takes_every_split(tmp_path):
    csv_path = tmp_path / "intents.csv"
    csv_path.write_text(
        'id,text,label,split\nm1,"first, with a comma",billing,train\nm2,second,delivery,test\n'
    )
    assert dataset_texts(csv_path) == ["first, with a comma", "second"]


def test_the_shipped_dataset_gives_more_texts_than_the_test_split():
    from servecore.dataset import dataset_path, load_split

    texts = dataset_texts(dataset_path())
    assert len(texts) == len(load_split("train")[0]) + len(load_split("test")[0])


# --- steady state ------------------------------------------------------------------------------


def test_steady_state_leaves_out_the_first_file():
    # Unordered on purpose: files are listed by name, the rate goes by modification time.
    state = steady_state([(14.0, 50), (10.0, 100), (12.0, 100)])
    assert state.files == 3
    assert state.rows == 150
    assert state.seconds == pytest.approx(4.0)
    assert state.rows_per_s == pytest.approx(37.5)
    assert state.note is None


@pytest.mark.parametrize("files", [[], [(1.0, 10)], [(1.0, 10), (2.0, 10)]])
def test_steady_state_needs_three_files(files):
    state = steady_state(files)
    assert state.rows_per_s is None
    assert state.note is not None and f"only {len(files)} output file" in state.note


def test_steady_state_of_files_written_at_once_is_unknown():
    state = steady_state([(5.0, 10), (5.0, 10), (5.0, 10)])
    assert state.rows_per_s is None
    assert state.note == "every output file has the same mtime"


# --- output check ------------------------------------------------------------------------------

LABELS = ("billing", "delivery")


def _output(ids, labels, billing, versions="Encoder=m/1"):
    return pa.table(
        {
            "id": ids,
            "label": labels,
            "prob_billing": pa.array(billing, type=pa.float32()),
            "prob_delivery": pa.array([1 - p for p in billing], type=pa.float32()),
            "model_versions": [versions] * len(ids),
        }
    )


def test_outputs_agree_whatever_the_row_order():
    plain = _output(["a", "b", "c"], ["billing", "delivery", "billing"], [0.9, 0.2, 0.7])
    ray = _output(["c", "a", "b"], ["billing", "billing", "delivery"], [0.7, 0.9, 0.2])
    agreement = compare_outputs(plain, ray, LABELS)
    assert agreement.ok
    assert agreement.rows == 3
    assert agreement.max_abs_diff == pytest.approx(0.0)
    assert "outputs AGREE" in agreement.format()


def test_a_different_label_or_probability_is_a_disagreement():
    plain = _output(["a", "b"], ["billing", "delivery"], [0.9, 0.2])
    relabelled = compare_outputs(
        plain, _output(["a", "b"], ["billing", "billing"], [0.9, 0.2]), LABELS
    )
    assert relabelled.label_mismatches == 1 and not relabelled.ok
    shifted = compare_outputs(
        plain, _output(["a", "b"], ["billing", "delivery"], [0.9, 0.25]), LABELS
    )
    assert shifted.label_mismatches == 0
    assert shifted.max_abs_diff == pytest.approx(0.05, abs=1e-6)
    assert not shifted.ok
    assert "DIFFER" in shifted.format()


def test_tiny_float_noise_is_within_tolerance():
    plain = _output(["a"], ["billing"], [0.9])
    ray = _output(["a"], ["billing"], [0.9 + 5e-7])
    assert compare_outputs(plain, ray, LABELS).ok


def test_missing_and_repeated_ids_are_a_disagreement():
    plain = _output(["a", "b"], ["billing", "billing"], [0.9, 0.9])
    missing = compare_outputs(plain, _output(["a"], ["billing"], [0.9]), LABELS)
    assert (missing.missing_ids, missing.unexpected_ids, missing.ok) == (1, 0, False)
    repeated = _output(["a", "b", "b"], ["billing"] * 3, [0.9] * 3)
    twice = compare_outputs(plain, repeated, LABELS)
    assert (twice.missing_ids, twice.unexpected_ids, twice.ok) == (0, 1, False)
    assert "1 ids missing" in missing.format()


def test_different_model_versions_are_a_disagreement():
    plain = _output(["a"], ["billing"], [0.9])
    assert not compare_outputs(plain, plain, LABELS, versions_match=False).ok


# --- ratios and the report ---------------------------------------------------------------------


def _rates(plain_scoring=100.0, plain_with_load=80.0, ray_job=75.0, ray_steady=95.0):
    return {
        PLAIN_SCORING: plain_scoring,
        PLAIN_WITH_LOAD: plain_with_load,
        RAY_JOB: ray_job,
        RAY_STEADY: ray_steady,
    }


def test_headline_compares_steady_state_with_the_plain_scoring_rate():
    ratios = compute_ratios(_rates(), outputs_agree=True)
    assert ratios["headline"]["value"] == pytest.approx(0.95)
    assert ratios["headline"]["target"] == 0.95
    assert ratios["headline"]["verdict"] == "MET"
    assert ratios["headline"]["met"] is True
    assert ratios["end_to_end"]["value"] == pytest.approx(75 / 80)
    assert ratios["end_to_end"]["met"] is None
    assert ratios["strict"]["value"] == pytest.approx(0.75)


def test_headline_below_target_or_with_differing_outputs_is_not_met():
    slow = compute_ratios(_rates(ray_steady=87.5), outputs_agree=True)["headline"]
    assert slow["value"] == pytest.approx(0.875)
    assert slow["verdict"] == "NOT MET" and slow["met"] is False
    wrong = compute_ratios(_rates(), outputs_agree=False)["headline"]
    assert wrong["verdict"] == "NOT MET (outputs differ)" and wrong["met"] is False


def test_ratios_without_a_measurement_are_not_applicable():
    rates = _rates()
    del rates[RAY_STEADY]
    ratios = compute_ratios(rates, outputs_agree=True)
    assert ratios["headline"]["value"] is None
    assert ratios["headline"]["verdict"] == "n/a (not measured)"
    assert ratios["headline"]["met"] is None
    assert compute_ratios({}, outputs_agree=False)["end_to_end"]["met"] is None


def test_verdict_at_exactly_the_target_is_met():
    assert verdict(0.90, 0.90, outputs_agree=True) == "MET"
    assert verdict(0.5, None, outputs_agree=True) == "(no target)"


def test_render_shows_rows_start_up_ratios_and_why_a_row_is_missing():
    plain = PlainResult(
        rows=1000,
        load_s=2.5,
        scoring_s=10.0,
        model_versions={"Encoder": "m/1"},
        labels=LABELS,
        stage_seconds={"Encoder": 9.0, "Tokenizer": 1.0},
    )
    ray_result = RayResult(
        startup_s=4.25,
        job_s=16.0,
        summary={
            "rows_in": 1000,
            "rows_scored": 1000,
            "rows_rejected": 0,
            "elapsed_s": 15.0,
            "rejects_s": 1.0,
            "scoring_s": 14.0,
            "stages": [
                {"stage": "Encoder", "min_actors": 1, "max_actors": 2, "num_cpus": 0.75},
            ],
            "resource_adjustments": ["num_cpus scaled by 0.75"],
        },
        steady=steady_state([(1.0, 500), (2.0, 500)]),
        first_file_after_s=9.5,
    )
    measured = {**plain.measurements(), **ray_result.measurements()}
    assert RAY_STEADY not in measured
    results = {key: m.to_dict() for key, m in measured.items()}
    report = {
        "mode": "custom",
        "texts": 1000,
        "started_at": "2026-01-01T00:00:00",
        "duration_s": 60.0,
        "machine": {
            "cpu_count": 2,
            "cpu_model": "test CPU",
            "torch_threads": 2,
            "loadavg_start": [1.5, 0.1, 0.1],
            "loadavg_end": [1.0, 0.5, 0.2],
            "cpus_available": 2,
            "versions": {"ray": "2.60.0"},
        },
        "results": results,
        "row_notes": {RAY_STEADY: ray_result.steady.note},
        "ray_startup_s": ray_result.startup_s,
        "ratios": compute_ratios({k: r["rows_per_s"] for k, r in results.items()}, True),
        "agreement": {"text": "outputs AGREE: 1000 ids"},
        "failures": [],
    }
    text = render(report)
    assert "| plain loop (scoring only: read, score, write) | 1000 | 10.00 | 100.0 |" in text
    assert "| plain loop (incl. model load) | 1000 | 12.50 | 80.0 |" in text
    assert "| 1000 | 16.00 | 62.5 |" in text
    assert "only 2 output file(s)" in text
    assert "Ray start-up (`ray.init`, in no row above): 4.25 s" in text
    assert "| – | ≥ 0.95 | n/a (not measured) |" in text  # no steady state from 2 files
    assert "| 0.78 | – | (no target) |" in text
    assert "outputs AGREE" in text
    assert "Encoder 90%" in text
    assert "rejects pass 1.0 s, predictions pass 14.0 s, planning/counting/summary 1.0 s" in text
    assert "Encoder 1–2 × 0.75 CPU" in text
    assert "**The machine was busy**" in text


def test_importing_the_benchmark_starts_nothing():
    code = "import sys, bench.batch; print(sorted({'ray', 'torch', 'mlflow'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
