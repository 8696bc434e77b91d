"""The Open Inference Protocol for a generic model application (``graphs/model.py``): one model,
named in the spec (default: its registered name), with the inputs and outputs of its MLflow
signature (:mod:`servecore.signature`). Its versions are registered versions: the one each A/B
variant serves answers ``/v2/models/<name>/infer``; ``…/versions/<v>/infer`` runs exactly
version ``v`` (loaded by the model stage on first use).

Shared by the REST front (:mod:`servecore.api.v2`) and the gRPC front
(:mod:`servecore.api.v2_grpc`) through :func:`servecore.api.oip.backend`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servecore.api.oip import PLATFORM, InferResult, Tensor, version_key
from servecore.errors import InvalidRequest, ModelNotFound, NotReady
from servecore.signature import (
    RawTensor,
    batch_from_tensors,
    named_outputs,
    oip_datatype_of_dtype,
)
from servecore.traffic.model_core import ModelCore, Prediction


def output_tensors(outputs: dict[str, np.ndarray]) -> list[Tensor]:
    """A prediction's columns as OIP tensors (strings and objects as UTF-8 ``BYTES``)."""
    tensors = []
    for name, column in outputs.items():
        datatype = oip_datatype_of_dtype(column.dtype)
        value = column
        if datatype == "BYTES":
            value = np.empty(column.shape, dtype=object)
            value.reshape(-1)[:] = [_bytes(v) for v in column.reshape(-1)]
        tensors.append(Tensor(name, datatype, list(column.shape), value))
    return tensors


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def prediction_parameters(answer: Prediction) -> dict[str, bool | int | str]:
    return {
        "variant": answer.variant,
        "degraded": answer.degraded,
        "cached": answer.cached,
        "models": ",".join(
            f"{stage}={info.get('name')}/{info.get('version')}"
            for stage, info in answer.models.items()
        ),
    }


class ModelBackend:
    """A :class:`~servecore.traffic.model_core.ModelCore` behind the OIP fronts."""

    def __init__(self, core: ModelCore) -> None:
        self.core = core

    @property
    def sticky_header(self) -> str:
        return self.core.sticky_header

    def _check_name(self, name: str) -> None:
        if name != self.core.model.name:
            raise ModelNotFound(f"unknown model {name!r}; models: {[self.core.model.name]}")

    async def _schema(self, version: str | None, user_key: str | None = None) -> Any:
        if version is not None:
            return await self.core.schema_of_version(version)
        return await self.core.schema(self.core.knobs.experiment.assign(user_key))

    async def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        self._check_name(name)
        schema = await self._schema(version)
        return {
            "name": name,
            "versions": [version] if version else self.core.versions(),
            "platform": PLATFORM,
            "inputs": [spec.to_dict() for spec in schema.inputs],
            "outputs": [spec.to_dict() for spec in schema.outputs],
        }

    async def model_ready(self, name: str, version: str | None) -> bool:
        self._check_name(name)
        if version is not None:
            await self.core.schema_of_version(version)
        return await self.server_ready()

    async def server_ready(self) -> bool:
        try:
            await self.core.check_ready()
        except NotReady:
            return False
        return True

    async def repository_index(self) -> list[dict[str, Any]]:
        try:
            groups = await self.core.describe_groups()
            error = None
        except Exception as e:  # noqa: BLE001 - the index still lists the versions, unavailable
            groups, error = [], f"the model replicas do not answer ({type(e).__name__})"
        held: set[str] = set()
        for group in groups:
            for stage in group.get("stages", ()):
                if stage.get("stage") != "Model":
                    continue
                held.update(uri.rsplit("/", 1)[-1] for uri in stage.get("loaded_versions", ()))
                if (stage.get("model") or {}).get("version") is not None:
                    held.add(str(stage["model"]["version"]))
        entries = []
        for version in sorted(held | set(self.core.versions()), key=version_key):
            ready = error is None and version in held
            entry: dict[str, Any] = {"name": self.core.model.name, "version": version}
            entry["state"] = "READY" if ready else "UNAVAILABLE"
            if not ready:
                entry["reason"] = error or "not loaded: loads on first use"
            entries.append(entry)
        return entries

    async def infer(
        self,
        name: str,
        version: str | None,
        tensors: list[RawTensor],
        wanted: list[str] | None,
        request_id: str,
        user_key: str | None = None,
        use_cache: bool = True,
    ) -> InferResult:
        self._check_name(name)
        core = self.core
        variant = core.knobs.experiment.assign(user_key)
        schema = await (
            core.schema_of_version(version) if version is not None else core.schema(variant)
        )
        declared = [spec.name for spec in schema.outputs]
        for wish in wanted or ():
            if declared and wish not in declared:
                raise InvalidRequest(f"model {name!r} has no output {wish!r}; outputs: {declared}")
        rows = batch_from_tensors(schema, tensors)
        if version is not None:
            answer = await core.predict_version(rows, version, request_id)
        else:
            answer = await core.predict(rows, user_key, use_cache, request_id, variant=variant)
        outputs = output_tensors(named_outputs(answer.outputs, schema))
        if wanted is not None:
            names = [t.name for t in outputs]
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise InvalidRequest(
                    f"model {name!r} has no output {unknown[0]!r}; outputs: {names}"
                )
            outputs = [t for t in outputs if t.name in wanted]
        return InferResult(name, answer.version, outputs, prediction_parameters(answer))
