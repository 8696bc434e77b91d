"""The gateway: the FastAPI ingress deployment in front of the pipeline graph.

Concurrent ``/v1/predict`` requests are coalesced into one graph call (see
:mod:`servecore.coalescer` for why not ``@serve.batch`` here), so the downstream hops are paid per
micro-batch instead of per request: on a 2-core machine each Serve hop costs milliseconds of CPU.
Within a call every fan-out ``.remote()`` starts before anything is awaited, and responses flow from
stage to stage without the gateway touching them.

No ``from __future__ import annotations``: FastAPI must see real classes in the route signatures.
"""

import asyncio
import base64
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.stage import StageOutput
from servecore import LABELS
from servecore.batching import split_batch, text_batch
from servecore.coalescer import Coalescer
from servecore.errors import InvalidRequest, ModelNotFound, ModelUnavailable, NotReady
from servecore.http_errors import install_error_handlers, request_id
from servecore.schemas import (
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    ErrorResponse,
    Health,
    ModelsResponse,
    ModelVersion,
    Prediction,
    PredictRequest,
    PredictResponse,
)
from servecore.spec import PipelineSpec

logger = logging.getLogger("ray.serve")

# A stage that failed, is not deployed, or cannot take the call (back-pressure) — the caller may
# retry: 503. RayServeException covers BackPressureError and DeploymentUnavailableError.
STAGE_ERRORS = (RayError, RayServeException, TimeoutError)

MAX_CONCURRENT_BATCHES = 4
READY_TIMEOUT_S = 10.0
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 422, 503)
}

app = FastAPI(
    title="Intent serving",
    version="0.1.0",
    description="Customer-support intent routing on Ray Serve, models from the MLflow registry.",
)
install_error_handlers(app)


class GatewayUserConfig(BaseModel):
    """Live knobs of the gateway (``user_config`` of the ``Gateway`` deployment)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=64, ge=1, le=1024)
    """Most texts merged into one graph call (a larger single request still runs, alone)."""
    max_concurrent_batches: int = Field(default=MAX_CONCURRENT_BATCHES, ge=1, le=64)
    """Graph calls in flight at once; more requests wait and join the next call."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=1.0)
    """Extra wait for a call to fill once a slot is free; 0 sends whatever is queued."""
    graph_timeout_s: float = Field(default=20.0, gt=0.0, le=300.0)
    """Deadline of one graph call; past it the callers get a 503 and the slot is freed."""


def _json(model: BaseModel, status_code: int = 200) -> Response:
    """Serialise once; returning the model would make FastAPI validate it again."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _versions(models: dict[str, dict[str, Any]]) -> list[ModelVersion]:
    return [ModelVersion(**info) for info in models.values()]


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Gateway:
    def __init__(self, spec: dict[str, Any], stages: dict[str, DeploymentHandle]) -> None:
        self.spec = PipelineSpec.model_validate(spec)
        self.stages = stages
        self.heads = [
            (m.name, stages[m.deployment]) for m in self.spec.members if m.input == "embedding"
        ]
        self.text_models = [
            (m.name, stages[m.deployment]) for m in self.spec.members if m.input == "text"
        ]
        self.encoder_name = self.spec.encoder_name()
        knobs = GatewayUserConfig()
        self.graph_timeout_s = knobs.graph_timeout_s
        self.coalescer: Coalescer[list[str], StageOutput] = Coalescer(
            self._predict_batch,
            max_batch_size=knobs.max_batch_size,
            max_concurrent=knobs.max_concurrent_batches,
            size_of=len,
        )

    async def reconfigure(self, config: dict[str, Any]) -> None:
        # async: it touches the coalescer's asyncio state, which belongs to the replica's loop.
        knobs = GatewayUserConfig.model_validate(config or {})
        self.graph_timeout_s = knobs.graph_timeout_s
        self.coalescer.configure(
            knobs.max_batch_size, knobs.max_concurrent_batches, knobs.batch_wait_timeout_s
        )

    def _classify(self, texts: list[str]) -> Any:
        """Start the whole graph for ``texts``; returns the ensemble's unawaited response."""
        batch = text_batch(texts)
        tokens = self.stages["Tokenizer"].remote(batch)
        embeddings = self.stages["Encoder"].remote(tokens)
        members = [handle.remote(embeddings) for _, handle in self.heads]
        members += [handle.remote(batch) for _, handle in self.text_models]
        return self.stages["Ensemble"].remote(*members)

    async def _predict_batch(self, requests: list[list[str]]) -> list[StageOutput]:
        sizes = [len(texts) for texts in requests]
        output: StageOutput = await asyncio.wait_for(
            self._classify([t for texts in requests for t in texts]), self.graph_timeout_s
        )
        return [StageOutput(part, output.models) for part in split_batch(output.batch, sizes)]

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(self, body: PredictRequest, request: Request) -> Response:
        """Classify 1–64 texts; every answer names the model versions that produced it."""
        try:
            output = await self.coalescer.submit(body.texts)
        except STAGE_ERRORS as e:
            raise ModelUnavailable("the model pipeline is unavailable; retry shortly") from e
        probs = output.batch["probs"]
        predictions = [
            Prediction(
                label=str(label), probabilities=dict(zip(LABELS, map(float, row), strict=True))
            )
            for label, row in zip(output.batch["label"], probs, strict=True)
        ]
        return _json(
            PredictResponse(
                request_id=request_id(request),
                predictions=predictions,
                models=_versions(output.models),
            )
        )

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
    async def embeddings(self, body: EmbeddingsRequest) -> Response:
        """OpenAI-compatible sentence embeddings from the pipeline's encoder (384 dimensions)."""
        if body.model not in (None, self.encoder_name, self.spec.encoder.model_uri):
            raise ModelNotFound(
                f"model {body.model!r} is not served here; use {self.encoder_name!r}"
            )
        if body.dimensions not in (None, 384):
            raise InvalidRequest(
                "dimensions: this encoder only produces 384-dimensional embeddings"
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            tokens = self.stages["Tokenizer"].remote(text_batch(texts))
            output: StageOutput = await asyncio.wait_for(
                self.stages["Encoder"].remote(tokens), self.graph_timeout_s
            )
        except STAGE_ERRORS as e:
            raise ModelUnavailable("the encoder is unavailable; retry shortly") from e
        vectors: np.ndarray = output.batch["embedding"]
        if body.encoding_format == "base64":
            encoded: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            encoded = vectors.tolist()
        tokens_used = int(output.batch["num_tokens"].sum())
        return _json(
            EmbeddingsResponse(
                data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(encoded)],
                model=self.encoder_name,
                usage=EmbeddingsUsage(prompt_tokens=tokens_used, total_tokens=tokens_used),
                models=_versions(output.models),
            )
        )

    async def _describe_all(self) -> list[dict[str, Any]]:
        calls = [handle.describe.remote() for handle in self.stages.values()]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=READY_TIMEOUT_S)

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
    async def models(self) -> ModelsResponse:
        """The registered model behind every stage: name, version and aliases."""
        try:
            described = await self._describe_all()
        except STAGE_ERRORS as e:
            raise ModelUnavailable("could not reach every stage; retry shortly") from e
        return ModelsResponse(
            models=[ModelVersion(**d["model"]) for d in described if d["model"]],
            ensemble_weights=dict(self.spec.ensemble.weights),
        )

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Liveness: the gateway answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses=ERRORS)
    async def readyz(self) -> Health:
        """Readiness: every stage replica has loaded its model and answers."""
        try:
            await self._describe_all()
        except STAGE_ERRORS as e:
            raise NotReady("not every stage is ready") from e
        return Health(status="ready")
