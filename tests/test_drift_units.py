"""Unit tests of the drift statistics and the prediction log (plain classes, no Ray)."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from servecore.monitoring.drift import (
    DriftSettings,
    DriftWindow,
    build_profile,
    ks_statistic,
    nearest_centroid_similarity,
    total_variation,
)
from servecore.monitoring.prediction_log import (
    PredictionLog,
    PredictionLogConfig,
    records,
    text_hash,
)

LABELS = ["a", "b", "c"]


def clusters(rng: np.random.Generator, n_per: int, spread: float = 0.3) -> tuple[np.ndarray, list]:
    """Three well separated clusters in 16 dimensions, labelled a, b, c."""
    centres = np.eye(16)[:3] * 3.0
    x = np.concatenate([c + rng.normal(0, spread, size=(n_per, 16)) for c in centres])
    return x.astype(np.float32), [label for label in LABELS for _ in range(n_per)]


def test_ks_statistic_matches_known_cases():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([10, 11], [1, 2, 3]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert ks_statistic([], [1.0]) == 0.0


def test_total_variation():
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert total_variation({"a": 0.75, "b": 0.25}, {"a": 0.25, "b": 0.75}) == pytest.approx(0.5)


def test_profile_centroids_and_leave_one_out_reference():
    rng = np.random.default_rng(0)
    x, y = clusters(rng, 50)
    profile = build_profile(x, y, y, LABELS, release={"m": "m/1"}, encoder="models:/enc/1")
    assert profile.rows == 150 and profile.labels == LABELS
    centroids = profile.centroid_matrix()
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert [int(np.argmax(c)) for c in centroids] == [0, 1, 2]
    assert profile.similarity == sorted(profile.similarity)
    assert profile.label_distribution == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # Leave-one-out scores sit at or below the in-sample ones (a text is not its own centroid).
    in_sample = np.sort(nearest_centroid_similarity(x, centroids))
    assert np.all(np.asarray(profile.similarity) <= in_sample + 1e-6)


def test_profile_refuses_bad_labels():
    x = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="not among"):
        build_profile(x, ["a", "a", "z", "z"], ["a"] * 4, LABELS, release={}, encoder="e")
    with pytest.raises(ValueError, match="at least two"):
        build_profile(x, ["a", "a", "a", "b"], ["a"] * 4, ["a", "b"], release={}, encoder="e")


def test_window_stays_calm_in_domain_and_alarms_out_of_domain():
    rng = np.random.default_rng(1)
    x, y = clusters(rng, 200)
    profile = build_profile(x, y, y, LABELS, release={}, encoder="e")
    settings = DriftSettings(window_size=100, min_samples=50)
    window = DriftWindow(profile, settings.window_size)

    fresh, fresh_labels = clusters(np.random.default_rng(2), 10)
    window.add(fresh, fresh_labels)
    assert window.report(settings)["status"] == "warming_up"  # 30 < min_samples

    fresh, fresh_labels = clusters(np.random.default_rng(3), 40)
    window.add(fresh, fresh_labels)
    report = window.report(settings)
    assert report["window"] == 100 and report["seen"] == 150
    assert report["status"] == "ok" and not report["alarm"]
    assert report["signals"]["embedding"]["score"] < 0.2

    noise = np.random.default_rng(4).normal(0, 1, size=(100, 16)).astype(np.float32)
    window.add(noise, ["a"] * 100)
    report = window.report(settings)
    assert report["status"] == "drift" and report["alarm"]
    assert report["signals"]["embedding"]["alarm"] and report["signals"]["embedding"]["score"] > 0.8
    assert report["signals"]["label"]["alarm"]
    assert report["signals"]["label"]["score"] == pytest.approx(2 / 3)


def sample_records(n: int, text: str = "hello") -> list[dict]:
    return records(
        [f"{text} {i}" for i in range(n)],
        ["a"] * n,
        [[0.8, 0.1, 0.1]] * n,
        [False] * n,
        label_names=LABELS,
        models={"Encoder": "enc/1"},
        variant="champion",
        request_id="rid",
        latency_ms=12.5,
        degraded=False,
    )


def read_lines(folder) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_prediction_log_hashes_by_default_and_rotates_by_count(tmp_path):
    log = PredictionLog(tmp_path, writer="replica/1")
    log.configure(PredictionLogConfig(rotate_records=3))
    assert log.write(sample_records(4)) == 4  # one write, then rotation: the file holds 4
    assert log.write(sample_records(2, "bye")) == 2
    assert len(list(tmp_path.glob("*.jsonl"))) == 1 and len(list(tmp_path.glob("*.part"))) == 1
    log.rotate(force=True)
    rows = read_lines(tmp_path)
    assert len(rows) == 6 and not list(tmp_path.glob("*.part"))
    first = rows[0]
    assert "text" not in first
    assert first["text_hash"] == "sha256:" + hashlib.sha256(b"hello 0").hexdigest()
    assert first["probabilities"] == {"a": 0.8, "b": 0.1, "c": 0.1}
    assert first["models"] == {"Encoder": "enc/1"} and first["latency_ms"] == 12.5
    assert all(p.name.startswith("predictions-replica_1-") for p in tmp_path.iterdir())


def test_prediction_log_raw_keyed_omitted_disabled_and_rotated_by_age(tmp_path, monkeypatch):
    from servecore.monitoring import prediction_log

    log = PredictionLog(tmp_path / "raw", writer="w")
    log.configure(PredictionLogConfig(text="raw", rotate_s=60))
    log.write(sample_records(1))
    assert log.rotate() is None  # not due yet
    # A minute later by the log's clock (the module's ``time``, not the process's).
    later = time.time() + 61
    clock = type("Clock", (), {"time": staticmethod(lambda: later)})
    monkeypatch.setattr(prediction_log, "time", clock)
    assert log.rotate() is not None
    monkeypatch.undo()
    assert read_lines(tmp_path / "raw")[0]["text"] == "hello 0"

    keyed = PredictionLog(tmp_path / "keyed", writer="w", key=b"secret")
    keyed.write(sample_records(1))
    keyed.close()
    row = read_lines(tmp_path / "keyed")[0]
    assert row["text_hash"] == text_hash("hello 0", b"secret")
    assert row["text_hash"].startswith("hmac-sha256:") and row["text_hash"] != text_hash(
        "hello 0", None
    )

    omitted = PredictionLog(tmp_path / "omit", writer="w")
    omitted.configure(PredictionLogConfig(text="omit"))
    omitted.write(sample_records(1))
    omitted.close()
    row = read_lines(tmp_path / "omit")[0]
    assert "text" not in row and "text_hash" not in row

    off = PredictionLog(tmp_path / "off", writer="w")
    off.configure(PredictionLogConfig(enabled=False))
    assert off.write(sample_records(3)) == 0
    assert not (tmp_path / "off").exists()


def test_prediction_log_keeps_at_most_keep_files(tmp_path):
    log = PredictionLog(tmp_path, writer="w")
    log.configure(PredictionLogConfig(rotate_records=1, keep_files=2))
    for i in range(5):
        log.write(sample_records(1, f"t{i}"))
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2
    assert [r["text_hash"] for r in read_lines(tmp_path)] == [
        text_hash("t3 0", None),
        text_hash("t4 0", None),
    ]
