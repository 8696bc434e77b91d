"""The MLServer runtime of the benchmark's MLServer peer (:mod:`bench.mlserver_peer`).

It is imported only by MLServer, inside the peer's own virtual environment (which has MLServer,
torch and transformers but no MLflow): ``model-settings.json`` names it as the ``intent`` model's
``implementation`` and hands it, under ``parameters.extra``, the spec's stage plans with local
model folders in place of registry URIs, and the registered versions behind them.

:meth:`IntentRuntime.predict` takes one BYTES input ``text`` of shape ``[n]`` and runs the same
model classes, chained by the same :class:`servecore.pipeline.graph.StageChain`, as the Serve graph
and the FastAPI peers; it answers ``label`` (BYTES ``[n]``) and ``probabilities`` (FP32 ``[n, 6]``),
with the model versions and the merged call's size in the response's parameters. MLServer's
adaptive batching merges concurrent requests into one call before it reaches
:meth:`~IntentRuntime.predict`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, Parameters, ResponseOutput

from servecore.pipeline.batching import text_batch
from servecore.pipeline.graph import PREDICTION, StageChain
from servecore.pipeline.spec import StagePlan, load_stage_class

logger = logging.getLogger(__name__)

TEXT_INPUT = "text"
LABEL_OUTPUT = "label"
PROBS_OUTPUT = "probabilities"


def _plan(data: dict[str, Any]) -> StagePlan:
    return StagePlan(
        deployment=data["deployment"],
        stage_class=data["stage_class"],
        init_kwargs=dict(data["init_kwargs"]),
        input=data["input"],
        output_prefix=data.get("output_prefix", ""),
        members=tuple(data.get("members", ())),
        outputs=tuple(data.get("outputs", ())),
    )


def decode_texts(request: InferenceRequest) -> list[str]:
    """The request's ``text`` input as strings; :class:`InferenceError` (HTTP 400) otherwise."""
    found = [i for i in request.inputs if i.name == TEXT_INPUT]
    if len(found) != 1:
        names = [i.name for i in request.inputs]
        raise InferenceError(f"expected one input named {TEXT_INPUT!r}, got {names}")
    request_input = found[0]
    if request_input.datatype != "BYTES":
        raise InferenceError(
            f"input {TEXT_INPUT!r} must have datatype BYTES, not {request_input.datatype}"
        )
    data = request_input.data.root
    items = data if isinstance(data, list) else [data]
    texts: list[str] = []
    for item in items:
        # MLServer's own StringCodec turns anything that is not a string into "" silently; a
        # number sent as a text is the client's mistake, so it is refused instead.
        if isinstance(item, bytes):
            texts.append(item.decode("utf-8"))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise InferenceError(f"input {TEXT_INPUT!r} holds a {type(item).__name__}, not text")
    rows = int(np.prod(request_input.shape)) if request_input.shape else 0
    if rows != len(texts) or not texts:
        raise InferenceError(
            f"input {TEXT_INPUT!r} has shape {request_input.shape} but {len(texts)} texts"
        )
    return texts


class IntentRuntime(MLModel):
    """The intent pipeline (tokenizer → encoder → members → ensemble) as an MLServer model."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        if "stages" not in extra:
            raise ValueError(
                "model-settings.json lacks parameters.extra.stages (written by "
                "bench.mlserver_peer.write_settings)"
            )
        # As many intra-op threads as CPUs, like the FastAPI peers' model (torch's default
        # there): MLServer's worker process must not end up with another count.
        torch.set_num_threads(os.cpu_count() or 1)
        plans = [_plan(stage) for stage in extra["stages"]]
        self._models: dict[str, Any] = {}
        for plan in plans:
            started = time.perf_counter()
            self._models[plan.deployment] = load_stage_class(plan.stage_class)(**plan.init_kwargs)
            logger.info("loaded %s in %.1fs", plan.deployment, time.perf_counter() - started)
        self._chain = StageChain(plans)
        self._order = tuple(plan.deployment for plan in plans)
        self._versions = list(extra.get("models", []))
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = decode_texts(payload)
        # Run on this coroutine's thread: MLServer runs the model in a worker process of its own
        # (parallel_workers=1), so blocking that process's loop keeps batches one at a time, as
        # the tokenizer (not thread-safe) needs, and leaves the HTTP loop alone.
        output = self._chain(text_batch(texts), self._order, self._models, PREDICTION)
        probs = np.asarray(output["probs"], dtype=np.float32)
        labels = [str(label) for label in output["label"]]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            # batch_texts: the rows of the merged call this request rode in, the one place a
            # client can see how well adaptive batching fills batches (metrics are off).
            parameters=Parameters(models=self._versions, batch_texts=len(texts)),
            outputs=[
                ResponseOutput(
                    name=LABEL_OUTPUT,
                    datatype="BYTES",
                    shape=[len(labels)],
                    data=labels,
                    parameters=Parameters(content_type="str"),
                ),
                ResponseOutput(
                    name=PROBS_OUTPUT,
                    datatype="FP32",
                    shape=list(probs.shape),
                    # Flat, row-major: MLServer's adaptive batching splits a merged response by
                    # slicing the flat data (rows × columns per request).
                    data=probs.ravel().tolist(),
                    parameters=Parameters(content_type="np"),
                ),
            ],
        )
