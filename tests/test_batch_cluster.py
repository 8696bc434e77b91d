"""A batch job on two real Ray nodes (slow: model loads in several actor processes on two cores).

The test starts ``python -m cluster.local`` and the batch CLI as separate processes, as a user
would (the test session's own Ray instance stays untouched). The worker-failure test (a stage
actor SIGKILLed mid-job) runs a dataset job through the jobs API: ``tests/test_jobs.py``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from batch.adapter import probability_column
from servecore import LABELS
from servecore.dataset import dataset_path
from tests.conftest import PIPELINE_GROUP, ROOT

CONFIG = ROOT / "serve_config.yaml"

pytestmark = pytest.mark.slow


def write_input(path: Path, copies: int) -> list[str]:
    """The shipped test split ``copies`` times over, unique ids, as parquet; returns the ids."""
    with open(dataset_path(), newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["split"] == "test"]
    ids = [f"r{copy}-{i}" for copy in range(copies) for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts * copies}), path)
    return ids


def assert_complete(output: Path, ids: list[str]) -> None:
    """Every input row scored exactly once, with a label and probabilities that sum to one."""
    table = pds.dataset(output / "predictions").to_table().to_pandas()
    assert len(table) == len(ids)
    assert sorted(table["id"]) == sorted(ids)
    assert set(table["label"]) <= set(LABELS)
    probs = table[[probability_column(label) for label in LABELS]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def assert_same_scores_as_one_process(output: Path, ids: list[str]) -> None:
    """The two-node job's labels and probabilities are the single-process pipeline's (the same
    classes chained in this process), row by row."""
    from bench.pipeline import InProcessPipeline, load_spec

    with open(dataset_path(), newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["split"] == "test"]
    local = InProcessPipeline(load_spec(CONFIG))(texts)
    table = pds.dataset(output / "predictions").to_table().to_pandas().set_index("id")
    for copy in range(len(ids) // len(texts)):
        rows = table.loc[[f"r{copy}-{i}" for i in range(len(texts))]]
        assert list(rows["label"]) == list(local["label"])
        probs = rows[[probability_column(label) for label in LABELS]].to_numpy()
        np.testing.assert_allclose(probs, local["probs"], atol=1e-5)


def test_stage_actors_spread_over_two_nodes_and_every_row_is_scored(registry, tmp_path):
    ids = write_input(tmp_path / "input.parquet", copies=2)
    # Ray rewrites a 127.0.0.1 address to the machine's own IP unless told that this "cluster" is
    # a single machine; the nodes listen on 127.0.0.1 only.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    cluster = subprocess.Popen(
        [sys.executable, "-m", "cluster.local", "--nodes", "2", "--cpus", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cluster.stdout is not None
        started: dict[str, Any] = json.loads(cluster.stdout.readline() or "{}")
        assert len(started.get("nodes", [])) == 2, "the local cluster did not come up"
        out = tmp_path / "out"
        # Two pipeline actors at 1.5 CPUs each need 3 CPUs: more than one two-CPU node has, so
        # the pool must use both nodes.
        job = subprocess.run(
            [
                *(sys.executable, "-m", "batch", "run", "--address", started["address"]),
                *("--config", str(CONFIG), "--input", str(tmp_path / "input.parquet")),
                *("--output", str(out), "--encoder-actors", "2", "--encoder-cpus", "1.5"),
                "--no-progress",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0, job.stderr[-3000:]
    finally:
        cluster.send_signal(signal.SIGTERM)
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
    assert cluster.returncode == 0

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows_in"], summary["rows_scored"]) == (len(ids), len(ids))
    assert list(summary["stage_actors"]) == [PIPELINE_GROUP]
    assert summary["stage_actors"][PIPELINE_GROUP]["actors"] == 2
    used = {node for actors in summary["stage_actors"].values() for node in actors["nodes"]}
    assert used == set(started["nodes"])
    assert summary["nodes_used"] == 2
    assert_complete(out, ids)
    assert_same_scores_as_one_process(out, ids)
