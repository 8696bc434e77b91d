"""The Open Inference Protocol's codecs and checks, as plain functions (no Serve): BYTES tensors
both ways, the texts of a request, the OIP error shape, and the gRPC load generator's codec."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from servecore.api import oip
from servecore.errors import InvalidRequest, TooManyTexts


def test_bytes_tensors_round_trip_with_length_prefixes():
    items = [b"hi", "héllo".encode(), b""]
    raw = oip.encode_bytes(items)
    assert raw[:6] == struct.pack("<I", 2) + b"hi"
    assert oip.decode_bytes(raw) == items
    assert oip.encode_bytes(["é"]) == struct.pack("<I", 2) + "é".encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x05\x00", "BYTES tensor data ends inside an element's length"),
        (struct.pack("<I", 9) + b"short", "BYTES tensor data ends inside an element"),
    ],
)
def test_truncated_bytes_tensors_are_refused(raw, message):
    with pytest.raises(InvalidRequest, match=message):
        oip.decode_bytes(raw)


def test_texts_are_checked_as_v1_checks_them():
    assert oip.texts_of("text", "BYTES", [2], [b"a", "b"]) == ["a", "b"]
    assert oip.texts_of("text", "BYTES", [2, 1], ["a", "b"]) == ["a", "b"]
    cases = [
        (("txt", "BYTES", [1], ["a"]), "unexpected input 'txt': the only input is 'text'"),
        (("text", "BYTES", [2, 2], ["a"] * 4), "must have shape [n] (or [n, 1]), not [2, 2]"),
        (("text", "BYTES", [0], []), "input 'text' holds no texts"),
        (("text", "BYTES", [1], [b"\xff"]), "input 'text'[0] is not UTF-8 text"),
        (("text", "BYTES", [1], [3]), "input 'text'[0] must be a string"),
        (("text", "BYTES", [1], ["x" * 2001]), "at most 2000 characters, got 2001"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidRequest) as raised:
            oip.texts_of(*args)
        assert message in raised.value.message
    with pytest.raises(TooManyTexts):
        oip.texts_of("text", "BYTES", [65], ["a"] * 65)


def test_raw_tensors_are_little_endian_row_major():
    probs = np.arange(12, dtype=np.float32).reshape(2, 6)
    tensor = oip.Tensor("probabilities", "FP32", [2, 6], probs)
    assert np.frombuffer(oip.raw_of(tensor), dtype="<f4").reshape(2, 6).tolist() == probs.tolist()
    labels = oip.Tensor("label", "BYTES", [2], np.asarray([b"a", b"bc"], dtype=object))
    assert oip.decode_bytes(oip.raw_of(labels)) == [b"a", b"bc"]


def test_the_grpc_load_generator_counts_labels_of_its_own_requests():
    from bench.grpc_load import _labels, _request
    from servecore.api.proto import inference_pb2 as pb

    request = _request(["a", "bé"], "intent")
    assert list(request.inputs[0].shape) == [2]
    assert oip.decode_bytes(request.raw_input_contents[0]) == [b"a", "bé".encode()]
    response = pb.ModelInferResponse()
    response.outputs.add(name="probabilities")
    response.outputs.add(name="label")
    response.raw_output_contents.extend([b"\x00" * 48, oip.encode_bytes([b"x", b"y"])])
    assert _labels(response) == 2
    with pytest.raises(KeyError):
        _labels(pb.ModelInferResponse())
