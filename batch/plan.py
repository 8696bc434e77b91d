"""How a pipeline spec becomes Ray Data stages: which columns each stage reads and keeps, and what
resources its actor pool gets.

Nothing here starts Ray. One Ray Data stage (one ``map_batches``, one actor pool) runs per stage
group of the spec (``spec.group_plans()``, the same groups the Serve graph deploys), its stages in
process one after another; the resources start from the group's entry in the application's
``deployments:`` section in the same config file and can be overridden per group (or per stage
name, which means the group that holds it). :func:`fit_to_cluster` then shrinks CPU requests to
what the cluster has free, because a Ray Data actor pool that cannot get its CPUs waits forever.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from servecore.pipeline.spec import GroupPlan, PipelineSpec, StagePlan

logger = logging.getLogger(__name__)

ID = "id"
TEXT = "text"
VERSIONS = "model_versions"
"""Per-row column naming every registered model version that scored the row."""

DEFAULT_BATCH_SIZE = 64
"""Rows per ``map_batches`` call. Serve's ``max_batch_size`` counts calls, not rows, so it is not
reused here."""
TASK_CPUS = 0.25
"""CPUs of each of Ray Data's own read, validate and write tasks."""
RESERVED_CPUS = 2 * TASK_CPUS
"""CPUs left free for those tasks when actor pools are fitted to the cluster: on a two-core node,
actors that take every CPU starve the read tasks and the job hangs."""
LIGHT_STAGE_CPUS = 0.25
"""Least CPU a stage actor asks for. Serve runs light stages at ``num_cpus: 0``; in Ray Data an
actor pool must claim something, or nothing bounds how many share a core."""


@dataclass(frozen=True)
class StageResources:
    """The Ray Data side of one stage: actor pool size, per-actor resources, rows per batch."""

    num_cpus: float
    num_gpus: float = 0.0
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"resources must be non-negative: {self}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors: {self}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1: {self}")

    @property
    def cpu_demand(self) -> float:
        """CPUs the pool holds at its largest."""
        return self.num_cpus * self.max_actors


RESOURCE_FIELDS = tuple(f.name for f in fields(StageResources))


@dataclass(frozen=True)
class BatchStage:
    """One ``map_batches`` of the batch pipeline: one stage group."""

    group: GroupPlan
    reads: tuple[str, ...]
    """Columns the group is fed (those its stages read and no stage of it produces)."""
    keeps: tuple[str, ...]
    """Columns still needed after this group (by later groups, or in the output)."""
    last: bool
    resources: StageResources

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def plans(self) -> tuple[StagePlan, ...]:
        return self.group.stages

    def constructor_kwargs(self) -> dict[str, Any]:
        """``fn_constructor_kwargs`` of the group's :class:`batch.adapter.StageActor`."""
        return {
            "group": self.group,
            "reads": list(self.reads),
            "keeps": list(self.keeps),
            "last": self.last,
        }


def group_reads(group: GroupPlan) -> tuple[str, ...]:
    """Columns a group consumes from outside itself, in first-read order."""
    produced: set[str] = set()
    reads: list[str] = []
    for plan in group.stages:
        reads += [c for c in plan.reads if c not in produced and c not in reads]
        produced.update(plan.outputs)
    return tuple(reads)


def resources_from_deployment(
    deployment: Mapping[str, Any] | None, batch_size: int = DEFAULT_BATCH_SIZE
) -> StageResources:
    """Ray Data resources from a Serve deployment entry: ``ray_actor_options`` for CPUs and GPUs,
    ``autoscaling_config`` min/max replicas (else ``num_replicas``) for the actor pool."""
    deployment = deployment or {}
    options = deployment.get("ray_actor_options") or {}
    num_cpus = max(float(options.get("num_cpus", LIGHT_STAGE_CPUS)), LIGHT_STAGE_CPUS)
    num_gpus = float(options.get("num_gpus", 0.0))
    autoscaling = deployment.get("autoscaling_config")
    replicas = deployment.get("num_replicas")
    if isinstance(autoscaling, Mapping):
        min_actors = max(1, int(autoscaling.get("min_replicas", 1)))
        max_actors = max(min_actors, int(autoscaling.get("max_replicas", min_actors)))
    elif isinstance(replicas, int) and replicas > 0:
        min_actors = max_actors = replicas
    else:
        min_actors = max_actors = 1
    return StageResources(num_cpus, num_gpus, min_actors, max_actors, batch_size)


