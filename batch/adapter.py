"""The class Ray Data runs for every stage group: it wraps the group's plain model classes in an
actor.

``map_batches(stage_actor_class(name), fn_constructor_kwargs=stage.constructor_kwargs(), ...)``
builds the group's models once per actor (torch gets as many threads as the actor was granted
CPUs), runs its stages one after another on each batch
(:class:`servecore.pipeline.graph.StageChain`, as the Serve wrapper does), feeding each the columns
it reads and adding its outputs, renamed with the stage's ``output_prefix`` exactly as Serve renames
them. Columns no later group needs are dropped on the way, each row's ``model_versions`` grows by
every stage's registered version, and the last group turns the ensemble's output into the job's
output columns. Ray Serve is never imported here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from batch.plan import ID, TEXT, VERSIONS
from servecore import LABELS
from servecore.pipeline.batching import Batch, num_rows
from servecore.pipeline.graph import StageChain
from servecore.pipeline.spec import GroupPlan
from servecore.pipeline.stages import build_stage

logger = logging.getLogger(__name__)


def probability_column(label: str) -> str:
    return f"prob_{label}"


def output_columns(
    batch: Batch, labels: Sequence[str], keep_text: bool, extra: Sequence[str] = ()
) -> Batch:
    """The job's output from the ensemble's batch: id, label, one probability column per label;
    ``extra`` columns (e.g. ``embedding``) are carried through as they are."""
    probs = np.asarray(batch["probs"], dtype=np.float32)
    out: Batch = {ID: batch[ID]}
    if keep_text:
        out[TEXT] = batch[TEXT]
    for column in extra:
        out[column] = batch[column]
    out["label"] = np.asarray([str(label) for label in batch["label"]], dtype=object)
    for j, label in enumerate(labels):
        out[probability_column(label)] = probs[:, j]
    versions = batch.get(VERSIONS)
    out[VERSIONS] = np.full(len(probs), "", dtype=object) if versions is None else versions
    return out


class StageActor:
    """One stage group inside a Ray Data actor (see the module docstring)."""

    def __init__(self, group: GroupPlan, reads: list[str], keeps: list[str], last: bool) -> None:
        self.group = group
        self.models: dict[str, Any] = {}
        versions = []
        for plan in group.stages:
            started = time.perf_counter()
            model = self.models[plan.deployment] = build_stage(plan.stage_class, plan.init_kwargs)
            ref = getattr(model, "model_ref", None)
            if ref is not None:
                versions.append(f"{plan.deployment}={ref.name}/{ref.version}")
            logger.info(
                "stage %s loaded %s in %.1fs (%s)",
                plan.deployment,
                plan.stage_class,
                time.perf_counter() - started,
                versions[-1] if ref is not None else None,
            )
        self.chain = StageChain(group.stages)
        self.stages = group.stage_names
        self.reads = tuple(reads)
        self.keeps = frozenset(keeps)
        self.last = last
        self.version = ",".join(versions) or None
        """This group's part of each row's ``model_versions``, stages in order."""
        self.labels = tuple(getattr(self.models[self.stages[-1]], "labels", LABELS))

    def __call__(self, batch: Batch) -> Batch:
        missing = [c for c in self.reads if c not in batch]
        if missing:
            raise KeyError(f"stage {self.group.name} needs columns {missing}; got {sorted(batch)}")
        output = self.chain({c: batch[c] for c in self.reads}, self.stages, self.models)
        result = {k: v for k, v in batch.items() if k in self.keeps}
        result.update({k: v for k, v in output.items() if self.last or k in self.keeps})
        if self.version is not None:
            result[VERSIONS] = self._with_version(batch.get(VERSIONS), num_rows(batch))
        if self.last:
            extra = sorted(self.keeps - {ID, TEXT, VERSIONS})
            return output_columns(result, self.labels, keep_text=TEXT in self.keeps, extra=extra)
        return result

    def _with_version(self, versions: np.ndarray | None, rows: int) -> np.ndarray:
        if versions is None:
            return np.full(rows, self.version, dtype=object)
        return np.asarray([f"{v},{self.version}" for v in versions], dtype=object)


@functools.cache
def stage_actor_class(deployment: str) -> type[StageActor]:
    """:class:`StageActor` under the group's own name.

    Ray Data names an operator, its progress bar and its actors after the class
    (``MapBatches(Encoder)``, actor ``MapWorker(MapBatches(Encoder))``); several pools of one class
    would be indistinguishable in the progress output, the dashboard and the job summary. The
    subclass adds nothing else; it is not importable, so Ray ships it by value.
    """
    if not deployment.isidentifier():
        raise ValueError(f"stage name {deployment!r} is not a Python identifier")
    return type(deployment, (StageActor,), {"__qualname__": deployment, "__module__": __name__})


def stage_of_actor(class_name: str, stages: Iterable[str]) -> str | None:
    """Which stage an actor of Ray's actor table belongs to, from the class name Ray gives it:
    ``MapWorker(MapBatches(Encoder))``, or with the read fused into the first stage
    ``MapWorker(ReadParquet->...->MapBatches(Tokenizer))``."""
    for stage in stages:
        if class_name.startswith("MapWorker(") and class_name.endswith(f"MapBatches({stage}))"):
            return stage
    return None
