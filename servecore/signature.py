"""A served model's inputs and outputs, read from its MLflow signature, and the checks and
conversions every protocol front applies to a request before anything runs.

:class:`ModelSchema` is plain data (no MLflow import): :func:`schema_of` builds it from an
``mlflow.models.ModelSignature``. Two kinds of signature, as MLflow has them:

* **columns** (a DataFrame: ``ColSpec`` name + type per column): each column is one OIP input of
  shape ``[n]``; MLflow's scoring JSON gives it as a DataFrame (``dataframe_split``,
  ``dataframe_records``) or as records / a dict of columns (``instances``, ``inputs``).
* **tensors** (``TensorSpec`` dtype + shape): each tensor is one OIP input of its declared shape,
  the first dimension the rows; an unnamed single tensor is called ``input``.

Whatever the protocol, a request becomes one :data:`~servecore.pipeline.batching.Batch` (column
name → array, rows on axis 0) that the model stage (``deployments/pyfunc_model.py``) turns back
into what ``pyfunc.predict`` takes. Every refusal is an :class:`~servecore.errors.InvalidRequest`
naming the field, so a front answers 4xx in its own shape, never 500.

Types: MLflow ``double``/``float`` are OIP ``FP64``/``FP32``, ``long``/``integer`` ``INT64``/
``INT32``, ``boolean`` ``BOOL``, ``string``/``binary``/``datetime`` ``BYTES``. A numeric input may
come as a numeric datatype numpy casts to it safely (``INT32`` or ``INT64`` for a
``double`` column, ``FP32`` for ``FP64``), as numpy's safe casting and MLflow's own schema
enforcement allow.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from servecore.errors import InvalidRequest

Kind = Literal["columns", "tensors"]
MAX_ROWS_PER_REQUEST = 4096
PREDICTIONS = "predictions"
"""The name of a model's output when its signature does not name it (MLflow's scoring server
answers ``{"predictions": ...}``)."""

_OIP_OF_MLFLOW = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}
NUMPY_OF_OIP = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_LOSSLESS = {
    # INT64 as numpy (and MLflow's schema enforcement) allow it: exact up to 2**53
    "FP64": {"FP32", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"},
    "FP32": {"FP16", "INT8", "INT16", "UINT8", "UINT16"},
    "INT64": {"INT8", "INT16", "INT32", "UINT8", "UINT16", "UINT32"},
    "INT32": {"INT8", "INT16", "UINT8", "UINT16"},
}
"""Datatypes a request may send for an input declared as the key (no value changes)."""


def oip_datatype_of_dtype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (strings, bytes and objects are ``BYTES``)."""
    for name, numpy_type in NUMPY_OF_OIP.items():
        if dtype == np.dtype(numpy_type):
            return name
    return "BYTES"


