"""What the protocol fronts of this process serve through: set once by the gateway replica.

Serve runs one gateway replica per process, and the fronts are plain FastAPI routes (and gRPC
methods) that must reach that replica's traffic core, job desk and access policy without knowing
the replica class. :func:`install` hands them over; :func:`services` is what a front calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from servecore.api.auth import KeyRing, LimitsConfig, RateLimiter
from servecore.errors import NotReady

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from servecore.api.jobs import JobDesk
    from servecore.api.v1 import StreamingConfig
    from servecore.traffic.core import TrafficCore


@dataclass
class Services:
    core: TrafficCore
    jobs: JobDesk
    keyring: KeyRing = field(default_factory=lambda: KeyRing([]))
    """The API keys every front checks (HTTP through the guard middleware, gRPC in the front)."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Rate and size limits, live from ``user_config.limits``."""
    streaming: StreamingConfig | None = None
    """How ``/v1/predict`` streams its answers (``user_config.streaming``); None: defaults."""
    streams: DeploymentHandle | None = None
    """The application's ``StreamConsumer`` (``GET /v1/streams``); None: no streams."""
    app_name: str = ""
    """The Serve application this gateway replica belongs to (rollouts and feedback are kept
    per application)."""


_current: Services | None = None

RATES = RateLimiter()
"""Every caller's rate budget in this process, one over all protocols (HTTP and gRPC)."""


def install(services: Services) -> None:
    global _current
    _current = services


def services() -> Services:
    if _current is None:
        raise NotReady("the gateway is starting")
    return _current


def rates() -> RateLimiter:
    return RATES


def keyring() -> KeyRing:
    return _current.keyring if _current is not None else KeyRing([])


def limits() -> LimitsConfig:
    return _current.limits if _current is not None else LimitsConfig()
