"""Autoscaling that looks ahead: replicas for the load expected once a new replica is up.

Serve's default policy sizes a deployment for the requests it has now (ongoing requests over
``target_ongoing_requests``). A replica it asks for is serving only a start-up time later (a
model replica loads its weights: seconds to tens of seconds), so on a rising load every decision
comes too late by that much, and the requests in between queue. :class:`LookAheadPolicy` fits the
trend of the ongoing requests over a short window and sizes the deployment for the load one
start-up time ahead; the start-up time itself is learned from the deployment (how long asked-for
replicas took to run), so the look-ahead follows the model, not a guess in the config. Going
down it follows the current load only (a falling trend is not extrapolated below it), and Serve's
own ``downscale_delay_s`` still applies, as do ``upscale_delay_s``, the scaling factors and the
min/max bounds (Serve wraps every custom policy in them).

Use it in a deployment's ``autoscaling_config``::

    policy:
      policy_function: servecore.autoscaling:LookAheadPolicy
      policy_kwargs: {window_s: 10, startup_s: 8}

Serve pickles a custom policy's module by value into its controller, so this module holds
nothing else and imports nothing from the project. ``make bench-autoscale`` measures it against
the default on one ramp (README, "Scaling that looks ahead").
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


def trend_per_s(samples: deque[tuple[float, float]]) -> float:
    """Least-squares slope of ``(time, value)`` samples, per second (0 with fewer than two)."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread <= 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / spread


class LookAheadPolicy:
    """Serve autoscaling policy: the default's target, applied to the load one start-up ahead.

    ``window_s``: how far back the trend of the ongoing requests is fitted. ``startup_s``: the
    replica start-up time assumed until one is measured; each scale-up the policy watches is
    folded in (an exponential average with weight ``learn_rate``). ``max_lead``: the forecast is
    at most this many times the current load (a noisy slope on a small load must not ask for the
    maximum at once).
    """

    def __init__(
        self,
        window_s: float = 10.0,
        startup_s: float = 10.0,
        learn_rate: float = 0.5,
        max_lead: float = 3.0,
    ) -> None:
        self.window_s = window_s
        self.startup_s = startup_s
        self.learn_rate = learn_rate
        self.max_lead = max_lead
        self._samples: deque[tuple[float, float]] = deque()
        self._asked: tuple[int, float] | None = None
        """(replicas asked for, when) while a scale-up is under way."""

    def _learn_startup(self, now: float, running: int, target: int) -> None:
        if self._asked is not None and running >= self._asked[0]:
            took = now - self._asked[1]
            self.startup_s += self.learn_rate * (took - self.startup_s)
            self._asked = None
        if target > running and self._asked is None:
            self._asked = (target, now)
        elif self._asked is not None and target < self._asked[0]:
            self._asked = None  # the scale-up was called off: nothing to learn from

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        load = float(ctx.total_num_requests)
        running = int(ctx.current_num_replicas)
        self._learn_startup(now, running, int(ctx.target_num_replicas))
        self._samples.append((now, load))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        slope = trend_per_s(self._samples)
        forecast = load
        if slope > 0:
            forecast = min(load + slope * self.startup_s, max(load, 1.0) * self.max_lead)
        per_replica = float(ctx.config.get_target_ongoing_requests())
        state = {
            "load": round(load, 3),
            "trend_per_s": round(slope, 4),
            "forecast": round(forecast, 3),
            "startup_s": round(self.startup_s, 2),
        }
        return forecast / per_replica, state