@dataclass(frozen=True)
class FieldSpec:
    """One input or output: its name, OIP datatype and shape (``-1``: any size; the first
    dimension is the rows), and for columns the MLflow type."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    mlflow_type: str
    required: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSchema:
    kind: Kind
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    """Empty when the signature declares none: the answer then carries whatever the model
    returns, named ``predictions`` when unnamed."""
    unnamed_input: bool = False
    """A tensor signature with one unnamed tensor: ``predict`` takes the bare array."""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.inputs)

    def field(self, name: str) -> FieldSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "inputs": [
                {**f.to_dict(), "mlflow_type": f.mlflow_type, "required": f.required}
                for f in self.inputs
            ],
            "outputs": [{**f.to_dict(), "mlflow_type": f.mlflow_type} for f in self.outputs],
            "unnamed_input": self.unnamed_input,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSchema:
        def fields(items: Sequence[Mapping[str, Any]]) -> tuple[FieldSpec, ...]:
            return tuple(
                FieldSpec(
                    name=item["name"],
                    datatype=item["datatype"],
                    shape=tuple(item["shape"]),
                    mlflow_type=item["mlflow_type"],
                    required=item.get("required", True),
                )
                for item in items
            )

        return cls(
            kind=data["kind"],
            inputs=fields(data["inputs"]),
            outputs=fields(data["outputs"]),
            unnamed_input=bool(data.get("unnamed_input", False)),
        )


class NoSignature(ValueError):
    """The model was logged without a signature: nothing says what it takes."""


def schema_of(signature: Any, model: str = "the model") -> ModelSchema:
    """The :class:`ModelSchema` of an ``mlflow.models.ModelSignature`` (:class:`NoSignature`
    when it has none)."""
    if signature is None or signature.inputs is None:
        raise NoSignature(
            f"{model} has no MLflow signature, so its inputs cannot be checked or described: "
            "log it with signature=mlflow.models.infer_signature(X, model.predict(X))"
        )
    tensors = bool(signature.inputs.is_tensor_spec())
    inputs = _fields(signature.inputs, tensors, "input")
    outputs: tuple[FieldSpec, ...] = ()
    if signature.outputs is not None:
        outputs = _fields(signature.outputs, bool(signature.outputs.is_tensor_spec()), PREDICTIONS)
    unnamed = (
        tensors and len(signature.inputs.inputs) == 1 and not signature.inputs.has_input_names()
    )
    return ModelSchema("tensors" if tensors else "columns", inputs, outputs, unnamed)


def _fields(schema: Any, tensors: bool, default_name: str) -> tuple[FieldSpec, ...]:
    specs = list(schema.inputs)
    found = []
    for i, spec in enumerate(specs):
        name = spec.name or (default_name if len(specs) == 1 else f"{default_name}-{i}")
        required = bool(getattr(spec, "required", True))
        if tensors:
            dtype = np.dtype(spec.type)
            shape = tuple(int(d) for d in spec.shape) or (-1,)
            found.append(FieldSpec(name, oip_datatype_of_dtype(dtype), shape, dtype.name, required))
        else:
            kind = spec.type.name if hasattr(spec.type, "name") else str(spec.type)
            if kind not in _OIP_OF_MLFLOW:
                raise NoSignature(
                    f"column {name!r} has MLflow type {kind!r}, which this server cannot take "
                    "(supported: " + ", ".join(_OIP_OF_MLFLOW) + ")"
                )
            found.append(FieldSpec(name, _OIP_OF_MLFLOW[kind], (-1,), kind, required))
    return tuple(found)


def named_outputs(outputs: Mapping[str, np.ndarray], schema: ModelSchema) -> dict[str, Any]:
    """A model's outputs with the signature's names: an array answer (one column named
    :data:`PREDICTIONS`, which is what MLflow's scoring server answers as a list) takes the name
    of the signature's one output when it has one."""
    if list(outputs) == [PREDICTIONS] and len(schema.outputs) == 1:
        return {schema.outputs[0].name: outputs[PREDICTIONS]}
    return dict(outputs)


# --- requests: OIP tensors -------------------------------------------------------------------


@dataclass
class RawTensor:
    """One input tensor as a front decoded it: the values in row-major order (``bytes`` or
    ``str`` for BYTES; numbers otherwise), or raw little-endian bytes for a numeric tensor sent
    as binary data."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any] | None = None
    raw: bytes | None = None


def batch_from_tensors(schema: ModelSchema, tensors: Sequence[RawTensor]) -> dict[str, np.ndarray]:
    """The rows of an OIP inference request, checked against ``schema``."""
    given: dict[str, RawTensor] = {}
    for tensor in tensors:
        if schema.field(tensor.name) is None:
            raise InvalidRequest(
                f"unexpected input {tensor.name!r}; the model's inputs: {_names(schema)}"
            )
        if tensor.name in given:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        given[tensor.name] = tensor
    batch: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for spec in schema.inputs:
        found = given.get(spec.name)
        if found is None:
            if spec.required:
                raise InvalidRequest(
                    f"input {spec.name!r} is missing; the model's inputs: {_names(schema)}"
                )
            continue
        array = _tensor_array(spec, found, schema.kind)
        rows[spec.name] = len(array)
        batch[spec.name] = array
    _same_rows(rows)
    return batch


def _names(schema: ModelSchema) -> str:
    names = list(schema.input_names)
    shown = ", ".join(names[:8])
    return shown + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


def _same_rows(rows: Mapping[str, int]) -> None:
    if not rows:
        raise InvalidRequest("the request has no inputs")
    counts = sorted(set(rows.values()))
    if len(counts) > 1:
        first = next(iter(rows))
        other = next(name for name, n in rows.items() if n != rows[first])
        raise InvalidRequest(
            f"inputs disagree on the number of rows: {first!r} has {rows[first]}, "
            f"{other!r} has {rows[other]}"
        )
    if counts[0] == 0:
        raise InvalidRequest("the request holds no rows")
    if counts[0] > MAX_ROWS_PER_REQUEST:
        raise InvalidRequest(
            f"{counts[0]} rows in one request; at most {MAX_ROWS_PER_REQUEST} per request"
        )


def _tensor_array(spec: FieldSpec, tensor: RawTensor, kind: Kind) -> np.ndarray:
    name, datatype = spec.name, tensor.datatype
    if datatype != spec.datatype and datatype not in _LOSSLESS.get(spec.datatype, ()):
        raise InvalidRequest(
            f"input {name!r} has datatype {datatype}; the model expects {spec.datatype}"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {name!r}: shape {shape} has a negative dimension")
    if kind == "columns":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidRequest(
                f"input {name!r} has shape {shape}; a column takes shape [n] (or [n, 1])"
            )
    elif len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], shape[1:], strict=False)
    ):
        raise InvalidRequest(
            f"input {name!r} has shape {shape}; the model expects {list(spec.shape)}"
        )
    count = math.prod(shape)
    values: Any
    if tensor.raw is not None:
        if datatype == "BYTES":
            raise InvalidRequest(f"input {name!r}: BYTES data must be decoded by the front")
        width = np.dtype(NUMPY_OF_OIP[datatype]).itemsize
        if len(tensor.raw) != count * width:
            raise InvalidRequest(
                f"input {name!r}: {len(tensor.raw)} bytes of {datatype} data for shape {shape} "
                f"(expected {count * width})"
            )
        values = np.frombuffer(tensor.raw, dtype=np.dtype(NUMPY_OF_OIP[datatype]).newbyteorder("<"))
    else:
        values = tensor.values if tensor.values is not None else []
        if len(values) != count:
            raise InvalidRequest(
                f"input {name!r}: shape {shape} holds {count} elements, the data {len(values)}"
            )
    rows = shape[0] if shape else 0
    if datatype == "BYTES":
        column = _bytes_column(spec, values, f"input {name!r}")
        return column.reshape([rows, *shape[1:]]) if kind == "tensors" else column
    array = _numeric(spec, datatype, values, f"input {name!r}")
    target = np.dtype(NUMPY_OF_OIP[spec.datatype])
    array = array.astype(target, copy=False)
    return array.reshape([rows, *shape[1:]]) if kind == "tensors" else array.reshape(rows)


def _numeric(spec: FieldSpec, datatype: str, values: Any, where: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    numpy_type = np.dtype(NUMPY_OF_OIP[datatype])
    checked = []
    for i, value in enumerate(values):
        checked.append(_number(value, numpy_type, spec, f"{where}[{i}]"))
    return np.asarray(checked, dtype=numpy_type)


def _number(value: Any, numpy_type: np.dtype[Any], spec: FieldSpec, where: str) -> Any:
    if value is None:
        if spec.required:
            raise InvalidRequest(f"{where}: missing value (the input is required)")
        if numpy_type.kind != "f":
            raise InvalidRequest(f"{where}: missing value in a non-float input")
        return math.nan
    if numpy_type.kind == "b":
        if not isinstance(value, bool):
            raise InvalidRequest(f"{where}: {value!r} is not a boolean")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(
            f"{where}: {value!r} is not a number (the model expects {spec.mlflow_type})"
        )
    if numpy_type.kind in "iu":
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(f"{where}: {value!r} is not an integer")
        info = np.iinfo(numpy_type)
        if not info.min <= int(value) <= info.max:
            raise InvalidRequest(f"{where}: {value!r} is out of range for {numpy_type.name}")
        return int(value)
    if isinstance(value, float) and not math.isfinite(value) and spec.required:
        raise InvalidRequest(f"{where}: {value!r} is not a finite number")
    return value


def _bytes_column(spec: FieldSpec, values: Sequence[Any], where: str) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = _text_value(spec, value, f"{where}[{i}]")
    return out


def _text_value(spec: FieldSpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.required:
            raise InvalidRequest(f"{where}: missing value (the input is required)")
        return None
    if spec.mlflow_type == "binary":
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except binascii.Error as e:
                raise InvalidRequest(f"{where}: binary values are base64 text") from e
        raise InvalidRequest(f"{where}: {value!r} is not base64 text")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{where} is not UTF-8 text") from e
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{where}: {value!r} is not a string (the model expects {spec.mlflow_type})"
        )
    if spec.mlflow_type == "datetime":
        try:
            return np.datetime64(value)
        except ValueError as e:
            raise InvalidRequest(f"{where}: {value!r} is not an ISO 8601 date-time") from e
    return value


# --- requests: MLflow's scoring JSON ---------------------------------------------------------

SCORING_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def batch_from_scoring_json(schema: ModelSchema, body: Any) -> dict[str, np.ndarray]:
    """The rows of a ``POST /invocations`` body (MLflow's scoring JSON), checked against
    ``schema``: ``dataframe_split`` (``columns`` + ``data``), ``dataframe_records`` (a list of
    rows), ``instances`` or ``inputs`` (rows, a dict of columns, or for a tensor model the
    tensor(s) themselves)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with one of " + _formats())
    present = [key for key in SCORING_FORMATS if key in body]
    if len(present) != 1:
        found = "none" if not present else ", ".join(present)
        raise InvalidRequest(f"the body must have exactly one of {_formats()}; found {found}")
    unknown = sorted(set(body) - {present[0], "params"})
    if unknown:
        raise InvalidRequest(f"unexpected field(s) {unknown} beside {present[0]!r}")
    key, payload = present[0], body[present[0]]
    if schema.kind == "tensors":
        return batch_from_tensors(schema, _tensor_payload(schema, key, payload))
    if key == "dataframe_split":
        columns = _split_payload(payload)
    elif key == "dataframe_records" or isinstance(payload, list):
        columns = _records_payload(key, payload)
    elif isinstance(payload, dict):
        columns = {str(k): v for k, v in payload.items()}
        for name, values in columns.items():
            if not isinstance(values, list):
                raise InvalidRequest(f"{key}: column {name!r} must be a list of values")
    else:
        raise InvalidRequest(f"{key} must be a list of rows or an object of columns")
    return _columns_batch(schema, columns, key)


def _formats() -> str:
    return ", ".join(SCORING_FORMATS)


def _split_payload(payload: Any) -> dict[str, list[Any]]:
    if not isinstance(payload, dict):
        raise InvalidRequest("dataframe_split must be an object with columns and data")
    unknown = sorted(set(payload) - {"columns", "data", "index"})
    if unknown:
        raise InvalidRequest(f"dataframe_split: unexpected field(s) {unknown}")
    columns, data = payload.get("columns"), payload.get("data")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise InvalidRequest("dataframe_split.columns must be a list of column names")
    if len(set(columns)) != len(columns):
        raise InvalidRequest("dataframe_split.columns names a column twice")
    if not isinstance(data, list):
        raise InvalidRequest("dataframe_split.data must be a list of rows")
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for i, row in enumerate(data):
        if not isinstance(row, list):
            raise InvalidRequest(
                f"dataframe_split.data[{i}] must be a list of {len(columns)} values"
            )
        if len(row) != len(columns):
            raise InvalidRequest(
                f"dataframe_split.data[{i}] has {len(row)} values for {len(columns)} columns"
            )
        for column, value in zip(columns, row, strict=True):
            out[column].append(value)
    return out


def _records_payload(key: str, payload: Any) -> dict[str, list[Any]]:
    if not isinstance(payload, list):
        raise InvalidRequest(f"{key} must be a list of rows (objects of column values)")
    names: list[str] = []
    for row in payload:
        if isinstance(row, dict):
            names += [str(k) for k in row if str(k) not in names]
    out: dict[str, list[Any]] = {name: [] for name in names}
    for i, row in enumerate(payload):
        if not isinstance(row, dict):
            raise InvalidRequest(f"{key}[{i}] must be an object of column values")
        for name in names:
            out[name].append(row.get(name))
    if not payload:
        raise InvalidRequest("the request holds no rows")
    return out


def _columns_batch(
    schema: ModelSchema, columns: Mapping[str, list[Any]], where: str
) -> dict[str, np.ndarray]:
    for name in columns:
        if schema.field(name) is None:
            raise InvalidRequest(
                f"{where}: unexpected column {name!r}; the model's inputs: {_names(schema)}"
            )
    batch: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for spec in schema.inputs:
        values = columns.get(spec.name)
        if values is None:
            if spec.required:
                raise InvalidRequest(
                    f"{where}: column {spec.name!r} is missing; the model's inputs: "
                    f"{_names(schema)}"
                )
            continue
        label = f"column {spec.name!r}"
        if spec.datatype == "BYTES":
            checked_text = [_text_value(spec, v, f"{label}, row {i}") for i, v in enumerate(values)]
            column = np.empty(len(values), dtype=object)
            column[:] = checked_text
            batch[spec.name] = column
        else:
            numpy_type = np.dtype(NUMPY_OF_OIP[spec.datatype])
            checked = [
                _number(v, numpy_type, spec, f"{label}, row {i}") for i, v in enumerate(values)
            ]
            batch[spec.name] = np.asarray(checked, dtype=numpy_type).reshape(len(values))
        rows[spec.name] = len(values)
    _same_rows(rows)
    return batch


def _tensor_payload(schema: ModelSchema, key: str, payload: Any) -> list[RawTensor]:
    if key in ("dataframe_split", "dataframe_records"):
        raise InvalidRequest(
            f"this model takes tensors: send them as instances or inputs, not {key}"
        )
    if isinstance(payload, dict):
        tensors = payload
    elif len(schema.inputs) == 1:
        tensors = {schema.inputs[0].name: payload}
    else:
        raise InvalidRequest(f"{key} must be an object of named tensors: {_names(schema)}")
    found = []
    for name, value in tensors.items():
        spec = schema.field(str(name))
        if spec is None:
            raise InvalidRequest(
                f"{key}: unexpected input {name!r}; the model's inputs: {_names(schema)}"
            )
        try:
            array = np.asarray(value, dtype=object)
        except ValueError as e:
            raise InvalidRequest(f"{key}: input {name!r} is not a rectangular array") from e
        values = [v.item() if isinstance(v, np.generic) else v for v in array.reshape(-1)]
        found.append(RawTensor(str(name), spec.datatype, list(array.shape), values))
    return found