def apply_overrides(
    resources: StageResources, overrides: Mapping[str, float | int] | None
) -> StageResources:
    """``{"num_cpus": 0.5, "max_actors": 2, ...}`` on top of ``resources``.

    Setting only one pool bound moves the other along when needed (``max_actors: 3`` on a pool of
    at least 4 gives 3..3).
    """
    if not overrides:
        return resources
    unknown = set(overrides) - set(RESOURCE_FIELDS)
    if unknown:
        raise ValueError(f"unknown stage option(s) {sorted(unknown)}; use {list(RESOURCE_FIELDS)}")
    values = {
        k: (int(v) if k in ("min_actors", "max_actors", "batch_size") else float(v))
        for k, v in overrides.items()
    }
    lower = values.get("min_actors", resources.min_actors)
    upper = values.get("max_actors", resources.max_actors)
    if "min_actors" in values and "max_actors" not in values:
        upper = max(upper, lower)
    if "max_actors" in values and "min_actors" not in values:
        lower = min(lower, upper)
    values["min_actors"], values["max_actors"] = lower, upper
    changes: dict[str, Any] = dict(values)
    return replace(resources, **changes)


def plan_stages(
    spec: PipelineSpec,
    deployments: Mapping[str, Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overrides: Mapping[str, Mapping[str, float | int]] | None = None,
    keep_text: bool = False,
    keep_columns: Iterable[str] = (),
) -> list[BatchStage]:
    """The Ray Data stages of ``spec``: one per stage group, in ``spec.group_plans()`` order.

    ``deployments`` is the application's ``deployments:`` section keyed by name; ``overrides`` maps
    a group name, or the name of a stage in it, to resource fields (see :data:`RESOURCE_FIELDS`).
    ``keep_columns`` are intermediate columns (``embedding``) carried to the output.
    """
    groups = spec.group_plans()
    group_of = {stage: g.name for g in groups for stage in g.stage_names}
    group_of.update({g.name: g.name for g in groups})
    unknown = set(overrides or {}) - set(group_of)
    if unknown:
        raise ValueError(
            f"no stage named {sorted(unknown)}; stages are {list(group_of)}"
            f" (groups: {[g.name for g in groups]})"
        )
    by_group: dict[str, dict[str, float | int]] = {}
    for name, values in (overrides or {}).items():
        by_group.setdefault(group_of[name], {}).update(values)
    passthrough = {ID, VERSIONS, *keep_columns} | ({TEXT} if keep_text else set())
    reads = [group_reads(g) for g in groups]
    stages = []
    for i, group in enumerate(groups):
        later = {column for r in reads[i + 1 :] for column in r}
        resources = apply_overrides(
            resources_from_deployment(deployments.get(group.name), batch_size),
            by_group.get(group.name),
        )
        stages.append(
            BatchStage(
                group=group,
                reads=reads[i],
                keeps=tuple(sorted(passthrough | later)),
                last=i == len(groups) - 1,
                resources=resources,
            )
        )
    return stages


class ClusterFull(RuntimeError):
    """No CPU is free for the job's stages right now (another workload holds them)."""


def fit_to_cluster(
    stages: Iterable[BatchStage], free_cpus: float, free_gpus: float
) -> tuple[list[BatchStage], list[str]]:
    """Shrink the stages' requests to what the cluster has free; returns (stages, what changed).

    GPUs asked for on a cluster without any are dropped (the stage runs on the CPU, as ``device:
    auto`` does). When every pool at its largest needs more CPUs than are free beyond
    :data:`RESERVED_CPUS`, every stage's ``num_cpus`` is scaled by the same factor: pool sizes are
    kept, since two actors with one torch thread each beat one actor on a shared core.
    """
    stages = list(stages)
    notes: list[str] = []
    if free_gpus <= 0:
        for i, stage in enumerate(stages):
            if stage.resources.num_gpus > 0:
                notes.append(
                    f"{stage.name}: no GPU in the cluster, num_gpus 0 instead of "
                    f"{stage.resources.num_gpus:g}"
                )
                stages[i] = replace(stage, resources=replace(stage.resources, num_gpus=0.0))
    budget = free_cpus - RESERVED_CPUS
    demand = sum(s.resources.cpu_demand for s in stages)
    if demand <= budget:
        return stages, notes
    if budget <= 0:
        raise ClusterFull(
            f"the cluster has {free_cpus:g} CPUs free; the batch pipeline needs more than "
            f"{RESERVED_CPUS:g} (for its own read and write tasks) plus its stages"
        )
    factor = budget / demand
    notes.append(
        f"stages ask for {demand:g} CPUs at most, {budget:g} are free beyond {RESERVED_CPUS:g} "
        f"for Ray Data's tasks: num_cpus scaled by {factor:.3f}"
    )
    for i, stage in enumerate(stages):
        # Rounded down so the sum stays inside the budget.
        cpus = max(math.floor(stage.resources.num_cpus * factor * 1000) / 1000, 0.001)
        stages[i] = replace(stage, resources=replace(stage.resources, num_cpus=cpus))
    return stages, notes
