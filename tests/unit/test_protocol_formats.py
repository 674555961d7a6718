"""The TF Serving REST and TorchServe formats, without a server: what a request is read as,
what an answer looks like, and what is refused (and in which words)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from protocols import tfserving as tf
from protocols import torchserve as ts

FACTS = tf.ModelFacts(
    name="chest-xray",
    version="1.2.0",
    serial=2,
    labels=("normal", "opacity", "effusion"),
    input_size=4,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)
PNG = b"\x89PNG\r\n\x1a\n-not-really-but-bytes"
B64 = {"b64": base64.b64encode(PNG).decode()}
MAX = 8


def tensor(*shape: int) -> list:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape).tolist()


def parse(body: object) -> tf.Inputs:
    return tf.predict_request_parse(body, facts=FACTS, max_instances=MAX)


def refused(body: object) -> str:
    with pytest.raises(tf.FormatError) as error:
        parse(body)
    return str(error.value)


# --- TF Serving: :predict ------------------------------------------------------------------------


def test_row_format_reads_b64_images_bare_or_named():
    inputs = parse({"instances": [B64, {"image_bytes": B64}, {"image": B64}]})
    assert inputs.images == (PNG, PNG, PNG)
    assert inputs.tensor is None and not inputs.columnar and len(inputs) == 3


def test_torchserves_kserve_v1_body_is_read_too():
    """TorchServe's KServe v1 mode posts base64 text under "data" to the same :predict URL."""
    text = base64.b64encode(PNG).decode()
    assert parse({"instances": [{"data": text}, {"data": B64}]}).images == (PNG, PNG)


def test_b64_with_line_breaks_or_the_url_safe_alphabet_is_read():
    data = bytes(range(256)) * 2
    wrapped = {"b64": base64.encodebytes(data).decode()}
    url_safe = {"b64": base64.urlsafe_b64encode(data).decode()}
    assert parse({"instances": [wrapped, url_safe]}).images == (data, data)


def test_row_format_reads_tensors_of_the_models_shape():
    inputs = parse({"instances": [tensor(3, 4, 4), {"images": tensor(3, 4, 4)}]})
    assert inputs.images == () and inputs.tensor is not None
    assert inputs.tensor.shape == (2, 3, 4, 4) and inputs.tensor.dtype == np.float32
    assert inputs.tensor[1, 2, 3, 3] == 47


def test_columnar_format_reads_one_image_a_list_or_a_batch_tensor():
    assert parse({"inputs": B64}).images == (PNG,)
    assert parse({"inputs": {"image_bytes": [B64, B64]}}).images == (PNG, PNG)
    batch = parse({"inputs": tensor(2, 3, 4, 4)})
    assert batch.columnar and batch.tensor is not None and batch.tensor.shape == (2, 3, 4, 4)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "Missing 'inputs' or 'instances' key"),
        ({"instances": [B64], "inputs": B64}, "not both"),
        ({"instances": []}, "non-empty list"),
        ({"instances": [B64] * (MAX + 1)}, f"At most {MAX} instances"),
        ({"instances": ["aGVsbG8="]}, 'image bytes are sent as {"b64"'),
        ({"inputs": ["aGVsbG8="]}, "image bytes are sent as"),
        ({"instances": [{"b64": "not base64 at all!"}]}, "not base64"),
        ({"instances": [{"b64": ""}]}, "empty"),
        ({"instances": [B64, tensor(3, 4, 4)]}, "not a mix"),
        ({"instances": [tensor(3, 5, 5)]}, "expected shape 3×4×4, got 3×5×5"),
        ({"instances": [[[1.0, 2.0], [3.0]]]}, "nested list of numbers of one shape"),
        ({"instances": [{"weights": B64}]}, "unknown input 'weights'"),
        ({"instances": [{"image_bytes": B64, "images": B64}]}, "one input"),
        ({"inputs": tensor(1, 3, 4, 5)}, "expected shape 1×3×4×4"),
        ({"inputs": []}, "'inputs' is an image"),
        ({"signature_name": "regress_x", "instances": [B64]}, 'signature name: "regress_x" not found'),
        ([B64], "JSON object"),
    ],
)
def test_what_predict_refuses_and_says(body, words):
    assert words in refused(body)


def test_a_tensor_with_nan_is_refused():
    values = tensor(3, 4, 4)
    values[0][0][0] = float("nan")
    assert "finite" in refused({"instances": [values]})


def test_row_answer_is_one_dict_per_instance_with_the_top_label():
    answer = tf.predict_response(facts=FACTS, probabilities=[[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]], columnar=False)
    assert answer == {
        "predictions": [
            {"probabilities": [0.1, 0.7, 0.2], "label": "opacity"},
            {"probabilities": [0.8, 0.1, 0.1], "label": "normal"},
        ]
    }
    json.dumps(answer)  # plain JSON types only


