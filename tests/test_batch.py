"""The batch path: stage planning and row sorting as plain functions, then real Ray Data jobs.

The job tests run on the session's Ray instance (``serve_instance``; nothing here starts or stops
Ray) with the shipped config and registry, score the shipped test split plus bad rows, and hold the
results against the in-process pipeline. The parity gate against the served app runs in
``tests/test_serve_http.py``, which has the app deployed already.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from batch import cli
from batch.adapter import probability_column
from batch.inputs import select_json_rows, select_rows
from batch.parity import compare
from batch.plan import RESERVED_CPUS, fit_to_cluster, plan_stages
from bench.pipeline import InProcessPipeline, load_spec
from servecore import LABELS
from servecore.api.schemas import MAX_TEXT_CHARS
from servecore.config_check import find_app, load_config
from servecore.dataset import dataset_path
from tests.conftest import ROOT

CONFIG = ROOT / "serve_config.yaml"

BAD_ROWS = [
    ({"id": "bad-null", "text": None}, "null"),
    ({"id": "bad-number", "text": 42}, "not_a_string"),
    ({"id": "bad-list", "text": ["a", "b"]}, "not_a_string"),
    ({"id": "bad-empty", "text": ""}, "empty"),
    ({"id": "bad-blank", "text": " \t "}, "empty"),
    ({"id": "bad-long", "text": "x" * (MAX_TEXT_CHARS + 1)}, "too_long"),
    ({"id": "no-text-key"}, "null"),
]


@pytest.fixture(scope="module")
def test_rows() -> list[tuple[str, str]]:
    """(id, text) of the shipped test split."""
    import csv

    with open(dataset_path(), newline="") as f:
        rows = [(r["id"], r["text"]) for r in csv.DictReader(f) if r["split"] == "test"]
    assert len(rows) > 100
    return rows


def _deployments() -> dict:
    entry = find_app(load_config(CONFIG), "intent")
    return {d["name"]: d for d in entry["deployments"]}


# --- plain functions -----------------------------------------------------------------------------


def test_the_shipped_grouping_is_one_stage_running_every_class():
    spec = load_spec(CONFIG)
    stages = plan_stages(spec, _deployments(), overrides={"BagOfWords": {"batch_size": 32}})
    assert [s.name for s in stages] == ["Pipeline"]
    (pipeline,) = stages
    assert [p.deployment for p in pipeline.plans] == [p.deployment for p in spec.stage_plans()]
    resources = pipeline.resources
    assert (resources.num_cpus, resources.min_actors, resources.max_actors) == (1.0, 1, 2)
    # An override by stage name lands on the group that holds the stage.
    assert resources.batch_size == 32
    assert pipeline.reads == ("text",)
    assert pipeline.last and set(pipeline.keeps) == {"id", "model_versions"}
    assert pipeline.constructor_kwargs()["group"] == spec.group_plans()[0]
    encoder = plan_stages(spec, _deployments(), overrides={"Encoder": {"max_actors": 3}})
    assert encoder[0].resources.max_actors == 3
    with pytest.raises(ValueError, match="no stage named"):
        plan_stages(spec, _deployments(), overrides={"Encodr": {"num_cpus": 1}})
    with pytest.raises(ValueError, match="unknown stage option"):
        plan_stages(spec, _deployments(), overrides={"Encoder": {"num_cpu": 1}})


def test_the_gpu_grouping_hands_columns_between_groups():
    gpu = ROOT / "serve_config.gpu.yaml"
    deployments = {d["name"]: d for d in find_app(load_config(gpu), "intent")["deployments"]}
    stages = {s.name: s for s in plan_stages(load_spec(gpu), deployments)}
    assert list(stages) == ["Preprocess", "Encoder", "Postprocess"]
    assert stages["Preprocess"].reads == ("text",)
    assert {"input_ids", "attention_mask", "bow.probs"} <= set(stages["Preprocess"].keeps)
    assert stages["Encoder"].reads == ("input_ids", "attention_mask")
    assert stages["Encoder"].resources.num_gpus == 0.25
    assert set(stages["Encoder"].keeps) == {"id", "model_versions", "embedding", "bow.probs"}
    assert stages["Postprocess"].reads == ("embedding", "bow.probs")
    assert stages["Postprocess"].last


def test_the_fully_split_graph_is_one_stage_per_class():
    spec = load_spec(CONFIG).model_copy(update={"groups": None})
    deployments = {
        "Encoder": {"ray_actor_options": {"num_cpus": 1}, "num_replicas": 2},
        "Tokenizer": {"ray_actor_options": {"num_cpus": 0}},
    }
    stages = plan_stages(spec, deployments, overrides={"BagOfWords": {"batch_size": 32}})
    assert [s.plans for s in stages] == [(p,) for p in spec.stage_plans()]
    by_name = {s.name: s for s in stages}
    encoder = by_name["Encoder"].resources
    assert (encoder.num_cpus, encoder.min_actors, encoder.max_actors) == (1.0, 2, 2)
    assert encoder.batch_size == 64
    assert by_name["Tokenizer"].resources.num_cpus == 0.25  # Serve's 0, raised to the floor
    assert by_name["BagOfWords"].resources.batch_size == 32
    # Token columns die after the encoder, the embedding after the last head, the member
    # probabilities after the ensemble; id and the version trail go all the way.
    assert by_name["Encoder"].reads == ("input_ids", "attention_mask")
    assert not {"input_ids", "attention_mask"} & set(by_name["Encoder"].keeps)
    assert "embedding" in by_name["LinearHead"].keeps
    assert "embedding" not in by_name["MLPHead"].keeps
    assert by_name["Ensemble"].reads == ("linear.probs", "mlp.probs", "bow.probs")
    assert by_name["Ensemble"].last and set(by_name["Ensemble"].keeps) == {"id", "model_versions"}
    (mlp,) = by_name["MLPHead"].constructor_kwargs()["group"].stages
    assert mlp.stage_class == "deployments.heads:ClassifierHead"
    assert mlp.init_kwargs["model_uri"] == "models:/intent-head-mlp@champion"
    assert mlp.output_prefix == "mlp."


def test_fitting_leaves_room_for_ray_datas_own_tasks_and_drops_missing_gpus():
    spec = load_spec(CONFIG)
    stages = plan_stages(spec, _deployments(), overrides={"Encoder": {"num_gpus": 0.25}})
    stages += plan_stages(spec.model_copy(update={"groups": None}), {})
    fitted, notes = fit_to_cluster(stages, free_cpus=2.0, free_gpus=0.0)
    demand = sum(s.resources.cpu_demand for s in fitted)
    assert demand <= 2.0 - RESERVED_CPUS
    assert all(s.resources.num_gpus == 0 for s in fitted)
    assert [s.resources.max_actors for s in fitted] == [s.resources.max_actors for s in stages]
    assert len(notes) == 2
    roomy, notes = fit_to_cluster(stages, free_cpus=16.0, free_gpus=1.0)
    assert roomy == stages and notes == []
    with pytest.raises(RuntimeError, match="CPUs free"):
        fit_to_cluster(stages, free_cpus=RESERVED_CPUS, free_gpus=0.0)


def test_rows_are_sorted_into_scorable_texts_and_rejects_with_reasons():
    table = pa.table(
        {
            "key": [1, 2, 3, 4, 5],
            "body": ["ok text", None, "", "  ", "y" * (MAX_TEXT_CHARS + 1)],
        }
    )
    valid = select_rows(table, "body", "key", "valid")
    assert valid.to_pydict() == {"id": [1], "text": ["ok text"]}
    rejected = select_rows(table, "body", "key", "rejected").to_pydict()
    assert rejected["id"] == [2, 3, 4, 5]
    assert rejected["reason"] == ["null", "empty", "empty", "too_long"]
    assert rejected["raw"][:3] == [None, "", "  "]

    numbers = pa.table({"id": ["a", "b"], "text": [7, None]})
    assert select_rows(numbers, "text", "id", "rejected")["reason"].to_pylist() == [
        "not_a_string",
        "null",
    ]
    with pytest.raises(KeyError, match="--text-column"):
        select_rows(table, "text", "key", "valid")

    lines = pa.table(
        {"text": ['{"id": 1, "text": "hello"}', '{"id": 2, "text": 3.5}', "{not json", "[1]"]}
    )
    assert select_json_rows(lines, "text", "id", "valid").to_pydict() == {
        "id": [1],
        "text": ["hello"],
    }
    rejected = select_json_rows(lines, "text", "id", "rejected").to_pydict()
    assert rejected["reason"] == ["not_a_string", "invalid_json", "invalid_json"]
    assert rejected["raw"] == ["3.5", "{not json", "[1]"]


def test_parity_comparison_fails_on_a_perturbed_probability_or_label():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(LABELS)), size=5).astype(np.float32)
    labels = [LABELS[i] for i in probs.argmax(axis=1)]
    ids, texts = list(range(5)), [f"text {i}" for i in range(5)]
    same = compare(ids, texts, labels, probs, labels, probs.astype(np.float64) + 5e-6)
    assert same.ok and same.worst == []

    perturbed = probs.astype(np.float64)
    perturbed[3, 1] += 2e-5
    report = compare(ids, texts, labels, probs, labels, perturbed)
    assert not report.ok
    assert report.probability_mismatches == 1 and report.label_mismatches == 0
    assert [row.id for row in report.worst] == [3]
    assert "FAIL" in report.format() and "text 3" in report.format()

    relabelled = list(labels)
    relabelled[0] = "not-a-label"
    report = compare(ids, texts, labels, probs, relabelled, perturbed)
    assert report.label_mismatches == 1
    assert [row.id for row in report.worst] == [0, 3]  # label mismatches first

    # A quantised profile's gate: labels agree on 80% here, probabilities within a wide bound.
    loose = compare(ids, texts, labels, probs, relabelled, perturbed, 0.5, 10, 0.8)
    assert loose.ok and loose.label_agreement == 0.8
    assert "label agreement 0.8000 (at least 0.8 required)" in loose.format()
    assert not compare(ids, texts, labels, probs, relabelled, perturbed, 0.5, 10, 0.81).ok


def test_help_names_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "parity" in out


# --- Ray Data jobs on the session's Ray instance --------------------------------------------------


@pytest.fixture(scope="module")
def in_process(registry):
    return InProcessPipeline(load_spec(CONFIG))


@pytest.mark.serve
def test_job_scores_every_good_row_and_rejects_the_bad_ones(
    serve_instance, in_process, test_rows, tmp_path
):
    source = tmp_path / "input.jsonl"
    records = [{"id": i, "text": t} for i, t in test_rows]
    lines = [json.dumps(r) for r in records[:100]]
    lines += [json.dumps(r) for r, _ in BAD_ROWS] + ["{broken json"]
    lines += [json.dumps(r) for r in records[100:]]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    argv = ["run", "--config", str(CONFIG), "--input", str(source), "--output", str(out)]
    code = cli.main([*argv, "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    bad = len(BAD_ROWS) + 1
    assert summary["rows_in"] == len(test_rows) + bad
    assert summary["rows_scored"] == len(test_rows)
    assert summary["rows_rejected"] == bad
    assert summary["rejected_by_reason"] == {
        "empty": 2,
        "invalid_json": 1,
        "not_a_string": 2,
        "null": 2,
        "too_long": 1,
    }
    assert summary["rows_per_second"] > 0
    assert summary["model_versions"] == {
        "Tokenizer": "intent-encoder/1",
        "Encoder": "intent-encoder/1",
        "LinearHead": "intent-head-linear/1",
        "MLPHead": "intent-head-mlp/1",
        "BagOfWords": "intent-bow/1",
    }

    rejects = pds.dataset(out / "rejects").to_table().to_pydict()
    expected = {r["id"]: reason for r, reason in BAD_ROWS}
    assert {i: why for i, why in zip(rejects["id"], rejects["reason"], strict=True) if i} == (
        expected
    )

    predictions = pds.dataset(out / "predictions").to_table().to_pandas()
    assert list(predictions.columns) == [
        "id",
        "label",
        *(probability_column(label) for label in LABELS),
        "model_versions",
    ]
    predictions = predictions.set_index("id").loc[[i for i, _ in test_rows]]
    reference = in_process([t for _, t in test_rows])
    assert predictions["label"].tolist() == [str(label) for label in reference["label"]]
    offline = predictions[[probability_column(label) for label in LABELS]].to_numpy()
    np.testing.assert_allclose(offline, reference["probs"], atol=1e-5, rtol=0)
