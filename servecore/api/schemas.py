"""HTTP request and response bodies, with their bounds (the gateway's OpenAPI comes from these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

MAX_TEXTS_PER_REQUEST = 64
MAX_TEXT_CHARS = 2000


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be blank")
    return text


Text = Annotated[
    StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["I was charged twice for my order"]}]},
    )

    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS_PER_REQUEST)
    """Customer messages to classify, 1 to 64, each 1 to 2000 characters."""


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ModelVersion(BaseModel):
    stage: str
    """Deployment that ran this model."""
    name: str
    """Registered model name."""
    version: str
    uri: str
    """The reference the stage was configured with (an alias or a fixed version)."""
    aliases: list[str] = []


class PredictResponse(BaseModel):
    request_id: str
    predictions: list[Prediction]
    models: list[ModelVersion]
    variant: str = "champion"
    """The A/B variant that answered (see ``GET /v1/experiments``)."""
    degraded: bool = False
    """True when the backup model answered because the primary pipeline failed or was late."""
    degraded_reason: str | None = None
    cached: int = 0
    """How many of the predictions came from the response cache."""


class EmbeddingsRequest(BaseModel):
    """OpenAI-compatible embeddings request; unknown fields are ignored as OpenAI clients expect."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"input": ["where is my parcel?"], "model": "intent-encoder"}]
        }
    )

    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS_PER_REQUEST)]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: StrictStr | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingsUsage
    models: list[ModelVersion]


class ModelsResponse(BaseModel):
    models: list[ModelVersion]
    ensemble_weights: dict[str, float] = {}
    """The intent pipeline's soft-vote weights (empty for a generic model application)."""
    release: str
    """The exact versions being served, ``name/version`` joined by commas."""
    previous_release: str | None = None
    release_swaps: int = 0
    """Releases switched to since this gateway replica started."""
    release_error: str | None = None
    """Why the last registry poll or release warm-up failed, if it did (the old release stays)."""
    variants: dict[str, str] = {}
    """Release of every A/B variant, by variant name."""


class ExperimentsResponse(BaseModel):
    """``GET /v1/experiments``: traffic split, per-variant counters, shadow, fallback, cache."""

    sticky_header: str
    variants: list[dict[str, Any]]
    shadow: dict[str, Any]
    fallback: dict[str, Any]
    cache: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok", "ready"]


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


MAX_JOB_TEXTS = 10_000
"""Hard ceiling of texts in one job; the gateway's ``jobs.max_texts`` knob may lower it."""


class DatasetInput(BaseModel):
    """A dataset for a batch job: a file or glob under the server's jobs data folder."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024)
    """Parquet, CSV or JSON lines, relative to the jobs data folder (absolute paths must lie
    inside it)."""
    text_column: str = Field(default="text", min_length=1, max_length=200)
    id_column: str = Field(default="id", min_length=1, max_length=200)


class JobRequest(BaseModel):
    """Either ``texts`` (scored by the online pipeline graph) or ``dataset`` (scored by the Ray
    Data batch pipeline), with an optional completion webhook."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # What the validator below enforces, stated in the schema for clients and fuzzers.
            "oneOf": [{"required": ["texts"]}, {"required": ["dataset"]}],
            "examples": [
                {"texts": ["I was charged twice", "where is my parcel?"]},
                {"dataset": {"path": "tickets.parquet"}, "callback_url": "https://example.com/h"},
            ],
        },
    )

    # Absent means "not given"; an explicit null is refused, as the schema says (no null type).
    texts: list[Text] = Field(None, min_length=1, max_length=MAX_JOB_TEXTS)  # type: ignore[arg-type]
    dataset: DatasetInput = None  # type: ignore[assignment]
    callback_url: str = Field(None, min_length=1, max_length=2048)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _exactly_one_input(self) -> JobRequest:
        if (self.texts is None) == (self.dataset is None):
            raise ValueError("send exactly one of texts or dataset")
        return self


class JobList(BaseModel):
    jobs: list[dict[str, Any]]
    """Newest first, without results (fetch one job for its result)."""
    next_cursor: str | None
    """Pass as ``after`` for the next page; null on the last page."""


_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$"
"""A registry alias as this project allows it (``servecore.registry.models`` refuses others too)."""


class PromoteRequest(BaseModel):
    """``POST /v1/admin/promote``: registered model name → version, moved together."""

    model_config = ConfigDict(extra="forbid")

    versions: dict[
        Annotated[str, Field(pattern=_MODEL_NAME)], Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
    ] = Field(min_length=1, max_length=32)
    alias: str = Field(default="champion", pattern=ALIAS_PATTERN)


class RollbackRequest(BaseModel):
    """``POST /v1/admin/rollback``: models whose alias goes back one step."""

    model_config = ConfigDict(extra="forbid")

    models: list[Annotated[str, Field(pattern=_MODEL_NAME)]] = Field(min_length=1, max_length=32)
    alias: str = Field(default="champion", pattern=ALIAS_PATTERN)


class StartRolloutRequest(BaseModel):
    """``POST /v1/rollouts``: the candidate's versions, and optionally the steps and gates
    (defaults: README, "Progressive delivery")."""

    model_config = ConfigDict(extra="forbid")

    candidate: dict[
        Annotated[str, Field(pattern=_MODEL_NAME)], Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]
    ] = Field(min_length=1, max_length=16)
    steps: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=20)
    gates: dict[str, Any] | None = None
    note: str = Field(default="", max_length=500)


class RolloutActionRequest(BaseModel):
    """``POST /v1/rollouts/{id}/{action}``: why (kept in the decision)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: the true label of one text of an answered request."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"request_id": "3f2a...", "label": "refund"}]},
    )

    request_id: str = Field(min_length=1, max_length=100)
    label: str = Field(min_length=1, max_length=100)
    position: int = Field(default=0, ge=0, le=10_000)
    """Which text of the request (0 for a one-text request)."""
