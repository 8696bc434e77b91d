"""The monitor deployment: the prediction log and live drift detection, off the response path.

The gateway samples answered ``/v1/predict`` texts (``monitoring.sample_rate``) and sends them
here in batches, without waiting for this replica. For each batch the monitor

1. appends the records to the prediction log (:mod:`servecore.monitoring.prediction_log`) in a
worker thread, 2. queues the texts for drift scoring: every ``embed_interval_s`` it embeds the
queued texts
   through the application's own ``Tokenizer`` and ``Encoder`` stages (the groups that hold them),
   pinned to the encoder version that answered them, scores each against that version's
   reference profile (stored in MLflow by :mod:`batch.reference`) and adds it to a sliding window
   (:mod:`servecore.monitoring.drift`).

``drift()`` reports the window (``GET /v1/monitoring/drift``) and every update sets the drift
gauges. The window lives in this replica: keep ``num_replicas: 1`` (it is light) so the report
covers all the sampled traffic. When the served encoder version changes, the window starts again
against the new version's profile. If a version has no profile, the texts are counted as dropped
and the report says ``no_reference`` until one is stored (checked again every minute).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from servecore.monitoring.drift import DriftSettings, DriftWindow, ReferenceProfile
from servecore.monitoring.prediction_log import PredictionLog, PredictionLogConfig
from servecore.monitoring.telemetry import metric
from servecore.pipeline.batching import text_batch
from servecore.pipeline.graph import EMBEDDING, Layout
from servecore.pipeline.spec import PipelineSpec
from servecore.settings import get_settings
from servecore.traffic.routing import finish_route, start_route

logger = logging.getLogger("ray.serve")

REFERENCE_RETRY_S = 60.0
EMBED_TIMEOUT_S = 60.0


class MonitorUserConfig(BaseModel):
    """Live knobs of the monitor (``user_config`` of the ``Monitor`` deployment)."""

    model_config = ConfigDict(extra="forbid")

    drift: DriftSettings = Field(default_factory=DriftSettings)
    prediction_log: PredictionLogConfig = Field(default_factory=PredictionLogConfig)
    embed_batch_size: int = Field(default=64, ge=1, le=1024)
    """Texts per embedding call to the encoder."""
    embed_interval_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    """How often queued texts are embedded and scored."""
    max_pending: int = Field(default=5000, ge=1, le=1_000_000)
    """Texts waiting to be scored; beyond this new ones are dropped (counted)."""


@serve.deployment(num_replicas=1, max_ongoing_requests=16)
class Monitor:
    def __init__(self, spec: dict[str, Any], groups: dict[str, DeploymentHandle]) -> None:
        self.route = Layout(PipelineSpec.model_validate(spec)).route(EMBEDDING)
        self.groups = groups
        settings = get_settings()
        replica = serve.get_replica_context().replica_id.unique_id
        key = settings.prediction_log_key
        self.log = PredictionLog(
            settings.prediction_log_folder,
            writer=replica,
            key=None if key is None else key.get_secret_value().encode(),
        )
        self.knobs = MonitorUserConfig()
        self.pending: collections.deque[tuple[str, str, str, np.ndarray | None]] = (
            collections.deque()
        )
        """(encoder pin, text, predicted label, its embedding if the answer brought one)
        waiting to be scored; those without an embedding are embedded first."""
        self.windows: dict[str, DriftWindow] = {}
        self.current: str | None = None
        """The encoder pin of the most recent sample: the window that is reported."""
        self.references: dict[str, tuple[float, ReferenceProfile | None]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        self._worker: asyncio.Task[None] | None = None

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown: close the open log file so that readers,
        # which only take closed (``.jsonl``) files, see its records.
        log = getattr(self, "log", None)
        if log is not None:
            log.close()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        self.knobs = MonitorUserConfig.model_validate(config or {})
        self.log.configure(self.knobs.prediction_log)
        for window in self.windows.values():
            window.resize(self.knobs.drift.window_size)
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())

    def _count(self, outcome: str, n: int) -> None:
        if n:
            self.counts[outcome] += n
            metric("intent_monitor_records").inc(n, tags={"outcome": outcome})

    async def record(self, records: list[dict[str, Any]]) -> None:
        """Take sampled records from the gateway (fire-and-forget on its side). A record may
        carry its text's ``embedding`` from the graph call that answered it; it is scored as it
        is and not written to the prediction log."""
        self._ensure_worker()
        embeddings = [r.pop("embedding", None) for r in records]
        if self.knobs.prediction_log.enabled:
            written = await asyncio.to_thread(self.log.write, records)
            self._count("logged", written)
        room = self.knobs.max_pending - len(self.pending)
        accepted = records[: max(room, 0)]
        self._count("dropped", len(records) - len(accepted))
        for r, embedding in zip(accepted, embeddings, strict=False):
            pin = r["models"].get("Encoder")
            if pin and not r.get("degraded"):  # a degraded answer never reached the encoder
                self.pending.append((f"models:/{pin}", r["text"], r["label"], embedding))

    async def _work(self) -> None:
        while True:
            await asyncio.sleep(self.knobs.embed_interval_s)
            try:
                await self._score_pending()
                await asyncio.to_thread(self.log.rotate)
            except Exception as e:  # noqa: BLE001 - the monitor must outlive any one failure
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning("monitor: %s", self.last_error)

    async def _reference(self, pin: str) -> ReferenceProfile | None:
        checked, profile = self.references.get(pin, (0.0, None))
        if profile is None and time.monotonic() - checked >= REFERENCE_RETRY_S:
            from batch.reference import load_reference

            profile = await asyncio.to_thread(load_reference, pin)
            self.references[pin] = (time.monotonic(), profile)
            if profile is None:
                logger.warning("monitor: %s has no drift reference profile", pin)
        return profile

    async def _score_pending(self) -> None:
        while self.pending:
            size = self.knobs.embed_batch_size
            pin = self.pending[0][0]
            chunk = []
            while self.pending and len(chunk) < size and self.pending[0][0] == pin:
                chunk.append(self.pending.popleft())
            profile = await self._reference(pin)
            if profile is None:
                self._count("dropped", len(chunk))
                self.current = pin
                continue
            embeddings = await self._embeddings(pin, chunk)
            window = self.windows.get(pin)
            if window is None:
                window = self.windows[pin] = DriftWindow(profile, self.knobs.drift.window_size)
            window.add(embeddings, [label for _, _, label, _ in chunk])
            self.current = pin
            self._count("scored", len(chunk))
            self._export(window.report(self.knobs.drift))

    async def _embeddings(
        self, pin: str, chunk: list[tuple[str, str, str, np.ndarray | None]]
    ) -> np.ndarray:
        """The chunk's embeddings: those the answers brought, the rest computed through the
        application's own Tokenizer and Encoder stages, pinned to the version that answered."""
        rows = [embedding for _, _, _, embedding in chunk]
        missing = [i for i, embedding in enumerate(rows) if embedding is None]
        if missing:
            texts = [chunk[i][1] for i in missing]
            pins = {"Tokenizer": pin, "Encoder": pin}
            calls = start_route(self.groups, self.route, text_batch(texts), pins)
            output = await finish_route(calls, self.route, EMBED_TIMEOUT_S)
            for i, row in zip(missing, output.batch["embedding"], strict=True):
                rows[i] = row
            self._count("embedded", len(missing))
        return np.stack([np.asarray(row, dtype=np.float32) for row in rows])

    @staticmethod
    def _export(report: dict[str, Any]) -> None:
        metric("intent_drift_window").set(report["window"])
        for signal, values in report["signals"].items():
            metric("intent_drift_score").set(values["score"], tags={"signal": signal})
            metric("intent_drift_alarm").set(int(values["alarm"]), tags={"signal": signal})

    async def flush(self) -> dict[str, Any]:
        """Score every queued text and close the current log file now (tests, operators)."""
        await self._score_pending()
        closed = await asyncio.to_thread(self.log.rotate, True)
        return {"closed": None if closed is None else str(closed), "folder": str(self.log.folder)}

    async def drift(self) -> dict[str, Any]:
        """The drift report of the window of the encoder version that answered most recently."""
        base: dict[str, Any] = {
            "encoder": self.current,
            "pending": len(self.pending),
            "records": dict(self.counts),
            "last_error": self.last_error,
            "settings": self.knobs.drift.model_dump(),
            "prediction_log": {
                **self.knobs.prediction_log.model_dump(),
                "folder": str(self.log.folder),
                "written": self.log.written,
            },
        }
        window = self.windows.get(self.current) if self.current else None
        if window is None:
            status = "no_reference" if self.current else "no_traffic"
            return {**base, "status": status, "alarm": False, "window": 0}
        return {**base, **window.report(self.knobs.drift)}
