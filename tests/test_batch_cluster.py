"""Batch jobs where clusters and failures come in: a job on two real Ray nodes, a stage actor killed
in the middle of a job. Both are slow (model loads in several actor processes on two cores).

The two-node test starts ``python -m cluster.local`` and the batch CLI as separate processes, as a
user would (the test session's own Ray instance stays untouched); the worker-kill test runs its job
on the session's instance and kills the encoder actor's process with SIGKILL, like the OOM killer.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from batch.adapter import probability_column, stage_of_actor
from batch.pipeline import JobOptions, run_job
from servecore import LABELS
from servecore.dataset import dataset_path
from tests.conftest import ROOT, STAGES

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
        # Two encoders at one CPU each plus five light stages need 3.25 CPUs: more than one
        # two-CPU node has, so the pools must use both nodes.
        job = subprocess.run(
            [
                *(sys.executable, "-m", "batch", "run", "--address", started["address"]),
                *("--config", str(CONFIG), "--input", str(tmp_path / "input.parquet")),
                *("--output", str(out), "--encoder-actors", "2", "--no-progress"),
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
    assert list(summary["stage_actors"]) == STAGES
    assert summary["stage_actors"]["Encoder"]["actors"] == 2
    used = {node for actors in summary["stage_actors"].values() for node in actors["nodes"]}
    assert used == set(started["nodes"])
    assert summary["nodes_used"] == 2
    assert_complete(out, ids)


def _alive_encoder(since_ms: float) -> int | None:
    """PID of the job's live encoder actor, from Ray's actor table."""
    from ray._private import state

    for actor in state.actors().values():
        if (
            stage_of_actor(actor.get("ActorClassName", ""), ["Encoder"])
            and actor.get("State") == "ALIVE"
            and actor.get("StartTime", 0) >= since_ms
            and actor.get("Pid")
        ):
            return int(actor["Pid"])
    return None


@pytest.mark.serve
def test_killing_a_stage_actor_mid_job_still_scores_every_row_once(serve_instance, tmp_path):
    ids = write_input(tmp_path / "input.parquet", copies=3)
    out = tmp_path / "out"
    options = JobOptions(
        input=str(tmp_path / "input.parquet"),
        config=CONFIG,
        output=str(out),
        num_blocks=24,
        overrides={"Encoder": {"min_actors": 1, "max_actors": 1}},
        progress=False,
    )
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["summary"] = run_job(options)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            result["error"] = e

    since_ms = time.time() * 1000
    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    # Mid-job: the encoder is up and at least one block has come out of the whole pipeline.
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and runner.is_alive():
        written = list((out / "predictions").glob("*.parquet"))
        victim = _alive_encoder(since_ms) if written else None
        if victim is not None:
            break
        time.sleep(0.2)
    assert victim is not None and runner.is_alive(), "the job ended before a block was written"
    os.kill(victim, signal.SIGKILL)

    runner.join(timeout=600)
    assert not runner.is_alive(), "the job did not finish after its encoder was killed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["stage_actors"]["Encoder"]["restarts"] >= 1
    assert summary["rows_scored"] == len(ids) and summary["rows_rejected"] == 0
    assert_complete(out, ids)
