"""Autoscaling of the ``JobRunner`` deployment on the job backlog.

Serve pickles a custom policy's whole module *by value* into its controller, so this module holds
nothing else and imports what it needs inside the calls.
"""

from __future__ import annotations

import math
import time
from typing import Any


class JobQueuePolicy:
    """Serve autoscaling policy for the ``JobRunner``: replicas follow the jobs waiting or running
    in the store, ``jobs_per_replica`` each, within the deployment's min/max.

    Ray's ``AsyncInferenceAutoscalingPolicy`` reads the broker's queue length instead; that misses
    the jobs already running (and what a worker has prefetched) and only knows Redis and RabbitMQ,
    while the store counts every job the same way for every broker.
    """

    def __init__(
        self,
        store_url: str | None = None,
        jobs_per_replica: float = 2.0,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.store_url = store_url
        self.jobs_per_replica = jobs_per_replica
        self.poll_interval_s = poll_interval_s
        self._store: Any = None
        self._polled_at = 0.0
        self._backlog: int | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        # Serve's controller calls the policy many times a second; the store is read once a
        # poll interval.
        now = time.monotonic()
        if now - self._polled_at >= self.poll_interval_s:
            self._polled_at = now
            try:
                if self._store is None:
                    from servecore.jobs.store import JobStore
                    from servecore.settings import get_settings

                    self._store = JobStore(self.store_url or get_settings().job_store)
                counts = self._store.counts()
                self._backlog = counts.get("queued", 0) + counts.get("running", 0)
            except Exception:  # noqa: BLE001 - keep the current size while the store is away
                self._backlog = None
        if self._backlog is None:
            return ctx.current_num_replicas, {"backlog": None}
        wanted = math.ceil(self._backlog / self.jobs_per_replica)
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(low, min(high, wanted)), {"backlog": self._backlog}