def test_columnar_answer_is_one_list_per_output():
    answer = tf.predict_response(facts=FACTS, probabilities=[[0.1, 0.7, 0.2]], columnar=True)
    assert answer == {"outputs": {"probabilities": [[0.1, 0.7, 0.2]], "label": ["opacity"]}}


# --- TF Serving: :classify -----------------------------------------------------------------------


def test_classify_reads_each_examples_image_with_the_context():
    body = {"context": {"site": "ward-3"}, "examples": [{"image": B64}, {"image_bytes": B64}]}
    assert tf.classify_request_parse(body, facts=FACTS, max_instances=MAX).images == (PNG, PNG)
    shared = {"context": {"image": B64}, "examples": [{}, {"note": "x"}]}  # the image in the context
    assert len(tf.classify_request_parse(shared, facts=FACTS, max_instances=MAX).images) == 2


def test_classify_reads_a_flattened_float_feature_as_a_tensor():
    flat = np.arange(48, dtype=np.float32).tolist()
    inputs = tf.classify_request_parse({"examples": [{"images": flat}]}, facts=FACTS, max_instances=MAX)
    assert inputs.tensor is not None and inputs.tensor.shape == (1, 3, 4, 4) and inputs.tensor[0, 2, 3, 3] == 47


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"examples": []}, "non-empty list"),
        ({"examples": [{"note": "no picture"}]}, "holds no image"),
        ({"examples": [{"a": B64, "b": B64}]}, "several images"),
        ({"examples": [B64] * 2, "context": []}, "'context' is an object"),
        ({"examples": ["x"]}, "object of features"),
        ({"examples": [{"image": B64}] * (MAX + 1)}, f"At most {MAX} examples"),
    ],
)
def test_what_classify_refuses(body, words):
    with pytest.raises(tf.FormatError) as error:
        tf.classify_request_parse(body, facts=FACTS, max_instances=MAX)
    assert words in str(error.value)


def test_classify_answers_every_label_most_probable_first():
    answer = tf.classify_response(facts=FACTS, probabilities=[[0.1, 0.7, 0.2]])
    assert answer == {"results": [[["opacity", 0.7], ["effusion", 0.2], ["normal", 0.1]]]}


# --- TF Serving: status and metadata -------------------------------------------------------------


