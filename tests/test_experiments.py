"""Traffic policies of the gateway as plain objects: variant assignment, counters, the circuit
breaker and the response cache (``servecore/traffic/experiments.py``)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from servecore.traffic.experiments import (
    CacheConfig,
    CircuitBreaker,
    ExperimentConfig,
    ResponseCache,
    ShadowStats,
    VariantStats,
    normalize_text,
)


def _experiment(champion: float = 90, challenger: float = 10) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "variants": [
                {"name": "champion", "alias": "champion", "weight": champion},
                {"name": "challenger", "alias": "challenger", "weight": challenger},
            ]
        }
    )


def test_the_same_key_always_gets_the_same_variant_and_weights_hold_over_many_keys():
    experiment = _experiment()
    assert {experiment.assign("user-42") for _ in range(20)} == {experiment.assign("user-42")}
    counts = Counter(experiment.assign(f"user-{i}") for i in range(20_000))
    assert counts["challenger"] / 20_000 == pytest.approx(0.10, abs=0.01)
    # Without a key: a random draw with the same weights.
    rng = random.Random(0)
    drawn = Counter(experiment.assign(None, rng) for _ in range(20_000))
    assert drawn["challenger"] / 20_000 == pytest.approx(0.10, abs=0.01)
    assert {_experiment(100, 0).assign(f"k{i}") for i in range(500)} == {"champion"}
    # Another salt reshuffles the keys.
    salted = experiment.model_copy(update={"salt": "round-2"})
    moved = sum(experiment.assign(f"u{i}") != salted.assign(f"u{i}") for i in range(2000))
    assert moved > 100


def test_bad_experiment_configs_are_refused():
    with pytest.raises(ValidationError, match="unique"):
        ExperimentConfig.model_validate(
            {"variants": [{"name": "a", "alias": "x", "weight": 1}] * 2}
        )
    with pytest.raises(ValidationError, match="positive weight"):
        _experiment(0, 0)
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate({"variants": [{"name": "a", "alias": "x", "weight": -1}]})


def test_counters_report_latency_labels_and_agreement():
    stats = VariantStats()
    stats.record(0.010, ["billing", "billing"])
    stats.record(0.030, ["refund"], degraded=True)
    out = stats.to_dict()
    assert out["requests"] == 2 and out["degraded"] == 1
    assert out["labels"] == {"billing": 2, "refund": 1}
    assert out["label_share"]["billing"] == pytest.approx(2 / 3)
    assert out["latency_ms"]["mean"] == pytest.approx(20.0)

    shadow = ShadowStats()
    shadow.record(["a", "b"], ["a", "c"], 0.005)
    shadow.record(["a"], ["a"], -0.001)
    assert shadow.to_dict()["agreement"] == pytest.approx(2 / 3)
    assert shadow.to_dict()["latency_diff_ms"]["mean"] == pytest.approx(2.0)


def test_the_breaker_opens_after_consecutive_failures_and_tries_once_after_the_cooldown():
    now = [0.0]
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failure()
    assert breaker.state == "open" and breaker.times_opened == 2  # a failed trial re-opens
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_the_cache_is_keyed_by_text_and_release_and_bounded_in_entries_bytes_and_time():
    now = [0.0]
    config = CacheConfig(max_entries=2, ttl_s=5.0)
    cache = ResponseCache(config, clock=lambda: now[0])
    cache.put("Hello   world ", "m/1", "greeting", [0.9, 0.1], {})
    assert cache.get("hello world", "m/1") is None  # case kept under "whitespace"
    hit = cache.get(" Hello world", "m/1")
    assert hit is not None and hit.label == "greeting"
    assert cache.get("Hello world", "m/2") is None  # another version: never the old answer
    cache.put("a", "m/1", "x", [1.0], {})
    cache.put("b", "m/1", "x", [1.0], {})
    assert len(cache._entries) == 2 and cache.evictions == 1
    now[0] = 6.0
    assert cache.get("b", "m/1") is None and cache.expired == 1
    assert (cache.hits, cache.misses) == (1, 3)

    tiny = ResponseCache(CacheConfig(max_bytes=300), clock=lambda: now[0])
    for i in range(10):
        tiny.put(f"text {i}", "m/1", "x", [0.5, 0.5], {})
    assert tiny.bytes <= 300 and tiny.evictions > 0
    cache.configure(CacheConfig(enabled=False))
    assert cache.get("a", "m/1") is None and cache.to_dict()["entries"] == 0


def test_normalisation_modes():
    assert normalize_text(" A\t b ", "exact") == " A\t b "
    assert normalize_text(" A\t b ", "whitespace") == "A b"
    assert normalize_text(" A\t b ", "lowercase") == "a b"
    assert normalize_text("e\u0301", "exact") == "\u00e9"
