"""Building a plain stage class inside a Ray worker — shared by the Serve wrapper and Ray Data."""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

from servecore.pipeline.spec import load_stage_class


def granted_cpus() -> int | None:
    """Whole torch threads for the CPUs Ray granted this worker (at least one); None outside Ray.

    A stage granted no CPU (a light one, ``num_cpus: 0``) still gets one thread, not all cores.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, math.floor(cpus + 0.5))


def build_stage(import_path: str, kwargs: dict[str, Any]) -> Any:
    """Construct a stage class, giving torch as many threads as the worker has CPUs."""
    cls = load_stage_class(import_path)
    kwargs = dict(kwargs)
    if "num_threads" in inspect.signature(cls).parameters and "num_threads" not in kwargs:
        kwargs["num_threads"] = granted_cpus()
    return cls(**kwargs)
