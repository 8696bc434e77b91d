"""OpenAI-compatible embeddings: ``POST /v1/embeddings`` from the pipeline's encoder."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from servecore.api.common import ERRORS, json_response
from servecore.api.context import services
from servecore.api.schemas import (
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
)
from servecore.api.v1 import versions
from servecore.errors import InvalidRequest, ModelNotFound
from servecore.pipeline.graph import EMBEDDING

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    """OpenAI-compatible sentence embeddings from the pipeline's encoder (384 dimensions)."""
    core = services().core
    if body.model not in (None, core.encoder_name, core.spec.encoder.model_uri):
        raise ModelNotFound(f"model {body.model!r} is not served here; use {core.encoder_name!r}")
    if body.dimensions not in (None, 384):
        raise InvalidRequest("dimensions: this encoder only produces 384-dimensional embeddings")
    texts = [body.input] if isinstance(body.input, str) else body.input
    _, release = core.release_for(request.headers.get(core.sticky_header))
    output = await core.run(EMBEDDING, texts, release, what="the encoder")
    vectors: np.ndarray = output.batch["embedding"]
    if body.encoding_format == "base64":
        encoded: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = vectors.tolist()
    tokens_used = int(output.batch["num_tokens"].sum())
    return json_response(
        EmbeddingsResponse(
            data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(encoded)],
            model=core.encoder_name,
            usage=EmbeddingsUsage(prompt_tokens=tokens_used, total_tokens=tokens_used),
            models=versions(output.models),
        )
    )
