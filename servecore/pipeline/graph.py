"""Stage groups at run time: which groups a call visits, and the in-process chain inside one.

Plain Python, no Ray. The spec's groups (:meth:`servecore.pipeline.spec.PipelineSpec.group_plans`)
say which stages share a replica. Every caller of the pipeline wants some columns: the gateway the
ensemble's ``label`` and ``probs``, the embeddings route and the drift monitor the encoder's
``embedding``, a fallback one member's probabilities. :meth:`Layout.route` turns a wish into hops:
the groups to call, in order, each with the stages it must run (only those the wish needs), the
hops it reads from, whether it reads the request's texts, and the columns it must hand on.

:class:`StageChain` runs one hop's stages inside one process on one batch: the Serve group
deployment, the Ray Data group actor and the in-process benchmark pipeline all use it, so a
grouping changes where stages run, never what they compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from servecore.pipeline.batching import Batch
from servecore.pipeline.spec import GroupPlan, PipelineSpec, StagePlan

TEXT = "text"
PREDICTION = ("probs", "label")
"""What the gateway wants: the ensemble's output."""
EMBEDDING = ("embedding", "num_tokens")
"""What the embeddings route and the drift monitor want: the encoder's output."""


@dataclass(frozen=True)
class Hop:
    """One group call of a route."""

    group: str
    stages: tuple[str, ...]
    """The group's stages this call runs, in order."""
    after: tuple[int, ...]
    """Indexes (in the route) of the hops whose outputs it reads."""
    reads_text: bool
    """Whether it is fed the request's texts."""
    exports: tuple[str, ...]
    """Columns it returns: those later hops read, and those the caller wants."""


class Layout:
    """The groups of one spec, and the routes through them."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.groups: list[GroupPlan] = spec.group_plans()
        self.plans: dict[str, StagePlan] = {p.deployment: p for g in self.groups for p in g.stages}
        self.group_of = {p: g.name for g in self.groups for p in g.stage_names}
        self.producer = {c: p.deployment for p in self.plans.values() for c in p.outputs}
        self._routes: dict[tuple[str, ...], tuple[Hop, ...]] = {}

    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def stage_of_output(self, column: str) -> str:
        try:
            return self.producer[column]
        except KeyError:
            raise ValueError(f"no stage produces column {column!r}") from None

    def needed_stages(self, want: Iterable[str]) -> set[str]:
        """Every stage that must run to produce ``want`` from the texts."""
        needed: set[str] = set()
        columns = [c for c in want if c != TEXT]
        while columns:
            stage = self.stage_of_output(columns.pop())
            if stage not in needed:
                needed.add(stage)
                columns += [c for c in self.plans[stage].reads if c != TEXT]
        return needed

    def route(self, want: Sequence[str]) -> tuple[Hop, ...]:
        """The hops that produce ``want`` (cached: a route depends only on the wish)."""
        key = tuple(want)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = self._plan_route(key)
        return found

    def _plan_route(self, want: tuple[str, ...]) -> tuple[Hop, ...]:
        needed = self.needed_stages(want)
        visits = [
            (g.name, tuple(s for s in g.stage_names if s in needed))
            for g in self.groups
            if needed & set(g.stage_names)
        ]
        index_of_group = {group: i for i, (group, _) in enumerate(visits)}
        hops = []
        for group, stages in visits:
            after: set[int] = set()
            reads_text = False
            for stage in stages:
                for column in self.plans[stage].reads:
                    if column == TEXT:
                        reads_text = True
                        continue
                    source = self.group_of[self.producer[column]]
                    if source != group:
                        after.add(index_of_group[source])
            produced = [c for s in stages for c in self.plans[s].outputs]
            read_elsewhere = {
                c
                for other, other_stages in visits
                if other != group
                for s in other_stages
                for c in self.plans[s].reads
            }
            exports = tuple(c for c in produced if c in read_elsewhere or c in want)
            hops.append(Hop(group, stages, tuple(sorted(after)), reads_text, exports))
        return tuple(hops)

    @staticmethod
    def sinks(route: Sequence[Hop]) -> list[int]:
        """Hops no other hop reads from: the caller awaits these (and merges their outputs)."""
        read = {i for hop in route for i in hop.after}
        return [i for i in range(len(route)) if i not in read]


Timings = list[tuple[str, int, float]]
"""``(stage, rows, seconds)`` of every stage a chain run ran."""


class Abandoned(Exception):
    """Every caller of a chain run went away: the stages left are not run."""


class StageChain:
    """Runs stages of one group in process, in order, over one batch.

    ``models`` maps a stage name to the loaded model object to call for it (a pinned version, say);
    each stage is fed the columns it reads and its outputs are added under its prefix.
    """

    def __init__(self, plans: Iterable[StagePlan]) -> None:
        self.plans = {plan.deployment: plan for plan in plans}

    def __call__(
        self,
        batch: Batch,
        stages: Sequence[str],
        models: dict[str, Any],
        exports: Sequence[str] | None = None,
        timings: Timings | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> Batch:
        """Run ``stages`` over ``batch``; return ``exports`` (all new columns if None). Each
        stage's time is appended to ``timings``. Before each stage ``abandoned()`` is asked
        whether anybody still wants the answer; if not, :class:`Abandoned` is raised (a stage
        already running cannot be stopped, but the rest of the chain is not started)."""
        columns = dict(batch)
        added: list[str] = []
        rows = len(next(iter(batch.values()))) if batch else 0
        for stage in stages:
            if abandoned is not None and abandoned():
                raise Abandoned(f"every caller went away before stage {stage}")
            plan = self.plans[stage]
            missing = [c for c in plan.reads if c not in columns]
            if missing:
                raise KeyError(f"stage {stage} needs columns {missing}; got {sorted(columns)}")
            started = time.perf_counter()
            fed = dict(columns) if plan.input == "rows" else {c: columns[c] for c in plan.reads}
            output = models[stage](fed)
            if timings is not None:
                timings.append((stage, rows, time.perf_counter() - started))
            for key, value in output.items():
                name = f"{plan.output_prefix}{key}"
                columns[name] = value
                added.append(name)
        wanted = added if exports is None else exports
        return {c: columns[c] for c in wanted}
