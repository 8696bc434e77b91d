"""The intent pipeline in one process, without Ray: the compute ceiling and the peers' engine.

The stages are built from the same :class:`~servecore.pipeline.spec.PipelineSpec` the Serve graph is
built from (``spec.stage_plans()``), and batches flow between them exactly as they do between the
Serve deployments: ``dict[str, np.ndarray]`` in and out, member outputs renamed with their
``output_prefix``, the ensemble fed the merged member columns. Torch keeps the process's default
thread count: nothing here calls ``torch.set_num_threads``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servecore.pipeline.batching import Batch, text_batch
from servecore.pipeline.graph import PREDICTION, StageChain, Timings
from servecore.pipeline.spec import PipelineSpec, load_stage_class

logger = logging.getLogger(__name__)

APP_NAME = "intent"
TOKENIZER = "Tokenizer"
ENCODER = "Encoder"


def load_spec(config_path: str | Path, app: str = APP_NAME) -> PipelineSpec:
    """The validated pipeline spec of application ``app`` in a Serve config file."""
    from servecore.config_check import load_app_spec

    return load_app_spec(config_path, app)


class _Locked:
    """A model whose calls are serialised (a fast tokenizer mutates its own settings)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.model_ref = getattr(model, "model_ref", None)
        self._lock = threading.Lock()

    def __call__(self, batch: Batch) -> Batch:
        with self._lock:
            output: Batch = self.model(batch)
        return output


class InProcessPipeline:
    """Tokenizer → Encoder → members (heads on embeddings, text models on text) → Ensemble, every
    stage in this process, chained by :class:`servecore.pipeline.graph.StageChain` as one stage
    group of the Serve graph or the batch pipeline runs them.

    Calling it with a list of texts returns the ensemble's batch (``probs``, ``label``). It may be
    called from several threads at once (the unbatched peer does): the tokenizer is serialised,
    the torch stages run in inference mode and keep no per-call state.
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.plans = spec.stage_plans()
        self._models: dict[str, Any] = {}
        for plan in self.plans:
            started = time.perf_counter()
            model = load_stage_class(plan.stage_class)(**plan.init_kwargs)
            if plan.deployment == TOKENIZER:
                model = _Locked(model)
            self._models[plan.deployment] = model
            logger.info(
                "loaded %s (%s) in %.1fs",
                plan.deployment,
                plan.stage_class,
                time.perf_counter() - started,
            )
        self.chain = StageChain(self.plans)
        self.order = tuple(plan.deployment for plan in self.plans)

    def model(self, stage: str) -> Any:
        """The loaded model class of ``stage`` (the tokenizer behind its lock)."""
        model = self._models[stage]
        return model.model if isinstance(model, _Locked) else model

    def models(self) -> list[dict[str, Any]]:
        """Registered model version behind every stage (as the gateway reports them)."""
        found = []
        for name in self.order:
            ref = getattr(self._models[name], "model_ref", None)
            if ref is not None:
                found.append({"stage": name, **ref.to_dict()})
        return found

    def __call__(
        self, texts: Sequence[str], stage_seconds: dict[str, float] | None = None
    ) -> Batch:
        """Run every stage once over ``texts``; add each stage's time to ``stage_seconds``."""
        timings: Timings = []
        output = self.chain(text_batch(texts), self.order, self._models, PREDICTION, timings)
        if stage_seconds is not None:
            for name, _, seconds in timings:
                stage_seconds[name] = stage_seconds.get(name, 0.0) + seconds
        return output
