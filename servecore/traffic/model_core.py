"""The traffic core of a generic model application: rows in, a registered MLflow model's outputs
out, with every policy of the intent pipeline's core (:mod:`servecore.traffic.base`): releases
that follow the model's alias (hot swap, rollback, the previous version kept warm), A/B variants
between aliases, a shadow variant, the response cache, a fallback model behind a circuit breaker,
coalescing of concurrent requests into one model call, and sampling to the monitor.

It knows no protocol: the OIP v2 fronts (REST and gRPC) and MLflow's ``/invocations`` front turn
their requests into a batch of rows checked against the model's signature
(:mod:`servecore.signature`), call :meth:`ModelCore.predict` and render the
:class:`Prediction` in their own shape.

The model's signature is read from the registry (no model is loaded in the gateway) for every
version that answers: a new version with other inputs is checked against its own signature from
the moment it is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.serve.context import _set_request_context
from ray.serve.handle import DeploymentHandle

from servecore.errors import ModelNotFound, ModelUnavailable, PipelineTimeout
from servecore.pipeline.batching import Batch, concat_batches, num_rows, split_batch
from servecore.pipeline.model_spec import FALLBACK_STAGE, MODEL_STAGE, ModelAppSpec
from servecore.signature import (
    NUMPY_OF_OIP,
    SCORING_FORMATS,
    ModelSchema,
    batch_from_scoring_json,
    schema_of,
)
from servecore.traffic.base import (
    STAGE_ERRORS,
    ServedModel,
    ServingCore,
)
from servecore.traffic.experiments import VariantStats
from servecore.traffic.releases import Release
from servecore.traffic.routing import StageOutput, deployment_result

logger = logging.getLogger("ray.serve")

ModelRequest = tuple[Batch, str, bool]
"""What the coalescer gathers: one request's rows, its request id, whether the monitor sees it."""


@dataclass
class Prediction:
    """The core's answer to one request, in no protocol's shape."""

    request_id: str
    outputs: Batch
    """Output column → one value (or one row of values) per input row."""
    models: dict[str, dict[str, Any]]
    """Stage → the model version that answered (stage, name, version, uri, aliases)."""
    variant: str
    version: str
    """The registered version that answered (the fallback's when degraded)."""
    degraded_reason: str | None
    cached: int

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None


@dataclass(frozen=True)
class VersionInfo:
    """What the gateway knows of one registered version without loading it."""

    schema: ModelSchema
    example: Batch | None
    """The logged input example as rows (None when the version has none): the warm-up input."""


def load_version_info(pinned_uri: str) -> VersionInfo:
    """The signature and input example of one registered version (reads its ``MLmodel`` file
    and example, loads no model)."""
    from mlflow.models import get_model_info

    from servecore.registry.client import configure_mlflow, registry_failure

    configure_mlflow()
    try:
        info = get_model_info(pinned_uri)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, f"cannot read the model {pinned_uri}") from e
    schema = schema_of(info.signature, pinned_uri)
    return VersionInfo(schema, _input_example(pinned_uri, info, schema))


def _input_example(pinned_uri: str, info: Any, schema: ModelSchema) -> Batch | None:
    """The version's logged input example, checked like a request; None if absent or unusable
    (the warm-up then sends one row of zeros)."""
    saved = getattr(info, "saved_input_example_info", None) or {}
    path = saved.get("artifact_path")
    if not path:
        return None
    try:
        import mlflow.artifacts

        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{pinned_uri}/{path}")
        with open(local, encoding="utf-8") as f:
            example = json.load(f)
        if isinstance(example, dict) and "columns" in example and "data" in example:
            body = {"dataframe_split": example}
        elif isinstance(example, dict) and any(k in example for k in SCORING_FORMATS):
            body = example
        else:
            body = {"inputs": example}
        return batch_from_scoring_json(schema, body)
    except Exception as e:  # noqa: BLE001 - an example is a convenience, never a failure
        logger.info("input example of %s not used: %r", pinned_uri, e)
        return None


def row_keys(batch: Batch, names: tuple[str, ...]) -> list[str]:
    """One cache key per row: a digest of its input values (exact, in signature order)."""
    columns = [batch[name] for name in names if name in batch]
    keys = []
    for i in range(num_rows(batch)):
        values = [_plain(column[i]) for column in columns]
        text = json.dumps(values, separators=(",", ":"), default=str)
        keys.append(hashlib.sha256(text.encode()).hexdigest())
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    return value


