"""The signature checks every front applies to a generic model's request (plain, no Ray), and the
model class that serves it (:class:`deployments.pyfunc_model.PyfuncModel`) on a tiny model saved
to a folder."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from servecore.errors import InvalidRequest
from servecore.signature import (
    PREDICTIONS,
    FieldSpec,
    ModelSchema,
    NoSignature,
    RawTensor,
    batch_from_scoring_json,
    batch_from_tensors,
    named_outputs,
    schema_of,
)

COLUMNS = ModelSchema(
    "columns",
    (
        FieldSpec("amount", "FP64", (-1,), "double"),
        FieldSpec("merchant", "BYTES", (-1,), "string"),
        FieldSpec("hour", "INT64", (-1,), "long"),
        FieldSpec("note", "BYTES", (-1,), "string", required=False),
    ),
    (FieldSpec(PREDICTIONS, "BYTES", (-1,), "str"),),
)
TENSOR = ModelSchema(
    "tensors",
    (FieldSpec("input", "FP32", (-1, 3), "float32"),),
    (),
    unnamed_input=True,
)


def refused(call, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        call()
    assert raised.value.message == message


def test_schema_of_column_and_tensor_signatures():
    from mlflow.models import infer_signature

    frame = pd.DataFrame({"a": [1.5], "b": ["x"], "c": [True]})
    schema = schema_of(infer_signature(frame, np.array(["y"])))
    assert schema.kind == "columns"
    assert [(f.name, f.datatype, f.shape) for f in schema.inputs] == [
        ("a", "FP64", (-1,)),
        ("b", "BYTES", (-1,)),
        ("c", "BOOL", (-1,)),
    ]
    assert [(f.name, f.datatype) for f in schema.outputs] == [(PREDICTIONS, "BYTES")]
    tensor = schema_of(infer_signature(np.zeros((2, 4), np.float32), np.zeros((2, 3))))
    assert (tensor.kind, tensor.unnamed_input) == ("tensors", True)
    assert tensor.inputs[0] == FieldSpec("input", "FP32", (-1, 4), "float32")
    assert ModelSchema.from_dict(schema.to_dict()) == schema
    with pytest.raises(NoSignature) as raised:
        schema_of(None, "models:/m/1")
    assert str(raised.value).startswith("models:/m/1 has no MLflow signature")


def test_scoring_json_formats_give_one_batch():
    rows = [
        {"amount": 12.5, "merchant": "travel", "hour": 3},
        {"amount": 7, "merchant": "fuel", "hour": 22, "note": "late"},
    ]
    bodies = [
        {
            "dataframe_split": {
                "columns": ["amount", "merchant", "hour"],
                "data": [[12.5, "travel", 3], [7, "fuel", 22]],
            }
        },
        {"dataframe_records": rows},
        {"instances": rows},
        {"inputs": {"amount": [12.5, 7], "merchant": ["travel", "fuel"], "hour": [3, 22]}},
    ]
    for body in bodies:
        batch = batch_from_scoring_json(COLUMNS, body)
        np.testing.assert_array_equal(batch["amount"], [12.5, 7.0])
        assert batch["amount"].dtype == np.float64 and batch["hour"].dtype == np.int64
        assert list(batch["merchant"]) == ["travel", "fuel"]
    assert list(batch_from_scoring_json(COLUMNS, {"dataframe_records": rows})["note"]) == [
        None,
        "late",
    ]


def test_scoring_json_refusals_name_the_field():
    row = {"amount": 1.0, "merchant": "fuel", "hour": 1}
    cases = [
        (
            [],
            "the body must be a JSON object with one of "
            "dataframe_split, dataframe_records, instances, inputs",
        ),
        (
            {"instances": [row], "inputs": [row]},
            "the body must have exactly one of dataframe_split, dataframe_records, instances, "
            "inputs; found instances, inputs",
        ),
        ({"instances": [row], "extra": 1}, "unexpected field(s) ['extra'] beside 'instances'"),
        (
            {"instances": [{**row, "tip": 2}]},
            "instances: unexpected column 'tip'; the model's inputs: amount, merchant, hour, note",
        ),
        (
            {"instances": [{**row, "amount": True}]},
            "column 'amount', row 0: True is not a number (the model expects double)",
        ),
        (
            {"instances": [{**row, "hour": 1.5}]},
            "column 'hour', row 0: 1.5 is not an integer",
        ),
        (
            {"instances": [{**row, "merchant": None}]},
            "column 'merchant', row 0: missing value (the input is required)",
        ),
        (
            {"instances": [{**row, "merchant": 3}]},
            "column 'merchant', row 0: 3 is not a string (the model expects string)",
        ),
        (
            {"inputs": {"amount": [1.0, 2.0], "merchant": ["a"], "hour": [1, 2]}},
            "inputs disagree on the number of rows: 'amount' has 2, 'merchant' has 1",
        ),
        (
            {"dataframe_split": {"columns": ["amount"], "data": [1.0]}},
            "dataframe_split.data[0] must be a list of 1 values",
        ),
        ({"instances": [row] * 4097}, "4097 rows in one request; at most 4096 per request"),
    ]
    for body, message in cases:
        refused(lambda body=body: batch_from_scoring_json(COLUMNS, body), message)


def test_oip_tensors_checked_against_the_signature():
    tensors = [
        RawTensor("amount", "INT64", [2], [12, 7]),  # widened without loss
        RawTensor("merchant", "BYTES", [2], [b"travel", b"fuel"]),
        RawTensor("hour", "INT64", [2], raw=struct.pack("<2q", 3, 22)),
    ]
    batch = batch_from_tensors(COLUMNS, tensors)
    assert batch["amount"].dtype == np.float64 and list(batch["hour"]) == [3, 22]
    assert list(batch["merchant"]) == ["travel", "fuel"]
    refused(
        lambda: batch_from_tensors(COLUMNS, [*tensors[:2], RawTensor("hour", "FP64", [2], [1, 2])]),
        "input 'hour' has datatype FP64; the model expects INT64",
    )
    refused(
        lambda: batch_from_tensors(
            COLUMNS, [*tensors[:2], RawTensor("hour", "INT64", [2], raw=b"\0" * 8)]
        ),
        "input 'hour': 8 bytes of INT64 data for shape [2] (expected 16)",
    )
    refused(
        lambda: batch_from_tensors(COLUMNS, [*tensors, RawTensor("tip", "FP64", [2], [1, 2])]),
        "unexpected input 'tip'; the model's inputs: amount, merchant, hour, note",
    )
    refused(
        lambda: batch_from_tensors(COLUMNS, [*tensors[:2], tensors[1]]),
        "input 'merchant' is given twice",
    )


def test_tensor_models_take_nested_lists_of_their_shape():
    batch = batch_from_scoring_json(TENSOR, {"instances": [[1, 2, 3], [4, 5, 6]]})
    assert batch["input"].dtype == np.float32 and batch["input"].shape == (2, 3)
    refused(
        lambda: batch_from_scoring_json(TENSOR, {"inputs": [[1, 2], [3, 4]]}),
        "input 'input' has shape [2, 2]; the model expects [-1, 3]",
    )
    refused(
        lambda: batch_from_scoring_json(TENSOR, {"dataframe_records": [{"input": 1}]}),
        "this model takes tensors: send them as instances or inputs, not dataframe_records",
    )


def test_named_outputs_follow_the_signature():
    column = np.array(["ok"], dtype=object)
    assert list(named_outputs({PREDICTIONS: column}, COLUMNS)) == [PREDICTIONS]
    named = ModelSchema("columns", COLUMNS.inputs, (FieldSpec("label", "BYTES", (-1,), "string"),))
    assert list(named_outputs({PREDICTIONS: column}, named)) == ["label"]
    assert list(named_outputs({"a": column, "b": column}, named)) == ["a", "b"]


def test_pyfunc_model_serves_a_saved_model_with_its_signature(tmp_path):
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    from deployments.pyfunc_model import PyfuncModel

    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 0.0, 1.0, 0.0]})
    labels = np.array(["low", "low", "high", "high"])
    model = LogisticRegression().fit(frame, labels)
    mlflow.sklearn.save_model(
        model, tmp_path / "model", signature=infer_signature(frame, model.predict(frame))
    )
    served = PyfuncModel(model_dir=tmp_path / "model")
    assert served.schema.input_names == ("x", "y")
    batch = batch_from_scoring_json(served.schema, {"dataframe_records": frame.to_dict("records")})
    output = served(batch)
    assert list(output) == [PREDICTIONS]
    assert list(output[PREDICTIONS]) == list(model.predict(frame))
    assert output[PREDICTIONS].dtype == object
    mlflow.sklearn.save_model(model, tmp_path / "unsigned")
    with pytest.raises(NoSignature):
        PyfuncModel(model_dir=tmp_path / "unsigned")


def test_invocations_answer_as_mlflow_scoring_server_does():
    from deployments.pyfunc_model import output_columns
    from servecore.api.mlflow_scoring import predictions_json

    labels = np.array(["ok", "fraud"])
    assert predictions_json(output_columns(labels)) == ["ok", "fraud"]
    assert predictions_json(output_columns(pd.Series([0.5, 1.5]))) == [0.5, 1.5]
    frame = pd.DataFrame({"label": ["ok", "fraud"], "score": [0.1, 0.9]})
    assert predictions_json(output_columns(frame)) == frame.to_dict(orient="records")
    one = pd.DataFrame({"label": ["ok", "fraud"]})
    assert predictions_json(output_columns(one)) == one.to_dict(orient="records")
    matrix = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert predictions_json(output_columns(matrix)) == matrix.tolist()
