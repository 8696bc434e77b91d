"""The intent pipeline in one process, without Ray: the compute ceiling and the peers' engine.

The stages are built from the same :class:`~servecore.spec.PipelineSpec` the Serve graph is built
from (``spec.stage_plans()``), and batches flow between them exactly as they do between the Serve
deployments: ``dict[str, np.ndarray]`` in and out, member outputs renamed with their
``output_prefix``, the ensemble fed the merged member columns. Torch keeps the process's default
thread count: nothing here calls ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servecore.batching import Batch, text_batch
from servecore.spec import PipelineSpec, StagePlan, load_stage_class

logger = logging.getLogger(__name__)

APP_NAME = "intent"
TOKENIZER = "Tokenizer"
ENCODER = "Encoder"


def load_spec(config_path: str | Path, app: str = APP_NAME) -> PipelineSpec:
    """The validated pipeline spec of application ``app`` in a Serve config file."""
    from servecore.config_check import load_app_spec

    return load_app_spec(config_path, app)


@dataclass
class LoadedStage:
    plan: StagePlan
    model: Any
    lock: threading.Lock | None = None
    """Held around calls that are not thread-safe (a fast tokenizer mutates its own settings)."""

    def __call__(self, batch: Batch) -> Batch:
        if self.lock is None:
            output = self.model(batch)
        else:
            with self.lock:
                output = self.model(batch)
        if self.plan.output_prefix:
            output = {f"{self.plan.output_prefix}{k}": v for k, v in output.items()}
        return output


class InProcessPipeline:
    """Tokenizer → Encoder → members (heads on embeddings, text models on text) → Ensemble.

    Calling it with a list of texts returns the ensemble's batch (``probs``, ``label``). It may be
    called from several threads at once (the unbatched peer does): the tokenizer is serialised,
    the torch stages run in inference mode and keep no per-call state.
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.stages: list[LoadedStage] = []
        for plan in spec.stage_plans():
            started = time.perf_counter()
            model = load_stage_class(plan.stage_class)(**plan.init_kwargs)
            lock = threading.Lock() if plan.deployment == TOKENIZER else None
            self.stages.append(LoadedStage(plan=plan, model=model, lock=lock))
            logger.info(
                "loaded %s (%s) in %.1fs",
                plan.deployment,
                plan.stage_class,
                time.perf_counter() - started,
            )
        self._check_layout()

    def _check_layout(self) -> None:
        names = [s.plan.deployment for s in self.stages]
        if names[:2] != [TOKENIZER, ENCODER] or self.stages[-1].plan.input != "members":
            raise ValueError(f"unexpected stage layout {names}")
        prefixes = {s.plan.output_prefix for s in self.stages}
        missing = [m for m in self.stages[-1].plan.members if f"{m}." not in prefixes]
        if missing:
            raise ValueError(f"ensemble members {missing} have no stage")

    def models(self) -> list[dict[str, Any]]:
        """Registered model version behind every stage (as the gateway reports them)."""
        found = []
        for stage in self.stages:
            ref = getattr(stage.model, "model_ref", None)
            if ref is not None:
                found.append({"stage": stage.plan.deployment, **ref.to_dict()})
        return found

    def __call__(
        self, texts: Sequence[str], stage_seconds: dict[str, float] | None = None
    ) -> Batch:
        """Run every stage once over ``texts``; add each stage's time to ``stage_seconds``."""
        text = text_batch(texts)
        outputs: dict[str, Batch] = {}
        for stage in self.stages:
            started = time.perf_counter()
            outputs[stage.plan.deployment] = stage(self._input_of(stage.plan, text, outputs))
            if stage_seconds is not None:
                name = stage.plan.deployment
                stage_seconds[name] = stage_seconds.get(name, 0.0) + (time.perf_counter() - started)
        return outputs[self.stages[-1].plan.deployment]

    def _input_of(self, plan: StagePlan, text: Batch, outputs: dict[str, Batch]) -> Batch:
        if plan.input == "text":
            return text
        if plan.input == "tokens":
            return outputs[TOKENIZER]
        if plan.input == "embedding":
            return outputs[ENCODER]
        # The ensemble: the member columns merged into one batch, like Serve's merge_inputs.
        wanted = {f"{m}." for m in plan.members}
        merged: Batch = {}
        for stage in self.stages:
            if stage.plan.output_prefix in wanted:
                merged.update(outputs[stage.plan.deployment])
        return merged