class ModelCore(ServingCore[ModelRequest]):
    """See the module docstring."""

    def __init__(
        self,
        spec: ModelAppSpec,
        groups: Mapping[str, DeploymentHandle],
        monitor: DeploymentHandle | None = None,
        app: str = "",
    ) -> None:
        self.spec = spec
        self.app = app
        fallbacks = [FALLBACK_STAGE] if spec.fallback_uri is not None else []
        super().__init__(
            spec, groups, monitor, fallbacks, "the fallback model's stage", standby_stages=fallbacks
        )
        self.model = ServedModel(spec.served_name, "model", MODEL_STAGE, ())
        self._registered = ServedModel(spec.registered_name, "model", MODEL_STAGE, ())
        self._versions: dict[str, VersionInfo] = {}
        """Pinned URI → what the gateway knows of that version."""
        for release in self.releases.values():
            self._versions[self._pin(release)] = load_version_info(self._pin(release))

    # --- schemas -----------------------------------------------------------------------------

    def _pin(self, release: Release, stage: str = MODEL_STAGE) -> str:
        return self._pins_of(release)[stage]

    async def schema(self, variant: str) -> ModelSchema:
        """The signature of the version ``variant`` serves now."""
        if variant not in self.releases:
            raise ModelNotFound(f"no variant {variant!r}; variants: {sorted(self.releases)}")
        return (await self._version_info(self._pin(self.releases[variant]))).schema

    async def _version_info(self, pin: str) -> VersionInfo:
        found = self._versions.get(pin)
        if found is None:
            found = await asyncio.to_thread(load_version_info, pin)
            if len(self._versions) > 64:
                self._versions.clear()
            self._versions[pin] = found
        return found

    async def schema_of_version(self, version: str) -> ModelSchema:
        """The signature of registered ``version`` (:class:`ModelNotFound` if there is none)."""
        pin = (await self.version_pins(self._registered, version))[MODEL_STAGE]
        return (await self._version_info(pin)).schema

    async def _warm_up(self, release: Release) -> None:
        pin = self._pin(release)
        info = await self._version_info(pin)
        batch = info.example if info.example is not None else _zero_row(info.schema)
        for stage in (
            MODEL_STAGE,
            *self.fallback_stages,
        ):  # the fallback loaded before it is needed
            await self._call(stage, batch, release, 6 * self.graph_timeout_s)

    def _request_size(self, request: ModelRequest) -> int:
        return num_rows(request[0])

    # --- calls -------------------------------------------------------------------------------

    async def _call(
        self, stage: str, batch: Batch, release: Release, timeout_s: float, pin: str | None = None
    ) -> StageOutput:
        call = self.groups[stage].remote(
            batch, pins={stage: pin or self._pin(release, stage)}, stages=(stage,)
        )
        output: StageOutput = await deployment_result(call, timeout_s)
        return output

    async def _predict_batch(self, variant: str, requests: list[ModelRequest]) -> list[StageOutput]:
        sizes = [num_rows(rows) for rows, _, _ in requests]
        self._batch_started([rid for _, rid, _ in requests], sum(sizes), "model call")
        batch = concat_batches([rows for rows, _, _ in requests])
        output = await self._call(
            MODEL_STAGE, batch, self.release_of(variant), self.graph_timeout_s
        )
        return [StageOutput(part, output.models) for part in split_batch(output.batch, sizes)]

    async def predict(
        self,
        rows: Batch,
        user_key: str | None,
        use_cache: bool,
        rid: str,
        sample: bool = True,
        variant: str | None = None,
    ) -> Prediction:
        """The model's outputs for ``rows`` (checked against the signature by the front): the
        caller's A/B variant (or ``variant``), the cache, the primary model with its fallback,
        the shadow; a sample goes to the monitor."""
        self._ensure_watcher()
        started = time.perf_counter()
        variant = self._variant_for(user_key, variant)
        try:
            answer = await self._answer(rows, variant, use_cache, rid, started)
        except Exception:
            self._observe_request(variant, "error", started)
            raise
        self._observe_request(
            variant,
            "degraded" if answer.degraded else "ok",
            started,
            answer.cached < num_rows(rows),
        )
        if sample and self._sampled():
            self._sample(rows, answer, started)
        return answer

    async def predict_version(self, rows: Batch, version: str, rid: str) -> Prediction:
        """``rows`` on registered ``version`` (no A/B, cache or fallback: the caller asked for
        exactly this version)."""
        pin = (await self.version_pins(self._registered, version))[MODEL_STAGE]
        variant, release = self.release_for(None)
        _set_request_context(request_id=rid)
        try:
            output = await self._call(MODEL_STAGE, rows, release, self.graph_timeout_s, pin)
        except TimeoutError as e:
            raise PipelineTimeout(
                f"version {version} did not answer within {self.graph_timeout_s:g}s"
            ) from e
        except STAGE_ERRORS as e:
            raise ModelUnavailable(f"version {version} is unavailable; retry shortly") from e
        return Prediction(rid, output.batch, output.models, variant, version, None, 0)

    async def _answer(
        self, rows: Batch, variant: str, use_cache: bool, rid: str, started: float
    ) -> Prediction:
        stats = self.variant_stats.setdefault(variant, VariantStats())
        release = self.release_of(variant)
        n = num_rows(rows)
        keys = [""] * n  # a bypassing caller looks nothing up
        if use_cache:
            schema = (await self._version_info(self._pin(release))).schema
            keys = row_keys(rows, schema.input_names)
        cached = self._cache_lookup(keys, release, use_cache)
        missing = [i for i, hit in enumerate(cached) if hit is None]
        row_outputs: list[dict[str, Any] | None] = [hit.value if hit else None for hit in cached]
        models: dict[str, dict[str, Any]] = next((h.models for h in cached if h), {})
        degraded_reason = None
        if missing:
            asked = {k: v[missing] for k, v in rows.items()} if len(missing) < n else rows
            output, degraded_reason = await self._answer_or_fallback(
                variant,
                (asked, rid, False),
                lambda: self._call(FALLBACK_STAGE, asked, release, self.graph_timeout_s),
                "model",
            )
            models = output.models
            for j, i in enumerate(missing):
                row = {name: column[j] for name, column in output.batch.items()}
                row_outputs[i] = row
                if degraded_reason is None and use_cache:
                    size = 64 + sum(getattr(v, "nbytes", 8) for v in row.values())
                    self.cache.put(keys[i], release.key, "", (), models, value=row, size=size)
        outputs = _columns(row_outputs)
        labels = _labels(outputs)
        took = time.perf_counter() - started
        stats.record(took, labels, degraded=degraded_reason is not None)
        if degraded_reason is None:
            self._maybe_shadow(variant, (rows, rid, False), labels, took)
        stage = FALLBACK_STAGE if degraded_reason is not None else MODEL_STAGE
        version = str((models.get(stage) or {}).get("version", ""))
        return Prediction(rid, outputs, models, variant, version, degraded_reason, n - len(missing))

    # --- shadow and monitoring ---------------------------------------------------------------

    def _labels_of(self, batch: Batch) -> list[str]:
        return _labels(batch)

    def _sample(self, rows: Batch, answer: Prediction, started: float) -> None:
        knobs = self.knobs.monitoring
        n = num_rows(rows)
        if knobs.max_buffered - len(self._samples) < n:
            self.samples_dropped += n
            return
        latency = (time.perf_counter() - started) * 1000.0
        models = {
            info["stage"]: f"{info['name']}/{info['version']}"
            for info in answer.models.values()
            if info.get("stage")
        }
        for i in range(n):
            self._samples.append(
                {
                    "time": time.time(),
                    "app": self.app,
                    "request_id": answer.request_id,
                    "variant": answer.variant,
                    "inputs": {k: _plain(v[i]) for k, v in rows.items()},
                    "outputs": {k: _plain(v[i]) for k, v in answer.outputs.items()},
                    "models": models,
                    "latency_ms": latency,
                    "degraded": answer.degraded,
                }
            )
        self._start_sender()

    # --- views -------------------------------------------------------------------------------

    def served_models(self) -> list[ServedModel]:
        return [self.model]

    def versions(self) -> list[str]:
        """The registered versions the A/B variants serve now."""
        found: list[str] = []
        for release in self.releases.values():
            info = self.stage_version(MODEL_STAGE, release)
            if info is not None and str(info["version"]) not in found:
                found.append(str(info["version"]))
        return found