def test_model_status_lists_each_version_once_newest_first():
    assert tf.model_status([1, 3, 3]) == {
        "model_version_status": [
            {"version": "3", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        ]
    }


def test_a_version_not_ready_is_loading_or_ended_with_the_reason():
    assert tf.version_not_ready(serial=3, refused="")["model_version_status"][0]["state"] == "LOADING"
    (ended,) = tf.version_not_ready(serial=3, refused="outputs do not match the labels")["model_version_status"]
    assert ended == {
        "version": "3",
        "state": "END",
        "status": {"error_code": "FAILED_PRECONDITION", "error_message": "outputs do not match the labels"},
    }


def test_metadata_states_enough_to_build_a_tensor_input():
    metadata = tf.model_metadata(facts=FACTS)
    assert metadata["model_spec"] == {"name": "chest-xray", "signature_name": "", "version": "2"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    tensor_input = signatures["tensor"]["inputs"]["images"]
    assert tensor_input["dtype"] == "DT_FLOAT"
    assert [dim["size"] for dim in tensor_input["tensor_shape"]["dim"]] == ["-1", "3", "4", "4"]
    assert signatures["serving_default"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    probabilities = signatures["serving_default"]["outputs"]["probabilities"]
    assert [dim["size"] for dim in probabilities["tensor_shape"]["dim"]] == ["-1", "3"]
    assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
    sightline = metadata["metadata"]["sightline"]
    assert sightline["labels"] == ["normal", "opacity", "effusion"]
    assert sightline["version"] == "1.2.0" and sightline["serial"] == 2
    assert sightline["input"]["normalisation"] == {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert sightline["input"]["shape"] == [-1, 3, 4, 4] and sightline["input"]["datatype"] == "FP32"


def test_tf_serving_errors_are_one_string():
    assert tf.error_body(tf.missing_version("chest-xray", 7)) == {
        "error": "Servable not found for request: Specific(chest-xray, 7)"
    }
    assert tf.missing_version("chest-xray", "") == "Servable not found for request: Latest(chest-xray)"


# --- TorchServe ----------------------------------------------------------------------------------


def test_the_raw_body_is_the_image():
    assert ts.prediction_input(body=PNG, multipart=False, files={}, fields={}) == PNG


def test_multipart_reads_data_then_body_then_the_only_file():
    assert ts.prediction_input(body=b"", multipart=True, files={"data": PNG, "x": b"1"}, fields={}) == PNG
    assert ts.prediction_input(body=b"", multipart=True, files={"body": PNG}, fields={}) == PNG
    assert ts.prediction_input(body=b"", multipart=True, files={"scan": PNG}, fields={}) == PNG
    as_text = {"data": base64.b64encode(PNG).decode()}
    assert ts.prediction_input(body=b"", multipart=True, files={}, fields=as_text) == PNG


@pytest.mark.parametrize(
    ("multipart", "files", "fields", "words"),
    [
        (False, {}, {}, "holds no image"),
        (True, {}, {}, "form field 'data'"),
        (True, {"a": PNG, "b": PNG}, {}, "got the files a, b"),
        (True, {}, {"data": "not base64!"}, "not a base64 image"),
    ],
)
def test_what_a_prediction_refuses(multipart, files, fields, words):
    with pytest.raises(ts.FormatError) as error:
        ts.prediction_input(body=b"", multipart=multipart, files=files, fields=fields)
    assert words in str(error.value)


def test_the_answer_is_the_top_five_labels_most_probable_first():
    labels = [f"l{i}" for i in range(7)]
    answer = ts.prediction_response(labels=labels, probabilities=[0.01, 0.3, 0.05, 0.4, 0.1, 0.04, 0.1])
    assert list(answer) == ["l3", "l1", "l4", "l6", "l2"]
    assert answer["l3"] == 0.4
    assert list(json.loads(json.dumps(answer))) == list(answer)  # the order survives JSON
    assert ts.prediction_response(labels=["a", "b"], probabilities=[0.2, 0.8]) == {"b": 0.8, "a": 0.2}


def test_models_are_listed_a_page_at_a_time():
    models = [("c", "c.zip"), ("a", "a.zip"), ("b", "b.zip")]
    first = ts.models_page(models, limit="2", next_page_token=None)
    assert first["nextPageToken"] == "2"
    assert first["models"] == [{"modelName": "a", "modelUrl": "a.zip"}, {"modelName": "b", "modelUrl": "b.zip"}]
    last = ts.models_page(models, limit="2", next_page_token="2")
    assert last == {"models": [{"modelName": "c", "modelUrl": "c.zip"}]}
    for limit, token in [("0", None), ("x", None), (None, "-1")]:
        with pytest.raises(ts.FormatError):
            ts.models_page(models, limit=limit, next_page_token=token)


def test_a_description_shows_workers_without_their_host_names():
    workers = [ts.WorkerFacts(id="1", gpu=False, loaded=True), ts.WorkerFacts(id="2", gpu=True, loaded=False)]
    described = ts.model_description(
        name="chest-xray", version="1.2.0", serial=2, package_name="chest-xray-1.2.0.zip", batch_size=16,
        max_batch_delay_ms=5.0, response_timeout_s=30.0, workers=workers,
    )  # fmt: skip
    assert described["modelName"] == "chest-xray" and described["modelVersion"] == "1.2.0"
    assert described["maxWorkers"] == 2 and described["batchSize"] == 16
    assert described["workers"] == [
        {"id": "1", "status": "READY", "gpu": False},
        {"id": "2", "status": "UNLOADED", "gpu": True},
    ]


def test_torchserve_errors_carry_code_type_and_message():
    assert ts.error_body(404, ts.missing_model("x")) == {
        "code": 404,
        "type": "ModelNotFoundException",
        "message": "Model not found: x",
    }
    assert ts.error_body(504, "late")["type"] == "RequestTimeoutException"
    assert ts.error_body(418, "?")["type"] == "InternalServerException"


# --- refusals, in each protocol's shape ----------------------------------------------------------


def test_a_timeout_is_answered_in_each_protocols_shape_with_the_request_id():
    from protocols.core import ProtocolTimeout, failure_of

    late = failure_of(
        ProtocolTimeout("Request id 7: the result will be at /api/v1/images/3/.", detail={"request_ids": [7]})
    )
    assert late is not None
    tf_answer, ts_answer = tf.render_failure(late), ts.render_failure(late)
    assert tf_answer.status_code == ts_answer.status_code == 504
    assert json.loads(tf_answer.content) == {"error": "Request id 7: the result will be at /api/v1/images/3/."}
    assert json.loads(ts_answer.content) == {
        "code": 504,
        "type": "RequestTimeoutException",
        "message": "Request id 7: the result will be at /api/v1/images/3/.",
    }


def test_a_missing_token_is_a_401_in_each_protocols_shape():
    from rest_framework.exceptions import NotAuthenticated

    from protocols.core import failure_of

    anonymous = failure_of(NotAuthenticated("Authentication credentials were not provided."))
    assert anonymous is not None and anonymous.status == 401
    assert json.loads(tf.render_failure(anonymous).content) == {
        "error": "Authentication credentials were not provided."
    }
    assert json.loads(ts.render_failure(anonymous).content)["type"] == "UnauthorizedException"
