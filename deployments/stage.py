"""The one generic Serve deployment that wraps plain model classes: a stage group (DESIGN 1, 4).

A group is one or more stages of the pipeline spec that share a replica (``groups:`` in the spec;
one stage per group when it names none). Each replica builds every stage class of its group once,
gathers concurrent calls with ``@serve.batch`` into one ``dict[str, np.ndarray]`` batch, runs the
group's stages one after another on it in one worker thread (never on the event loop; no Ray hop
between them, see :class:`servecore.pipeline.graph.StageChain`) and hands each caller its rows back.
A call names the stages to run and the columns to return (a route of
:class:`servecore.pipeline.graph.Layout`), so the embeddings route runs only the tokenizer and
encoder of a group that holds them all. Outputs travel as :class:`StageOutput`, which carries the
model versions that produced them so the gateway can name every version in its answer.

Model versions: a stage with a registry model serves any *pinned* version of it
(``models:/name/3``, see :mod:`servecore.traffic.releases`) that the caller names in ``pins``,
keeping the most recently used few loaded (:class:`LoadedVersions`), so the release the gateway
switched away from stays warm for a rollback and an A/B challenger sits beside the champion. A
replica also polls each stage's alias and loads a new version in the background as soon as the alias
moves, so that by the time the gateway switches releases every replica has it ready. Calls without a
pin use the version the replica started with.

Live knobs come through ``user_config`` (:class:`StageUserConfig`) and apply without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from servecore.monitoring.telemetry import metric
from servecore.pipeline.batching import Batch, concat_batches, num_rows, split_batch
from servecore.pipeline.graph import Abandoned, StageChain
from servecore.pipeline.spec import GroupPlan, StagePlan
from servecore.pipeline.stages import build_stage
from servecore.registry.client import ModelRef, parse_model_uri
from servecore.traffic.releases import pinned_uri, poll_ticks
from servecore.traffic.routing import StageOutput, merge_inputs

logger = logging.getLogger("ray.serve")


class StageUserConfig(BaseModel):
    """Live-tunable batching of one stage (``user_config`` in ``serve_config.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Most calls gathered into one batch."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    """Longest wait for a batch to fill once its first call arrived."""
    max_loaded_versions: int = Field(default=3, ge=1, le=16)
    """Model versions kept loaded per replica (current, previous for rollback, a challenger)."""
    registry_poll_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    """How often the replica checks its alias to preload a new version; 0 turns it off."""


def _torch_threads() -> int | None:
    """Torch's intra-op threads in this process, if the stage uses torch at all."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


@dataclass
class LoadedModel:
    model: Any
    info: dict[str, Any] | None
    """What answers name: stage, registered name, version, the stage's URI and aliases."""


class LoadedVersions:
    """Pinned URI → loaded model, least recently used first; one load per URI at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._models

    def keys(self) -> list[str]:
        return list(self._models)

    def put(self, key: str, loaded: LoadedModel) -> None:
        self._models[key] = loaded
        self._models.move_to_end(key)
        while len(self._models) > self.capacity:
            evicted, _ = self._models.popitem(last=False)
            logger.info("unloaded %s (more than %d versions loaded)", evicted, self.capacity)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self._models) > capacity:
            self._models.popitem(last=False)

    async def get(self, key: str, load: Any) -> LoadedModel:
        """The loaded model for ``key``; ``load()`` (a coroutine function) builds it if absent.

        Concurrent callers of one missing key share one load; a failed load is not cached.
        """
        found = self._models.get(key)
        if found is not None:
            self._models.move_to_end(key)
            return found
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(load())
            self._loading[key] = pending
            # Stored when it finishes, even if every caller waiting for it gave up meanwhile.
            pending.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(pending)

    def _loaded(self, key: str, done: asyncio.Future[LoadedModel]) -> None:
        self._loading.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            self.put(key, done.result())


class StageModels:
    """One stage of a group inside a replica: its default model, pinned versions, alias watcher."""

    def __init__(self, plan: StagePlan, user_config: StageUserConfig) -> None:
        self.plan = plan
        self.name = plan.deployment
        self.stage_class = plan.stage_class
        self.init_kwargs = dict(plan.init_kwargs)
        self.model_uri: str | None = self.init_kwargs.get("model_uri")
        self.user_config = user_config
        self.versions = LoadedVersions(user_config.max_loaded_versions)
        self.default = self._build(self.init_kwargs)
        self.default_key = self._key_of(self.default)
        self.versions.put(self.default_key, self.default)
        self._watcher: asyncio.Task[None] | None = None
        self.last_poll_error: str | None = None

    def _build(self, kwargs: dict[str, Any]) -> LoadedModel:
        started = time.perf_counter()
        model = build_stage(self.stage_class, kwargs)
        ref: ModelRef | None = getattr(model, "model_ref", None)
        info = None
        if ref is not None:
            info = {"stage": self.name, **ref.to_dict(), "uri": self.model_uri or ref.uri}
        logger.info(
            "stage %s loaded %s in %.1fs (model %s)",
            self.name,
            self.stage_class,
            time.perf_counter() - started,
            info,
        )
        return LoadedModel(model, info)

    @staticmethod
    def _key_of(loaded: LoadedModel) -> str:
        info = loaded.info
        if info is None or info["version"] == "local":
            return ""
        return f"models:/{info['name']}/{info['version']}"

    async def _load(self, pin: str) -> LoadedModel:
        if self.model_uri is None:
            raise ValueError(f"stage {self.name} has no registry model to pin to {pin}")
        name, _, version = parse_model_uri(pin)
        if version is None or name != parse_model_uri(self.model_uri)[0]:
            raise ValueError(f"stage {self.name} serves {self.model_uri}; cannot pin to {pin}")
        return await asyncio.to_thread(self._build, {**self.init_kwargs, "model_uri": pin})

    async def model_for(self, pin: str | None) -> LoadedModel:
        """The loaded model a call pinned to ``pin`` runs on (None: the replica's default)."""
        if not pin or pin == self.default_key or self.model_uri is None:
            return self.default  # a stage built from a folder has no versions to pin
        return await self.versions.get(pin, lambda: self._load(pin))

    def configure(self, user_config: StageUserConfig) -> None:
        self.user_config = user_config
        self.versions.resize(user_config.max_loaded_versions)
        if self._watcher is None and self.model_uri and parse_model_uri(self.model_uri)[1]:
            self._watcher = asyncio.create_task(self._watch_alias())

    async def _watch_alias(self) -> None:
        """Preload the version the stage's alias names whenever it moves (never switch to it:
        which version answers is the caller's pin)."""
        from servecore.registry.client import resolve

        assert self.model_uri is not None
        async for _ in poll_ticks(lambda: self.user_config.registry_poll_s):
            try:
                ref = await asyncio.to_thread(resolve, self.model_uri)
                pin = pinned_uri(ref)
                if pin != self.default_key and pin not in self.versions:
                    logger.info("stage %s: %s now names %s; preloading", self.name, ref.uri, pin)
                    await self.model_for(pin)
                self.last_poll_error = None
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not kill the watcher
                self.last_poll_error = f"{type(e).__name__}: {e}"
                logger.warning("stage %s: alias poll failed: %s", self.name, e)

    def describe(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "class": self.stage_class,
            "model": self.default.info,
            "loaded_versions": self.versions.keys(),
            "last_poll_error": self.last_poll_error,
        }


class Interest:
    """Whether a caller still waits for its rows: read by the chain's thread between stages and
    awaited by the batch on the event loop."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.left = asyncio.Event()

    def leave(self) -> None:
        self.gone.set()
        self.left.set()


Call = tuple[Batch, tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...] | None, Interest]
"""One caller's share of a group batch: rows, pins, stages to run, columns to return, and whether
the caller still wants them."""


async def _all_left(interests: Sequence[Interest]) -> None:
    for interest in interests:
        await interest.left.wait()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done-callback of work nobody awaits any more: its outcome is read so that asyncio does not
    log it as lost; an :class:`Abandoned` chain is the expected one (logged: the fault tests wait
    for this line)."""
    if not future.cancelled() and future.exception() is not None:
        error = future.exception()
        if isinstance(error, Abandoned):
            logger.info("stage chain stopped: %s", error)
        else:
            logger.warning("abandoned stage work failed: %r", error)


CONCURRENT_BATCHES = 2
"""Batches one replica runs at once. The second lets a short call (a fallback member, the
embeddings route) run while a long one is in a slow stage of the same group, and overlaps one
batch's Python work with the other's torch computation."""


@serve.deployment(max_ongoing_requests=64)
class Stage:
    """Serve wrapper of one stage group: ``Stage.options(name="Pipeline").bind(group_plan)``.

    Each stage's outputs are renamed with its ``output_prefix`` (``probs`` → ``linear.probs``) so
    several members can feed one ensemble; Ray Data's batch pipeline applies the same renaming.
    """

    def __init__(self, group: GroupPlan) -> None:
        self.group = group
        self.name = serve.get_replica_context().deployment
        self.user_config = StageUserConfig()
        self.stages = {
            plan.deployment: StageModels(plan, self.user_config) for plan in group.stages
        }
        self.chain = StageChain(group.stages)
        self.all_stages = group.stage_names
        self._recent_batches: collections.deque[tuple[int, int]] = collections.deque(maxlen=512)

    # reconfigure/describe/batch_stats are async so they run on the replica's event loop, like
    # the batches whose state they read or change (Serve runs sync methods in a thread pool).
    async def reconfigure(self, config: dict[str, Any]) -> None:
        self.user_config = StageUserConfig.model_validate(config or {})
        self._run_batch.set_max_batch_size(self.user_config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.user_config.batch_wait_timeout_s)
        for stage in self.stages.values():
            stage.configure(self.user_config)

    async def __call__(
        self,
        *inputs: StageOutput | Batch,
        pins: dict[str, str] | None = None,
        stages: Sequence[str] | None = None,
        exports: Sequence[str] | None = None,
    ) -> StageOutput:
        """Run ``stages`` (default: the whole group) on the merged inputs; return ``exports``
        (default: every column the stages add), with the versions that computed them."""
        merged = merge_inputs(inputs)
        run = self.all_stages if stages is None else tuple(stages)
        pinned = tuple(sorted((pins or {}).items()))
        wanted = None if exports is None else tuple(exports)
        interest = Interest()
        try:
            result = await self._run_batch((merged.batch, pinned, run, wanted, interest))
        except asyncio.CancelledError:
            interest.leave()  # the caller went away: see _run_chain
            raise
        if isinstance(result, Exception):
            raise result  # this call's kind failed (the others in its batch may not have)
        batch, infos = result
        models = dict(merged.models)
        models.update(infos)
        return StageOutput(batch=batch, models=models)

    @serve.batch(
        max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=CONCURRENT_BATCHES
    )
    async def _run_batch(self, calls: list[Call]) -> list[tuple[Batch, dict[str, Any]] | Exception]:
        results: list[tuple[Batch, dict[str, Any]] | Exception | None] = [None] * len(calls)
        # Calls pinned to different versions (during a swap, or an A/B test) or asking for
        # different stages run as one batch per kind. A kind that fails (a version that cannot
        # load, a model that raises) fails its own calls only: @serve.batch would hand one
        # exception to every call of the batch, a shadow's broken version to the champion's too.
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for i, (_, pins, run, wanted, _interest) in enumerate(calls):
            kinds.setdefault((pins, run, wanted), []).append(i)
        for (pins, run, wanted), members in kinds.items():
            try:
                outputs = await self._run_kind([calls[i] for i in members], dict(pins), run, wanted)
            except Exception as e:  # noqa: BLE001 - re-raised to this kind's callers
                outputs = [e] * len(members)
            for i, output in zip(members, outputs, strict=True):
                results[i] = output
        return [r for r in results if r is not None]

    async def _run_kind(
        self,
        calls: list[Call],
        pin_of: dict[str, str],
        run: tuple[str, ...],
        wanted: tuple[str, ...] | None,
    ) -> list[tuple[Batch, dict[str, Any]]]:
        """One batch of calls that share pins, stages and exports, through the chain."""
        loaded = {name: await self.stages[name].model_for(pin_of.get(name)) for name in run}
        batches = [call[0] for call in calls]
        sizes = [num_rows(b) for b in batches]
        self._recent_batches.append((len(batches), sum(sizes)))
        timings: list[tuple[str, int, float]] = []
        output = await self._run_chain(
            [call[4] for call in calls],
            concat_batches(batches),
            run,
            {name: entry.model for name, entry in loaded.items()},
            wanted,
            timings,
        )
        if output is None:
            return [({}, {})] * len(calls)  # nobody reads it: every caller has gone
        for stage, rows, seconds in timings:
            self._observe(stage, loaded[stage], rows, seconds)
        infos = {name: entry.info for name, entry in loaded.items() if entry.info is not None}
        return [(part, infos) for part in split_batch(output, sizes)]

    async def _run_chain(
        self, interests: Sequence[Interest], batch: Batch, *args: Any
    ) -> Batch | None:
        """The chain's output, computed in a worker thread; None once every caller has gone.

        Abandoned work gives its batch slot back at once, so the next batch (a fallback, say)
        does not wait behind it; the thread finishes the stage it is in and runs no more
        (Python cannot stop a thread inside a stage).
        """
        work = asyncio.ensure_future(
            asyncio.to_thread(
                self.chain,
                batch,
                *args,
                lambda: all(interest.gone.is_set() for interest in interests),
            )
        )
        everyone_left = asyncio.ensure_future(_all_left(interests))
        try:
            await asyncio.wait({work, everyone_left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            everyone_left.cancel()
        if work.done() and not (work.exception() and isinstance(work.exception(), Abandoned)):
            return work.result()
        work.add_done_callback(_retrieve)
        logger.info("stage group %s: every caller went away; the batch is dropped", self.name)
        return None

    @staticmethod
    def _observe(stage: str, loaded: LoadedModel, rows: int, seconds: float) -> None:
        info = loaded.info or {}
        tags = {
            "stage": stage,
            "model": str(info.get("name", "local")),
            "version": str(info.get("version", "local")),
        }
        metric("intent_inference_latency_ms").observe(seconds * 1000.0, tags=tags)
        metric("intent_batch_size").observe(rows, tags={"stage": stage})

    async def describe(self) -> dict[str, Any]:
        """What this replica serves: its stages (class, model version, loaded versions) and the
        live batching knobs."""
        stages = [stage.describe() for stage in self.stages.values()]
        return {
            "group": self.name,
            "stage": self.name,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "stages": stages,
            "model": stages[0]["model"] if len(stages) == 1 else None,
            "last_poll_error": next(
                (s["last_poll_error"] for s in stages if s["last_poll_error"]), None
            ),
            "batching": self.user_config.model_dump(
                include={"max_batch_size", "batch_wait_timeout_s"}
            ),
            "versions": self.user_config.model_dump(
                include={"max_loaded_versions", "registry_poll_s"}
            ),
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
