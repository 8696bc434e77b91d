"""Fake stage classes for fault tests: tiny, instant, no weights — and one that fails, one slow.

They speak the same batch layout as the real classes, so the real Serve wrapper and gateway run
around them unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from servecore import LABELS
from servecore.batching import Batch, num_rows

FAKE_STAGES = {
    "Tokenizer": ("tests.fixtures:FakeTokenizer", {}),
    "Encoder": ("tests.fixtures:FakeEncoder", {}),
    "LinearHead": ("tests.fixtures:UniformModel", {}),
    "MLPHead": ("tests.fixtures:UniformModel", {}),
    "BagOfWords": ("tests.fixtures:UniformModel", {}),
}
"""Stage class and kwargs per deployment of the shipped spec, for a graph that deploys in seconds
(the ensemble stays real)."""


class FakeTokenizer:
    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"input_ids": np.ones((n, 2), np.int64), "attention_mask": np.ones((n, 2), np.int64)}


class FakeEncoder:
    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"embedding": np.zeros((n, 4), np.float32), "num_tokens": np.full(n, 2, np.int64)}


class UniformModel:
    """Any member: every label equally likely."""

    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"probs": np.full((n, len(LABELS)), 1 / len(LABELS), np.float32)}


class ErrorModel:
    def __call__(self, batch: Batch) -> Batch:
        raise RuntimeError("injected failure: secret internal detail")


class SlowModel(UniformModel):
    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds

    def __call__(self, batch: Batch) -> Batch:
        time.sleep(self.seconds)
        return super().__call__(batch)


def fake_graph(
    spec: Any,
    overrides: dict[str, tuple[str, dict]] | None = None,
    gateway_config: dict | None = None,
    actor_options: dict | None = None,
    job_runner: Any = None,
    gateway_options: dict | None = None,
    stage_options: dict[str, dict] | None = None,
) -> Any:
    """The real gateway and stage wrapper around :data:`FAKE_STAGES`, bound as an application.

    ``overrides`` replaces stages by deployment name; stages in neither (the ensemble, extra
    members) run their real class from the spec. Every replica asks for no CPU.
    ``gateway_options`` are more ``Gateway.options`` (queue limits, back-pressure answer);
    ``stage_options`` more ``Stage.options`` per deployment name (replicas, health checks).
    """
    from deployments.gateway import Gateway
    from deployments.stage import Stage

    options = actor_options or {"num_cpus": 0, "num_gpus": 0}
    chosen = {**FAKE_STAGES, **(overrides or {})}
    stages = {}
    for plan in spec.stage_plans():
        stage_class, kwargs = chosen.get(plan.deployment, (plan.stage_class, plan.init_kwargs))
        more = (stage_options or {}).get(plan.deployment, {})
        stages[plan.deployment] = Stage.options(
            name=plan.deployment, ray_actor_options=options, **more
        ).bind(stage_class, kwargs, plan.output_prefix)
    gateway = Gateway.options(
        name="Gateway",
        ray_actor_options=options,
        user_config=gateway_config or {},
        **(gateway_options or {}),
    )
    return gateway.bind(spec.model_dump(), stages, job_runner)
