"""The one generic Serve deployment that wraps any plain model class (DESIGN contract 1).

Each replica builds the class once, gathers concurrent calls with ``@serve.batch`` into one
``dict[str, np.ndarray]`` batch, runs the class in a worker thread (never on the event loop) and
hands each caller its rows back. Outputs travel as :class:`StageOutput`, which carries the model
versions that produced them so the gateway can name every version in its answer.

Live knobs come through ``user_config`` (:class:`StageUserConfig`) and apply without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from servecore.batching import Batch, concat_batches, num_rows, split_batch
from servecore.stages import build_stage

logger = logging.getLogger("ray.serve")


class StageUserConfig(BaseModel):
    """Live-tunable batching of one stage (``user_config`` in ``serve_config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Most calls gathered into one batch."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    """Longest wait for a batch to fill once its first call arrived."""


@dataclass
class StageOutput:
    """What a stage returns: the new columns for the caller's rows, and who computed them."""

    batch: Batch
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def _torch_threads() -> int | None:
    """Torch's intra-op threads in this process, if the stage uses torch at all."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


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


@serve.deployment(max_ongoing_requests=64)
class Stage:
    """Serve wrapper: ``Stage.options(name="Encoder").bind("deployments.encoder:Encoder", {...})``.

    ``output_prefix`` renames output columns (``probs`` → ``linear.probs``) so several members can
    feed one ensemble; Ray Data's batch pipeline applies the same renaming.
    """

    def __init__(
        self,
        stage_class: str,
        init_kwargs: dict[str, Any] | None = None,
        output_prefix: str = "",
    ) -> None:
        self.stage_class = stage_class
        self.output_prefix = output_prefix
        self.name = serve.get_replica_context().deployment
        started = time.perf_counter()
        self.model = build_stage(stage_class, init_kwargs or {})
        ref = getattr(self.model, "model_ref", None)
        self.model_info = None if ref is None else {"stage": self.name, **ref.to_dict()}
        self.user_config = StageUserConfig()
        self._recent_batches: collections.deque[tuple[int, int]] = collections.deque(maxlen=512)
        logger.info(
            "stage %s loaded %s in %.1fs (model %s)",
            self.name,
            stage_class,
            time.perf_counter() - started,
            self.model_info,
        )

    # reconfigure/describe/batch_stats are async so they run on the replica's event loop, like
    # the batches whose state they read or change (Serve runs sync methods in a thread pool).
    async def reconfigure(self, config: dict[str, Any]) -> None:
        self.user_config = StageUserConfig.model_validate(config or {})
        self._run_batch.set_max_batch_size(self.user_config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.user_config.batch_wait_timeout_s)

    async def __call__(self, *inputs: StageOutput | Batch) -> StageOutput:
        merged = merge_inputs(inputs)
        batch = await self._run_batch(merged.batch)
        models = dict(merged.models)
        if self.model_info is not None:
            models[self.name] = self.model_info
        return StageOutput(batch=batch, models=models)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _run_batch(self, batches: list[Batch]) -> list[Batch]:
        sizes = [num_rows(b) for b in batches]
        self._recent_batches.append((len(batches), sum(sizes)))
        combined = concat_batches(batches)
        output = await asyncio.to_thread(self.model, combined)
        if self.output_prefix:
            output = {f"{self.output_prefix}{k}": v for k, v in output.items()}
        return split_batch(output, sizes)

    async def describe(self) -> dict[str, Any]:
        """What this replica serves: its stage class, model version and live batching knobs."""
        return {
            "stage": self.name,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "class": self.stage_class,
            "model": self.model_info,
            "batching": self.user_config.model_dump(),
            "torch_threads": _torch_threads(),
        }

    async def batch_stats(self, reset: bool = False) -> dict[str, Any]:
        """Calls and rows per recent batch (the last 512) of this replica; ``reset`` clears them."""
        if reset:
            self._recent_batches.clear()
        calls = [c for c, _ in self._recent_batches]
        rows = [r for _, r in self._recent_batches]
        return {
            "batches": len(calls),
            "max_calls_per_batch": max(calls, default=0),
            "max_rows_per_batch": max(rows, default=0),
            "mean_calls_per_batch": sum(calls) / len(calls) if calls else 0.0,
            "mean_rows_per_batch": sum(rows) / len(rows) if rows else 0.0,
        }
