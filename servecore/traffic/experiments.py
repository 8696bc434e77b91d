"""The gateway's traffic policies as plain objects: A/B variants, shadow comparison, the circuit
breaker in front of the primary pipeline, and the response cache.

Nothing here talks to Ray or MLflow, so every rule is unit-tested on its own; the gateway wires
them to the graph (``deployments/gateway.py``). Their settings are the ``experiment``, ``shadow``,
``fallback`` and ``cache`` sections of the gateway's ``user_config``, so they change live.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_ALIAS = r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$"


class Variant(BaseModel):
    """One arm of an A/B test: the pipeline with every model at ``alias`` (models without that
    alias keep the spec's own)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    alias: str = Field(pattern=_ALIAS)
    weight: float = Field(ge=0.0, le=1_000_000.0)


class ExperimentConfig(BaseModel):
    """``user_config.experiment``: variants and their traffic weights, sticky by a header."""

    model_config = ConfigDict(extra="forbid")

    variants: list[Variant] = Field(
        default_factory=lambda: [Variant(name="champion", alias="champion", weight=1.0)],
        min_length=1,
        max_length=8,
    )
    sticky_header: str = Field(default="X-User-Key", pattern=r"^[A-Za-z0-9-]{1,64}$")
    """Requests with the same value of this header always get the same variant."""
    salt: str = Field(default="intent-ab", max_length=64)
    """Changing it reshuffles which keys land in which variant (start a new experiment)."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a positive weight")
        return self

    def assign(self, key: str | None, rng: random.Random | None = None) -> str:
        """The variant of a request: a hash of ``key`` (sticky), or a random draw without one."""
        total = sum(v.weight for v in self.variants)
        if key:
            digest = hashlib.sha256(f"{self.salt}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = (rng or random).random() * total
        for variant in self.variants:
            if point < variant.weight:
                return variant.name
            point -= variant.weight
        return next(v.name for v in reversed(self.variants) if v.weight > 0)


class ShadowConfig(BaseModel):
    """``user_config.shadow``: copy a fraction of requests to a variant, off the response path."""

    model_config = ConfigDict(extra="forbid")

    variant: str | None = None
    """Name of a variant in ``experiment.variants`` (it may have weight 0); None: no shadowing."""
    fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    max_in_flight: int = Field(default=4, ge=1, le=256)
    """Shadow calls running at once; a request that would exceed it is not shadowed (counted)."""


class FallbackConfig(BaseModel):
    """``user_config.fallback``: answer from a backup stage when the primary fails or is late."""

    model_config = ConfigDict(extra="forbid")

    stage: str | None = None
    """A text-input member's deployment (e.g. ``BagOfWords``); None: no fallback, errors are 503."""
    deadline_s: float = Field(default=5.0, gt=0.0, le=300.0)
    """The primary pipeline's deadline before the backup answers."""
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    """Consecutive primary failures that open the circuit."""
    cooldown_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """How long an open circuit skips the primary before one trial call."""


class CacheConfig(BaseModel):
    """``user_config.cache``: answers per text and exact model versions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    max_bytes: int = Field(default=32 * 1024 * 1024, ge=0, le=16 * 1024**3)
    ttl_s: float = Field(default=600.0, gt=0.0, le=7 * 24 * 3600.0)
    normalize: Literal["exact", "whitespace", "lowercase"] = "whitespace"
    """How texts are folded into one key: ``whitespace`` trims and collapses runs of white space
    (the shipped models ignore them), ``lowercase`` also folds case (for uncased models only)."""


_SPACES = re.compile(r"\s+")


def normalize_text(text: str, mode: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if mode == "exact":
        return text
    text = _SPACES.sub(" ", text).strip()
    return text.lower() if mode == "lowercase" else text


# --- counters ---------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class VariantStats:
    """Requests, errors, latency and predicted labels of one variant."""

    requests: int = 0
    errors: int = 0
    degraded: int = 0
    labels: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=2048)
    )

    def record(self, latency_s: float, labels: Sequence[str], degraded: bool = False) -> None:
        self.requests += 1
        self.degraded += int(degraded)
        self.latencies_ms.append(latency_s * 1000.0)
        self.labels.update(labels)

    def to_dict(self) -> dict[str, Any]:
        window = list(self.latencies_ms)
        total = sum(self.labels.values())
        return {
            "requests": self.requests,
            "errors": self.errors,
            "degraded": self.degraded,
            "latency_ms": {
                "p50": _percentile(window, 0.50),
                "p95": _percentile(window, 0.95),
                "mean": statistics.fmean(window) if window else None,
                "window": len(window),
            },
            "labels": dict(sorted(self.labels.items())),
            "label_share": {k: v / total for k, v in sorted(self.labels.items())} if total else {},
        }


@dataclass
class ShadowStats:
    """How the shadow variant compares with the answers actually given."""

    compared: int = 0
    """Texts answered by both."""
    agreed: int = 0
    requests: int = 0
    errors: int = 0
    skipped: int = 0
    """Requests not shadowed because ``max_in_flight`` shadow calls were running."""
    latency_diff_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=2048)
    )

    def record(self, primary: Sequence[str], shadow: Sequence[str], diff_s: float) -> None:
        self.requests += 1
        self.compared += len(primary)
        self.agreed += sum(a == b for a, b in zip(primary, shadow, strict=True))
        self.latency_diff_ms.append(diff_s * 1000.0)

    def to_dict(self) -> dict[str, Any]:
        window = list(self.latency_diff_ms)
        return {
            "requests": self.requests,
            "texts_compared": self.compared,
            "agreement": self.agreed / self.compared if self.compared else None,
            "latency_diff_ms": {
                "mean": statistics.fmean(window) if window else None,
                "p50": _percentile(window, 0.50),
                "p95": _percentile(window, 0.95),
            },
            "errors": self.errors,
            "skipped": self.skipped,
        }


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → after ``cooldown_s`` one trial call
    (half-open) → closed again on success, open again on failure."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial_running = False
        self.times_opened = 0
        """Transitions into ``open``, a failed half-open trial included."""

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether the primary may be called now (in half-open, only by one caller at a time)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.trial_running:
            self.trial_running = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.trial_running = False

    def failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            if self.state != "open":
                self.times_opened += 1
            self.opened_at = self.clock()
        self.trial_running = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "times_opened": self.times_opened,
        }


@dataclass
class CachedAnswer:
    label: str
    probs: tuple[float, ...]
    models: dict[str, dict[str, Any]]
    size: int
    expires: float
    value: Any = None
    """A generic model's outputs for the row (label and probs stay empty)."""


class ResponseCache:
    """Answers per (normalised text, release key), bounded in entries and bytes, with a TTL.

    The release key names every model version, so a version change can never return an answer
    computed by another version; :meth:`clear` also drops them at once when the release moves.
    """

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._entries: collections.OrderedDict[tuple[str, str], CachedAnswer] = (
            collections.OrderedDict()
        )
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expired = 0
        self.bypassed = 0

    def configure(self, config: CacheConfig) -> None:
        self.config = config
        if not config.enabled:
            self.clear()
        self._shrink()

    def key(self, text: str, release: str) -> tuple[str, str]:
        return normalize_text(text, self.config.normalize), release

    def get(self, text: str, release: str) -> CachedAnswer | None:
        if not self.config.enabled:
            return None
        key = self.key(text, release)
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= self.clock():
            self._drop(key)
            self.expired += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(
        self,
        text: str,
        release: str,
        label: str,
        probs: Sequence[float],
        models: dict[str, dict[str, Any]],
        value: Any = None,
        size: int = 0,
    ) -> None:
        """Store an answer; a generic model's answer is ``value`` (``size`` its bytes)."""
        if not self.config.enabled or self.config.max_entries == 0:
            return
        key = self.key(text, release)
        size += sys.getsizeof(key[0]) + 8 * len(probs) + len(label) + 64
        if size > self.config.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        expires = self.clock() + self.config.ttl_s
        self._entries[key] = CachedAnswer(label, tuple(probs), models, size, expires, value)
        self.bytes += size
        self._shrink()

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def _shrink(self) -> None:
        while self._entries and (
            len(self._entries) > self.config.max_entries or self.bytes > self.config.max_bytes
        ):
            key = next(iter(self._entries))
            self._drop(key)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def to_dict(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            **self.config.model_dump(),
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
            "evictions": self.evictions,
            "expired": self.expired,
            "bypassed": self.bypassed,
        }
