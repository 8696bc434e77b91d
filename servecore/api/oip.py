"""The Open Inference Protocol (v2) without its transport: the model namespace, metadata, tensor
codecs and one inference call, shared by the REST front (:mod:`servecore.api.v2`) and the gRPC
front (:mod:`servecore.api.v2_grpc`).

Models: the whole pipeline (``intent``: input ``text`` BYTES ``[n]``; outputs ``label`` BYTES
``[n]`` and ``probabilities`` FP32 ``[n, 6]``), its encoder (``intent-encoder``: ``embedding``
FP32 ``[n, 384]``) and every member (``intent-head-linear``…: ``label`` and ``probabilities``),
all served by the stage replicas that already run the pipeline. A version of the pipeline is an A/B
variant (``champion``); a version of the encoder or a member is a registered version, which the
stage replicas load on first use and keep among their ``max_loaded_versions``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servecore import LABELS
from servecore.api.schemas import MAX_TEXT_CHARS, MAX_TEXTS_PER_REQUEST
from servecore.errors import InvalidRequest, ModelNotFound, NotReady, TooManyTexts
from servecore.signature import NUMPY_OF_OIP, RawTensor
from servecore.traffic.core import ServedModel, TrafficCore

SERVER_NAME = "intent-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
PLATFORM = "ray-serve"
INPUT = "text"
EMBEDDING_DIM = 384
LABEL_ORDER = ",".join(LABELS)
"""The columns of ``probabilities``, in order (also the ``labels`` parameter of every answer)."""


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray
    """BYTES tensors hold Python ``bytes``; the others their numeric dtype."""


@dataclass
class InferResult:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    parameters: dict[str, bool | int | str] = field(default_factory=dict)


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def find_model(core: TrafficCore, name: str) -> ServedModel:
    for model in core.served_models():
        if model.name == name:
            return model
    names = [m.name for m in core.served_models()]
    raise ModelNotFound(f"unknown model {name!r}; models: {names}")


def output_specs(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output; -1 is the batch dimension."""
    if model.kind == "encoder":
        return [("embedding", "FP32", [-1, EMBEDDING_DIM])]
    return [("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, len(LABELS)])]


def versions(core: TrafficCore, model: ServedModel) -> list[str]:
    """The pipeline's A/B variants, or the registered versions the variants' releases run."""
    if model.stage is None:
        return list(core.releases)
    found = []
    for release in core.releases.values():
        info = core.stage_version(model.stage, release)
        if info is not None and str(info["version"]) not in found:
            found.append(str(info["version"]))
    return found


async def check_version(core: TrafficCore, model: ServedModel, version: str | None) -> None:
    if version is None:
        return
    if model.stage is None:
        if version not in core.releases:
            raise ModelNotFound(
                f"model {model.name!r} has no version {version!r}; its versions are the A/B "
                f"variants {sorted(core.releases)}"
            )
        return
    await core.version_pins(model, version)


async def metadata(core: TrafficCore, name: str, version: str | None) -> dict[str, Any]:
    model = find_model(core, name)
    await check_version(core, model, version)
    return {
        "name": model.name,
        "versions": [version] if version else versions(core, model),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": n, "datatype": d, "shape": s, **_output_parameters(n)}
            for n, d, s in output_specs(model)
        ],
    }


def _output_parameters(name: str) -> dict[str, Any]:
    return {"parameters": {"labels": LABEL_ORDER}} if name == "probabilities" else {}


def texts_of(name: str, datatype: str, shape: list[int], values: list[Any]) -> list[str]:
    """The request's texts from its one input, checked as ``/v1/predict`` checks them."""
    if name != INPUT:
        raise InvalidRequest(f"unexpected input {name!r}: the only input is {INPUT!r}")
    if datatype != "BYTES":
        raise InvalidRequest(f"input {INPUT!r} must have datatype BYTES, not {datatype!r}")
    count = int(np.prod(shape)) if shape else 0
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidRequest(f"input {INPUT!r} must have shape [n] (or [n, 1]), not {shape}")
    if count != len(values):
        raise InvalidRequest(
            f"input {INPUT!r}: shape {shape} holds {count} elements, the data {len(values)}"
        )
    if count == 0:
        raise InvalidRequest(f"input {INPUT!r} holds no texts")
    if count > MAX_TEXTS_PER_REQUEST:
        raise TooManyTexts(
            f"input {INPUT!r}: {count} texts, at most {MAX_TEXTS_PER_REQUEST} per request"
        )
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidRequest(f"input {INPUT!r}[{i}] is not UTF-8 text") from e
        if not isinstance(value, str):
            raise InvalidRequest(f"input {INPUT!r}[{i}] must be a string")
        if not value.strip():
            raise InvalidRequest(f"input {INPUT!r}[{i}]: text must not be blank")
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidRequest(
                f"input {INPUT!r}[{i}]: at most {MAX_TEXT_CHARS} characters, got {len(value)}"
            )
        texts.append(value)
    return texts


def decode_bytes(raw: bytes) -> list[bytes]:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest("BYTES tensor data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequest("BYTES tensor data ends inside an element")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def encode_bytes(items: Any) -> bytes:
    parts = []
    for item in items:
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def raw_of(tensor: Tensor) -> bytes:
    """A tensor's binary form (BYTES length-prefixed, numbers little-endian row-major)."""
    if tensor.datatype == "BYTES":
        return encode_bytes(tensor.value.reshape(-1))
    dtype = np.dtype(NUMPY_OF_OIP[tensor.datatype]).newbyteorder("<")
    return np.ascontiguousarray(tensor.value, dtype=dtype).tobytes()


def json_values(tensor: Tensor) -> list[Any]:
    """A tensor's values for a JSON body, row-major (BYTES as UTF-8 text)."""
    flat = tensor.value.reshape(-1)
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in flat]
    if tensor.datatype == "FP32":
        return np.asarray(flat, dtype=np.float32).tolist()
    return [v.item() if isinstance(v, np.generic) else v for v in flat]


class IntentBackend:
    """The intent pipeline's models behind the OIP fronts (the functions above, on one core)."""

    def __init__(self, core: TrafficCore) -> None:
        self.core = core

    @property
    def sticky_header(self) -> str:
        return self.core.sticky_header

    async def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        return await metadata(self.core, name, version)

    async def model_ready(self, name: str, version: str | None) -> bool:
        model = find_model(self.core, name)
        await check_version(self.core, model, version)
        return await _ready(self.core)

    async def server_ready(self) -> bool:
        return await _ready(self.core)

    async def repository_index(self) -> list[dict[str, Any]]:
        return await repository_index(self.core)

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
        if len(tensors) != 1:
            raise InvalidRequest(f"expected one input, {INPUT!r}; got {len(tensors)}")
        tensor = tensors[0]
        values = tensor.values if tensor.values is not None else []
        texts = texts_of(tensor.name, tensor.datatype, tensor.shape, values)
        return await infer(self.core, name, version, texts, wanted, request_id, user_key, use_cache)


async def _ready(core: Any) -> bool:
    try:
        await core.check_ready()
    except NotReady:
        return False
    return True


def backend(core: Any) -> Any:
    """The OIP backend of a gateway's core: :class:`IntentBackend` for the intent pipeline,
    :class:`servecore.api.oip_model.ModelBackend` for a generic model application."""
    if isinstance(core, TrafficCore):
        return IntentBackend(core)
    from servecore.api.oip_model import ModelBackend

    return ModelBackend(core)


async def infer(
    core: TrafficCore,
    name: str,
    version: str | None,
    texts: list[str],
    wanted: list[str] | None,
    request_id: str,
    user_key: str | None = None,
    use_cache: bool = True,
) -> InferResult:
    """Run ``texts`` through model ``name`` (``version`` pinned when given) and return the
    outputs ``wanted`` (all when None; an unknown one is refused before anything runs)."""
    model = find_model(core, name)
    names = [n for n, _, _ in output_specs(model)]
    for wish in wanted or ():
        if wish not in names:
            raise InvalidRequest(f"model {name!r} has no output {wish!r}; outputs: {names}")
    n = len(texts)
    if model.stage is None:
        await check_version(core, model, version)
        answer = await core.classify(
            texts, user_key, use_cache, request_id, sample=True, variant=version
        )
        labels = np.asarray([label.encode() for label in answer.labels], dtype=object)
        probs = np.asarray(answer.probabilities, dtype=np.float32).reshape(n, len(LABELS))
        served_version = answer.variant
        parameters: dict[str, bool | int | str] = {
            "variant": answer.variant,
            "degraded": answer.degraded,
            "cached": answer.cached,
            "models": _models(answer.models),
        }
        columns = {"label": labels, "probabilities": probs}
    else:
        variant, release = core.release_for(user_key)
        pins = await core.version_pins(model, version) if version else None
        output = await core.run(model.columns, texts, release, pins, what=f"model {name!r}")
        info = output.models.get(model.stage) or core.stage_version(model.stage, release) or {}
        served_version = str(version or info.get("version", ""))
        parameters = {"variant": variant, "models": _models(output.models)}
        if model.kind == "encoder":
            columns = {"embedding": np.asarray(output.batch["embedding"], dtype=np.float32)}
        else:
            probs = np.asarray(output.batch[model.columns[0]], dtype=np.float32)
            labels = np.asarray([LABELS[i].encode() for i in probs.argmax(axis=1)], dtype=object)
            columns = {"label": labels, "probabilities": probs}
    if "probabilities" in columns:
        parameters["labels"] = LABEL_ORDER
    outputs = [
        Tensor(out, datatype, [n, *shape[1:]], columns[out])
        for out, datatype, shape in output_specs(model)
        if wanted is None or out in wanted
    ]
    return InferResult(name, served_version, outputs, parameters)


def _models(models: dict[str, dict[str, Any]]) -> str:
    """``Stage=name/version`` of every model that answered, comma-separated (OIP parameters are
    scalars)."""
    return ",".join(
        f"{stage}={info.get('name')}/{info.get('version')}" for stage, info in models.items()
    )


async def repository_index(core: TrafficCore) -> list[dict[str, Any]]:
    """Every model with each version the stage replicas hold: ``READY`` when loaded, else
    ``UNAVAILABLE`` with the reason (Triton's repository index)."""
    try:
        groups = await core.describe_groups()
        error = None
    except Exception as e:  # noqa: BLE001 - the index still lists the models, as unavailable
        groups, error = [], f"the stage replicas do not answer ({type(e).__name__})"
    loaded: dict[str, set[str]] = {}
    for group in groups:
        for stage in group.get("stages", ()):
            loaded.setdefault(stage["stage"], set()).update(
                uri.rsplit("/", 1)[-1] for uri in stage.get("loaded_versions", ())
            )
            model = stage.get("model") or {}
            if model.get("version") is not None:
                loaded[stage["stage"]].add(str(model["version"]))
    entries = []
    for model in core.served_models():
        if model.stage is None:
            for variant in versions(core, model):
                ready = error is None
                entries.append(_entry(model.name, variant, ready, error))
            continue
        held = loaded.get(model.stage, set())
        for version in sorted(held | set(versions(core, model)), key=version_key):
            ready = version in held
            reason = error or (None if ready else "not loaded: loads on first use")
            entries.append(_entry(model.name, version, ready, reason))
    return entries


def _entry(name: str, version: str, ready: bool, reason: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "version": version}
    entry["state"] = "READY" if ready else "UNAVAILABLE"
    if reason and not ready:
        entry["reason"] = reason
    return entry


def version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 30, version)
