"""Calling the pipeline's stage groups through Serve handles: what a call returns, how a route's
group calls are started together and finished as one, and how a callee's failure reaches the caller.

The traffic core and the drift monitor call the pipeline this way; the stage wrapper
(``deployments/stage.py``) returns :class:`StageOutput` and merges upstream outputs with
:func:`merge_inputs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from servecore.pipeline.batching import Batch
from servecore.pipeline.graph import Hop, Layout


@dataclass
class StageOutput:
    """What a stage returns: the new columns for the caller's rows, and who computed them."""

    batch: Batch
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def merge_inputs(inputs: tuple[StageOutput | Batch, ...]) -> StageOutput:
    """Several upstream outputs (the ensemble's members) become one batch and one version set."""
    batch: Batch = {}
    models: dict[str, dict[str, Any]] = {}
    for item in inputs:
        if isinstance(item, StageOutput):
            batch.update(item.batch)
            models.update(item.models)
        else:
            batch.update(item)
    return StageOutput(batch=batch, models=models)


def start_route(
    handles: Mapping[str, DeploymentHandle],
    route: Sequence[Hop],
    texts: Batch,
    pins: Mapping[str, str],
) -> list[DeploymentResponse]:
    """Start every group call of ``route`` at once: each is handed its upstream calls' responses
    unawaited (Serve resolves them), so no result passes through the caller on the way."""
    calls: list[DeploymentResponse] = []
    for hop in route:
        args: list[Any] = [calls[i] for i in hop.after]
        if hop.reads_text:
            args.append(texts)
        call = handles[hop.group].remote(
            *args,
            pins={stage: pins[stage] for stage in hop.stages if stage in pins},
            stages=hop.stages,
            exports=hop.exports,
        )
        calls.append(cast(DeploymentResponse, call))
    return calls


class StageFailed(RayServeException):
    """A deployment call raised.

    Between replicas in Ray's throughput profile (handle calls over gRPC) the callee's exception
    arrives as its own type (a ``RuntimeError`` from a model, say), not as the ``RayTaskError``
    an actor call gives; callers catch this one type for "the stage failed" instead of catching
    every exception, their own bugs included."""


async def deployment_result(awaitable: Any, timeout_s: float) -> Any:
    """``awaitable`` (one or more deployment responses) within ``timeout_s``; whatever the
    callee raised comes out as :class:`StageFailed` (Ray's and Serve's errors, timeouts and
    cancellation pass unchanged)."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except (TimeoutError, RayError, RayServeException):
        raise
    except Exception as e:
        raise StageFailed(f"a deployment call raised {type(e).__name__}") from e


async def finish_route(
    calls: Sequence[DeploymentResponse], route: Sequence[Hop], timeout_s: float
) -> StageOutput:
    """The route's answer within ``timeout_s``: its last hops' outputs, merged.

    A route that times out, fails or is cancelled (its callers went away) cancels every group call
    it started, not only those it awaits: a call still waiting for an upstream result that was
    lost with its replica would otherwise stay queued, or keep being re-routed by Serve, for nobody.
    """
    sinks = [calls[i] for i in Layout.sinks(route)]
    try:
        if len(sinks) == 1:
            output: StageOutput = await deployment_result(sinks[0], timeout_s)
            return output
        outputs = await deployment_result(asyncio.gather(*sinks), timeout_s)
    except BaseException:
        for call in calls:
            call.cancel()
        raise
    return merge_inputs(tuple(outputs))
