"""``LookAheadPolicy`` alone, on a scripted autoscaling context (unit tests: no Ray, no Serve).

Serve calls a custom policy every control-loop tick with an ``AutoscalingContext`` and wraps its
answer in the deployment's bounds and delays; what is tested here is the policy's own part: the
replicas it asks for on a flat, a rising and a falling load, and the start-up time it learns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from servecore.autoscaling import LookAheadPolicy, trend_per_s


@dataclass
class Config:
    target: float = 1.0

    def get_target_ongoing_requests(self) -> float:
        return self.target


@dataclass
class Context:
    """The fields of Serve's ``AutoscalingContext`` the policy reads."""

    total_num_requests: float
    current_time: float
    current_num_replicas: int = 1
    target_num_replicas: int = 1
    config: Config = field(default_factory=Config)


def drive(policy: LookAheadPolicy, loads: list[float], start: float = 1000.0, **ctx: Any) -> float:
    """Feed one load sample per second; the replicas asked for after the last one."""
    asked = 0.0
    for i, load in enumerate(loads):
        asked, _ = policy(Context(total_num_requests=load, current_time=start + i, **ctx))
    return asked


def test_trend_is_the_least_squares_slope() -> None:
    assert trend_per_s(deque([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)])) == pytest.approx(2.0)
    assert trend_per_s(deque([(0.0, 4.0)])) == 0.0
    assert trend_per_s(deque([(5.0, 1.0), (5.0, 9.0)])) == 0.0  # no spread in time


def test_a_flat_load_asks_what_the_default_policy_asks() -> None:
    policy = LookAheadPolicy(window_s=10, startup_s=10)
    assert drive(policy, [4.0] * 12) == pytest.approx(4.0)
    assert drive(LookAheadPolicy(), [6.0] * 5, config=Config(target=2.0)) == pytest.approx(3.0)


def test_a_rising_load_is_served_for_one_start_up_ahead() -> None:
    policy = LookAheadPolicy(window_s=10, startup_s=5, max_lead=10)
    # +0.5 requests per second: in the 5 s a replica takes to start, the load grows by 2.5.
    asked = drive(policy, [1.0 + 0.5 * i for i in range(10)])
    assert asked == pytest.approx(5.5 + 2.5)


def test_the_lead_is_bounded_and_a_falling_load_is_not_extrapolated() -> None:
    steep = LookAheadPolicy(window_s=10, startup_s=30, max_lead=2)
    assert drive(steep, [1.0, 2.0, 3.0]) == pytest.approx(6.0)  # 2x the current load at most
    falling = LookAheadPolicy(window_s=10, startup_s=10)
    assert drive(falling, [8.0, 6.0, 4.0, 2.0]) == pytest.approx(2.0)


def test_the_start_up_time_is_learned_from_the_deployment() -> None:
    policy = LookAheadPolicy(window_s=10, startup_s=10, learn_rate=1.0)
    policy(Context(1.0, 100.0, current_num_replicas=1, target_num_replicas=3))  # asked for 3
    policy(Context(1.0, 102.0, current_num_replicas=2, target_num_replicas=3))
    _, state = policy(Context(1.0, 104.0, current_num_replicas=3, target_num_replicas=3))
    assert state["startup_s"] == pytest.approx(4.0)
    # A scale-up called off before it completed teaches nothing.
    policy(Context(1.0, 110.0, current_num_replicas=3, target_num_replicas=4))
    policy(Context(1.0, 111.0, current_num_replicas=3, target_num_replicas=3))
    _, state = policy(Context(1.0, 130.0, current_num_replicas=4, target_num_replicas=4))
    assert state["startup_s"] == pytest.approx(4.0)
