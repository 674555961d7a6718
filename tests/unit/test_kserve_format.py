"""The KServe v2 request and response formats (protocols/kserve.py): what tritonclient sends is
read back exactly, with the binary tensor extension and in JSON, and a malformed body is refused
in words before anything is stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request

from core.errors import Invalid
from protocols import kserve
from protocols.core import ModelMetadata

METADATA = ModelMetadata(
    name="m", version="1.0.0", serial=3, labels=("a", "b"), task="single-label", input_size=2,
    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), framework="torchvision", ready=True,
)  # fmt: skip


def request_of(inputs, outputs=None, **parameters):
    return _get_inference_request(
        inputs=inputs, request_id="r-1", outputs=outputs, sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=parameters.pop("timeout", None), custom_parameters=parameters or None,
    )  # fmt: skip


@pytest.mark.parametrize("binary", [True, False])
def test_a_tensor_from_tritonclient_is_read_back_exactly(binary):
    array = np.random.default_rng(1).standard_normal((2, 3, 2, 2)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, size = request_of([tensor])
    parsed = kserve.parse_infer(body, None if size is None else str(size))
    assert parsed.images is None and np.array_equal(parsed.tensor, array)
    assert parsed.outputs == [("probabilities", True), ("label", True)]  # no outputs named: binary, all


def test_bytes_elements_are_length_prefixed_and_json_ones_are_base64():
    images = [b"\x89PNG one", b"", b"\xff\xd8 two"]
    tensor = httpclient.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    body, size = request_of([tensor])
    assert kserve.parse_infer(body, str(size)).images == images
    as_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["iVBORw=="]}]}
    assert kserve.parse_infer(json.dumps(as_json).encode(), None).images == [b"\x89PNG"]


@pytest.mark.parametrize(
    "body, code",
    [
        (b"not json", "bad_json"),
        (b'{"inputs": []}', "no_input"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}', "bad_datatype"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}', "bad_shape"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}', "bad_bytes"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"name": "y"}]}',
         "bad_output"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', "no_data"),
    ],
)  # fmt: skip
def test_a_malformed_request_is_refused_in_words(body, code):
    with pytest.raises(Invalid) as refused:
        kserve.parse_infer(body, None)
    assert refused.value.code == code and refused.value.message


def test_a_truncated_binary_part_is_refused():
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"abcdef"], dtype=object), binary_data=True)
    body, size = request_of([tensor])
    with pytest.raises(Invalid):
        kserve.parse_infer(body[:-2], str(size))
    with pytest.raises(Invalid):
        kserve.parse_infer(body, str(len(body) + 1))


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_the_response_as_sent(binary):
    probabilities = np.array([[0.25, 0.75], [0.9, 0.1]], dtype=np.float32)
    header = {"id": "r-1", "inputs": [], "parameters": {"binary_data_output": binary}}
    parsed = kserve.Parsed(header, None, None, kserve._outputs(header))
    response = kserve.infer_response(metadata=METADATA, parsed=parsed, probabilities=probabilities)
    length = response.get(kserve.HEADER_LENGTH)
    assert (length is not None) == binary
    result = InferResult.from_response_body(response.content, header_length=None if length is None else int(length))
    assert np.array_equal(result.as_numpy("probabilities"), probabilities)
    assert [label.decode() if binary else label for label in result.as_numpy("label")] == ["b", "a"]
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "r-1"


def test_a_clients_timeout_is_in_microseconds():
    assert kserve._timeout({"parameters": {"timeout": 250_000}}) == 0.25
    assert kserve._timeout({}) is None
    with pytest.raises(Invalid):
        kserve._timeout({"parameters": {"timeout": "soon"}})