def _columns(rows: list[dict[str, Any] | None]) -> Batch:
    """Per-row outputs (numpy scalars or arrays, as the model stage returned them) → columns,
    keeping each column's dtype."""
    present = [row for row in rows if row is not None]
    if not present:
        return {}
    out: Batch = {}
    for name in present[0]:
        values = [row[name] for row in present]
        first = values[0]
        if isinstance(first, np.ndarray):
            out[name] = np.stack(values)
        elif isinstance(first, np.generic):
            out[name] = np.asarray(values, dtype=first.dtype)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
    return out


def _labels(outputs: Batch) -> list[str]:
    """The first output column as labels when it holds classes (strings, integers or booleans),
    for the A/B and shadow statistics; none for scores and vectors."""
    if not outputs:
        return []
    column = next(iter(outputs.values()))
    if column.ndim != 1 or column.dtype.kind not in "OUSbiu":
        return []
    return [str(v) for v in column]


def _zero_row(schema: ModelSchema) -> Batch:
    """One row of zeros (empty strings) of the signature's inputs: the warm-up call's input
    when the version logged no input example."""
    batch: Batch = {}
    for spec in schema.inputs:
        shape = [1, *(max(d, 1) for d in spec.shape[1:])] if schema.kind == "tensors" else [1]
        if spec.datatype == "BYTES":
            column = np.empty(shape, dtype=object)
            column.fill(b"" if spec.mlflow_type == "binary" else "")
            batch[spec.name] = column
        else:
            batch[spec.name] = np.zeros(shape, dtype=NUMPY_OF_OIP[spec.datatype])
    return batch
