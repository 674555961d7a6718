"""TF Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest), over the shared core.

A TF Serving client names a model and, optionally, an integer version (``/versions/2``: the
version's ``serial``, its registration order) or a label (``/labels/production``, an alias); the
registry's one "which version" rule decides whether this hospital may use it.

This module holds the formats (request parsing, answer shaping, errors: pure functions, tested
without a server) and the views that join them to ``protocols.core``.

The signatures a model exposes here (its metadata lists them):

- ``serving_default``: input ``image_bytes`` (DT_STRING, encoded PNG/JPEG sent as ``{"b64": …}``),
  an image read: it becomes an image record and an inference request in the caller's hospital;
- ``tensor``: input ``images`` (DT_FLOAT, N×3×H×W, already normalised with the model's mean and
  std), a stateless read;
- ``classify``: ``:classify``'s examples, ``{"image": {"b64": …}}``.

The input kind is read from the values themselves, so a client may leave ``signature_name`` out.
Outputs: ``probabilities`` (DT_FLOAT, N×labels, in the metadata's label order) and ``label``
(DT_STRING, N: the most probable label). Row format answers one dict per instance, as TF Serving
does for a signature with several outputs; columnar answers one list per output.

Health: TF Serving has no health route of its own; probes call the model status route, which here
needs a token like every route that names a model (401 in TF Serving's shape, the same answer
whether the model exists or not). A probe calls ``/v1/health/live`` or ``/v1/health/ready``
instead: no token, and they say nothing about hospitals or models.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core.errors import Conflict, Invalid, NotFound, Unprocessable
from protocols.core import (
    PIXEL_SCALE,
    Caller,
    Failure,
    image_read,
    protocol_body,
    protocol_caller,
    protocol_version,
    protocol_view,
    tensor_read,
)
from protocols.core import model_metadata as core_metadata
from recognition import health
from recognition.models import ModelVersion
from recognition.services.registry import version_for

SIGNATURE_IMAGE = "serving_default"
SIGNATURE_TENSOR = "tensor"
SIGNATURE_CLASSIFY = "classify"
SIGNATURES = (SIGNATURE_IMAGE, SIGNATURE_TENSOR, SIGNATURE_CLASSIFY)
INPUT_IMAGE = "image_bytes"
INPUT_TENSOR = "images"
# the names a client may give the one input: ours, and what a Keras-built client tends to send
KSERVE_V1_INPUT = "data"  # {"instances": [{"data": "<base64>"}]}, as TorchServe's KServe v1 mode reads
IMAGE_INPUT_NAMES = (INPUT_IMAGE, "image", "bytes_inputs", "inputs", KSERVE_V1_INPUT)
TENSOR_INPUT_NAMES = (INPUT_TENSOR, "input", "input_1", "pixels", "inputs")
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
CHANNELS = 3
BATCH_DIM = "-1"  # TF Serving writes int64 sizes as strings; -1: any batch size
METHOD_PREDICT = "tensorflow/serving/predict"
METHOD_CLASSIFY = "tensorflow/serving/classify"
STATE_AVAILABLE = "AVAILABLE"
REQUEST_IDS_HEADER = "X-Inference-Request-Ids"  # an image read's records, for a client that looks again


class FormatError(ValueError):
    """The request is not one this API reads: a 400 ``{"error": message}``."""


@dataclass(frozen=True)
class ModelFacts:
    """What the formats need to know about one model version."""

    name: str
    version: str  # the semantic version, e.g. "1.0.0"
    serial: int  # TF Serving's integer version
    labels: tuple[str, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = "single-label"

    @classmethod
    def of(cls, model_version) -> ModelFacts:
        manifest = model_version.manifest
        return cls(
            name=model_version.model.name,
            version=model_version.version,
            serial=model_version.serial,
            labels=tuple(str(label) for label in manifest.get("labels", [])),
            input_size=int(manifest["input_size"]),
            mean=tuple(float(value) for value in manifest["mean"]),
            std=tuple(float(value) for value in manifest["std"]),
            task=str(manifest.get("task", "single-label")),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (CHANNELS, self.input_size, self.input_size)


@dataclass(frozen=True)
class Inputs:
    """One request's instances: encoded images, or one float32 tensor N×3×H×W; never both."""

    images: tuple[bytes, ...] = ()
    tensor: np.ndarray | None = None
    columnar: bool = False  # answer {"outputs": …} rather than {"predictions": […]}

    def __len__(self) -> int:
        return len(self.images) if self.tensor is None else int(self.tensor.shape[0])


# --- reading a request ---------------------------------------------------------------------------


def b64_decode(value: object, *, where: str) -> bytes:
    if not isinstance(value, dict) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise FormatError(f'{where}: image bytes are sent as {{"b64": "<base64>"}}.')
    text = "".join(value["b64"].split())  # line breaks, as base64.encodebytes writes them
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # TF Serving reads the URL-safe alphabet too
            data = base64.b64decode(text, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"{where}: the b64 value is not base64.") from None
    if not data:
        raise FormatError(f"{where}: the b64 value is empty.")
    return data


def _is_b64(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _named(value: object, *, where: str) -> object:
    """``{"image_bytes": …}`` (an instance or the columnar inputs naming their one input): the
    value. A dict that is not a b64 value must name exactly one input we know."""
    if not isinstance(value, dict) or _is_b64(value):
        return value
    if len(value) != 1:
        raise FormatError(f"{where}: this model has one input ({INPUT_IMAGE} or {INPUT_TENSOR}); got {sorted(value)}.")
    (name, inner), known = next(iter(value.items())), {*IMAGE_INPUT_NAMES, *TENSOR_INPUT_NAMES}
    if name == KSERVE_V1_INPUT and isinstance(inner, str):  # TorchServe's KServe v1 body: base64 text
        return {"b64": inner}
    if name not in known:
        raise FormatError(f"{where}: unknown input {name!r}; this model's input is {INPUT_IMAGE} or {INPUT_TENSOR}.")
    return inner


def _tensor(values: object, *, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        raise FormatError(f"{where}: a tensor is a nested list of numbers of one shape.") from None
    if array.shape != shape:
        expected = "×".join(str(size) for size in shape)
        got = "×".join(str(size) for size in array.shape) or "a scalar"
        raise FormatError(f"{where}: expected shape {expected}, got {got}.")
    if not np.isfinite(array).all():
        raise FormatError(f"{where}: the tensor holds a value that is not a finite number.")
    return array


def predict_request_parse(body: object, *, facts: ModelFacts, max_instances: int) -> Inputs:
    """A ``:predict`` body, row (``instances``) or columnar (``inputs``)."""
    if not isinstance(body, dict):
        raise FormatError("The request body is a JSON object.")
    signature = body.get("signature_name", "")
    if signature and signature not in SIGNATURES:
        raise FormatError(f'Serving signature name: "{signature}" not found in signature def')
    if ("instances" in body) == ("inputs" in body):
        raise FormatError(
            "Missing 'inputs' or 'instances' key"
            if "instances" not in body
            else "Request body may hold 'instances' or 'inputs', not both"
        )
    if "instances" in body:
        return _rows(body["instances"], facts=facts, max_instances=max_instances)
    return _columns(body["inputs"], facts=facts, max_instances=max_instances)


def _rows(instances: object, *, facts: ModelFacts, max_instances: int) -> Inputs:
    if not isinstance(instances, list) or not instances:
        raise FormatError("'instances' is a non-empty list.")
    if len(instances) > max_instances:
        raise FormatError(f"At most {max_instances} instances in one request; got {len(instances)}.")
    values = [_named(instance, where=f"instances[{i}]") for i, instance in enumerate(instances)]
    if all(_is_b64(value) or isinstance(value, str) for value in values):
        return Inputs(images=tuple(b64_decode(value, where=f"instances[{i}]") for i, value in enumerate(values)))
    if any(_is_b64(value) or isinstance(value, str) for value in values):
        raise FormatError('Every instance is an image ({"b64": …}) or every one a tensor; not a mix.')
    tensors = [_tensor(value, shape=facts.input_shape, where=f"instances[{i}]") for i, value in enumerate(values)]
    return Inputs(tensor=np.stack(tensors))


def _columns(inputs: object, *, facts: ModelFacts, max_instances: int) -> Inputs:
    value = _named(inputs, where="inputs")
    if _is_b64(value):  # one image, not in a list: a batch of one
        return Inputs(images=(b64_decode(value, where="inputs"),), columnar=True)
    if not isinstance(value, list) or not value:
        raise FormatError("'inputs' is an image ({\"b64\": …}), a list of them, or a tensor N×3×H×W.")
    if len(value) > max_instances:
        raise FormatError(f"At most {max_instances} instances in one request; got {len(value)}.")
    if all(_is_b64(item) or isinstance(item, str) for item in value):
        images = tuple(b64_decode(item, where=f"inputs[{i}]") for i, item in enumerate(value))
        return Inputs(images=images, columnar=True)
    if any(_is_b64(item) or isinstance(item, str) for item in value):
        raise FormatError("'inputs' holds images ({\"b64\": …}) or one tensor; not a mix.")
    return Inputs(tensor=_tensor(value, shape=(len(value), *facts.input_shape), where="inputs"), columnar=True)


def classify_request_parse(body: object, *, facts: ModelFacts, max_instances: int) -> Inputs:
    """A ``:classify`` body: ``{"examples": [{"image": {"b64": …}}, …], "context": {…}}``; each
    example's features merged over the context's, as TF Serving does. The image is the one
    feature holding a b64 value; a feature holding 3×H×W floats (flattened, as tf.Example holds
    them) is a tensor example."""
    if not isinstance(body, dict):
        raise FormatError("The request body is a JSON object.")
    signature = body.get("signature_name", "")
    if signature and signature not in SIGNATURES:
        raise FormatError(f'Serving signature name: "{signature}" not found in signature def')
    examples, context = body.get("examples"), body.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise FormatError("'examples' is a non-empty list.")
    if not isinstance(context, dict):
        raise FormatError("'context' is an object of features.")
    if len(examples) > max_instances:
        raise FormatError(f"At most {max_instances} examples in one request; got {len(examples)}.")
    images: list[bytes] = []
    tensors: list[np.ndarray] = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise FormatError(f"examples[{i}] is an object of features.")
        features = {**context, **example}
        pictures = [name for name, value in features.items() if _is_b64(value)]
        if len(pictures) == 1:
            images.append(b64_decode(features[pictures[0]], where=f"examples[{i}].{pictures[0]}"))
            continue
        if pictures:
            raise FormatError(f"examples[{i}] holds several images ({', '.join(sorted(pictures))}); send one.")
        floats = [name for name, value in features.items() if name in TENSOR_INPUT_NAMES and isinstance(value, list)]
        if len(floats) != 1:
            raise FormatError(f'examples[{i}] holds no image: give it a feature {{"image": {{"b64": …}}}}.')
        flat = _tensor(features[floats[0]], shape=(int(np.prod(facts.input_shape)),), where=f"examples[{i}]")
        tensors.append(flat.reshape(facts.input_shape))
    if images and tensors:
        raise FormatError("Every example is an image or every one a tensor; not a mix.")
    return Inputs(images=tuple(images)) if images else Inputs(tensor=np.stack(tensors))


# --- shaping an answer ---------------------------------------------------------------------------


def _top_label(facts: ModelFacts, probabilities: list[float]) -> str:
    return facts.labels[int(np.argmax(probabilities))] if probabilities else ""


def predict_response(*, facts: ModelFacts, probabilities: list[list[float]], columnar: bool) -> dict:
    """``probabilities``: one list per instance, in the model's label order."""
    rounded = [[float(p) for p in row] for row in probabilities]
    labels = [_top_label(facts, row) for row in rounded]
    if columnar:
        return {"outputs": {OUTPUT_PROBABILITIES: rounded, OUTPUT_LABEL: labels}}
    return {
        "predictions": [
            {OUTPUT_PROBABILITIES: row, OUTPUT_LABEL: label} for row, label in zip(rounded, labels, strict=True)
        ]
    }


def classify_response(*, facts: ModelFacts, probabilities: list[list[float]]) -> dict:
    """``{"results": [[[label, score], …], …]}``: every label of each example, most probable first."""
    results = []
    for row in probabilities:
        pairs = sorted(zip(facts.labels, (float(p) for p in row), strict=True), key=lambda pair: -pair[1])
        results.append([[label, score] for label, score in pairs])
    return {"results": results}


def model_status(serials: list[int]) -> dict:
    """The versions a hospital may use, as TF Serving's GetModelStatus answers (newest first)."""
    return {
        "model_version_status": [
            {"version": str(serial), "state": STATE_AVAILABLE, "status": {"error_code": "OK", "error_message": ""}}
            for serial in sorted(set(serials), reverse=True)
        ]
    }


def version_not_ready(*, serial: int, refused: str) -> dict:
    """A version the hospital may name that cannot answer yet (``LOADING``: its registration
    checks run) or ever (``END``, with the checks' reason)."""
    state, code = ("END", "FAILED_PRECONDITION") if refused else ("LOADING", "OK")
    return {
        "model_version_status": [
            {"version": str(serial), "state": state, "status": {"error_code": code, "error_message": refused}}
        ]
    }


def _shape(*sizes: int | str) -> dict:
    return {"dim": [{"size": str(size), "name": ""} for size in sizes], "unknown_rank": False}


def _tensor_info(name: str, dtype: str, *sizes: int | str) -> dict:
    return {"dtype": dtype, "tensor_shape": _shape(*sizes), "name": f"{name}:0"}


def model_metadata(*, facts: ModelFacts, details: dict | None = None) -> dict:
    """GetModelMetadata's answer: the signature defs, and beside them (``sightline``) what a
    client needs to build a ``tensor`` input itself: labels, shape, normalisation."""
    size, n_labels = facts.input_size, len(facts.labels)
    outputs = {
        OUTPUT_PROBABILITIES: _tensor_info(OUTPUT_PROBABILITIES, "DT_FLOAT", BATCH_DIM, n_labels),
        OUTPUT_LABEL: _tensor_info(OUTPUT_LABEL, "DT_STRING", BATCH_DIM),
    }
    signatures = {
        SIGNATURE_IMAGE: {
            "inputs": {INPUT_IMAGE: _tensor_info(INPUT_IMAGE, "DT_STRING", BATCH_DIM)},
            "outputs": outputs,
            "method_name": METHOD_PREDICT,
        },
        SIGNATURE_TENSOR: {
            "inputs": {INPUT_TENSOR: _tensor_info(INPUT_TENSOR, "DT_FLOAT", BATCH_DIM, CHANNELS, size, size)},
            "outputs": outputs,
            "method_name": METHOD_PREDICT,
        },
        SIGNATURE_CLASSIFY: {
            "inputs": {"inputs": _tensor_info("tf_example", "DT_STRING", BATCH_DIM)},
            "outputs": {
                "classes": _tensor_info("classes", "DT_STRING", BATCH_DIM, n_labels),
                "scores": _tensor_info("scores", "DT_FLOAT", BATCH_DIM, n_labels),
            },
            "method_name": METHOD_CLASSIFY,
        },
    }
    own_input = {
        "name": INPUT_TENSOR,
        "datatype": "FP32",
        "shape": [-1, CHANNELS, size, size],
        "layout": "NCHW",
        "channels": "RGB",
        # a client's tensor: (pixel / 255 - mean) / std, per channel
        "normalisation": {"scale": PIXEL_SCALE, "mean": list(facts.mean), "std": list(facts.std)},
    }
    extra = dict(details or {})  # the core's description, the same in every protocol
    sightline = {
        "version": facts.version,
        "serial": facts.serial,
        "task": facts.task,
        "labels": list(facts.labels),
        **extra,
        "input": {**extra.get("input", {}), **own_input},
    }
    return {
        "model_spec": {"name": facts.name, "signature_name": "", "version": str(facts.serial)},
        "metadata": {"signature_def": {"signature_def": signatures}, "sightline": sightline},
    }


def error_body(message: str) -> dict:
    return {"error": message}


# TF Serving's own words for what is not there; the status is a 404 for each
def missing_model(name: str) -> str:
    return f"Could not find any versions of model {name}"


def missing_version(name: str, serial: int | str) -> str:
    """``serial`` empty: the hospital's routing had none to give (TF Serving's "latest")."""
    if serial == "":
        return f"Servable not found for request: Latest({name})"
    return f"Servable not found for request: Specific({name}, {serial})"


def missing_label(name: str, label: str) -> str:
    return f"Unrecognized servable version label: {label} of model {name}"


# --- the views -----------------------------------------------------------------------------------

PROTOCOL = "tfserving"


def render_failure(failure: Failure) -> HttpResponse:
    return JsonResponse(error_body(failure.message), status=failure.status)


async def _named_version(*, caller: Caller, name: str, serial: str, label: str) -> ModelVersion:
    """The version a URL names (``/versions/N``, ``/labels/L`` or neither: the hospital's routing),
    under the registry's rule; what the hospital may not use is missing, in TF Serving's words."""
    try:
        if not label:
            return await protocol_version(caller=caller, model_name=name, version=serial)
        found = await sync_to_async(version_for)(tenant=caller.tenant, model_name=name, alias=label, required=True)
    except NotFound as missing:
        if missing.code == "unknown_model":
            raise NotFound(missing_model(name), code=missing.code) from None
        if label:
            raise NotFound(missing_label(name, label), code=missing.code) from None
        raise NotFound(missing_version(name, serial), code=missing.code) from None
    if found is None:  # required: the registry raises rather than answer None
        raise NotFound(missing_label(name, label))
    return found


def _ready_serials(name: str) -> list[int]:
    return list(
        ModelVersion.objects.filter(model__name=name, status=ModelVersion.Status.READY)
        .order_by("serial")
        .values_list("serial", flat=True)
    )


def _version_row(name: str, serial: int) -> ModelVersion:
    return ModelVersion.objects.get(model__name=name, serial=serial)


async def _usable_serials(*, caller: Caller, name: str) -> list[int]:
    """Every ready version of ``name`` this hospital may name, each asked of the one rule."""
    usable = []
    for serial in await sync_to_async(_ready_serials)(name):
        try:
            await protocol_version(caller=caller, model_name=name, version=str(serial))
        except (NotFound, Conflict):
            continue
        usable.append(serial)
    return usable


@csrf_exempt
@protocol_view(render_failure)
async def model_status_view(request: HttpRequest, name: str, serial: str = "", label: str = "") -> HttpResponse:
    """``GET /v1/models/{name}[/versions/{v}|/labels/{l}]``: the versions this hospital may use."""
    if request.method != "GET":
        return render_failure(Failure(HTTPStatus.METHOD_NOT_ALLOWED, "method", "Model status is read with GET."))
    caller = await protocol_caller(request, action=None)
    if serial or label:
        try:
            version = await _named_version(caller=caller, name=name, serial=serial, label=label)
        except Conflict:  # allowed, but still validating or refused: the rule has been asked already
            if not serial:
                raise
            found = await sync_to_async(_version_row)(name, int(serial))
            return JsonResponse(version_not_ready(serial=found.serial, refused=found.refusal_reason))
        return JsonResponse(model_status([version.serial]))
    serials = await _usable_serials(caller=caller, name=name)
    if not serials:
        raise NotFound(missing_model(name))
    return JsonResponse(model_status(serials))


@csrf_exempt
@protocol_view(render_failure)
async def metadata_view(request: HttpRequest, name: str, serial: str = "", label: str = "") -> HttpResponse:
    """``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata``."""
    if request.method != "GET":
        return render_failure(Failure(HTTPStatus.METHOD_NOT_ALLOWED, "method", "Model metadata is read with GET."))
    caller = await protocol_caller(request, action=None)
    version = await _named_version(caller=caller, name=name, serial=serial, label=label)
    return JsonResponse(await sync_to_async(_metadata)(version))


def _metadata(version: ModelVersion) -> dict:
    # sync: a version reached through a pin may not have its model loaded yet
    return model_metadata(facts=ModelFacts.of(version), details=core_metadata(version).description())


def _body(request: HttpRequest) -> object:
    try:
        return json.loads(protocol_body(request))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"JSON Parse error: {exc}", code="json") from None


async def _probabilities(*, caller: Caller, version: ModelVersion, inputs: Inputs) -> tuple[list[list[float]], list]:
    """Each instance's probabilities, in order, and the inference request ids of an image read
    (none for a tensor read, which keeps nothing)."""
    if inputs.tensor is not None:
        answer = await tensor_read(caller=caller, version=version, array=inputs.tensor, protocol=PROTOCOL)
        return [list(map(float, row)) for row in answer], []
    outcomes = await image_read(caller=caller, version=version, images=list(inputs.images), protocol=PROTOCOL)
    failed = [f"instance {i} (request {o.request_id}): {o.error}" for i, o in enumerate(outcomes) if not o.ok]
    if failed:
        raise Unprocessable("The model could not read every instance: " + "; ".join(failed), code="read_failed")
    return [list(outcome.probabilities) for outcome in outcomes], [outcome.request_id for outcome in outcomes]


def _answered(answer: dict, request_ids: list) -> JsonResponse:
    response = JsonResponse(answer)
    if request_ids:
        response[REQUEST_IDS_HEADER] = ",".join(str(pk) for pk in request_ids)
    return response


@csrf_exempt
@protocol_view(render_failure)
async def verb_view(request: HttpRequest, name: str, verb: str, serial: str = "", label: str = "") -> HttpResponse:
    """``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`` (and ``:classify``)."""
    if request.method != "POST":
        return render_failure(Failure(HTTPStatus.METHOD_NOT_ALLOWED, "method", f":{verb} is a POST."))
    caller = await protocol_caller(request)
    version = await _named_version(caller=caller, name=name, serial=serial, label=label)
    if verb == "regress":
        raise Invalid("This model has no regression signature; use :predict or :classify.")
    facts, body = await sync_to_async(ModelFacts.of)(version), _body(request)
    parse = predict_request_parse if verb == "predict" else classify_request_parse
    try:
        inputs = parse(body, facts=facts, max_instances=settings.DATA_UPLOAD_MAX_NUMBER_FILES)
    except FormatError as wrong:
        raise Invalid(str(wrong)) from None
    probabilities, request_ids = await _probabilities(caller=caller, version=version, inputs=inputs)
    if verb == "classify":
        return _answered(classify_response(facts=facts, probabilities=probabilities), request_ids)
    return _answered(predict_response(facts=facts, probabilities=probabilities, columnar=inputs.columnar), request_ids)


def _health(state: str, error_code: str = "OK", message: str = "") -> dict:
    return {"state": state, "status": {"error_code": error_code, "error_message": message}}


async def health_live_view(request: HttpRequest) -> HttpResponse:
    """No token: this process answers. Nothing about hospitals or models."""
    return JsonResponse(_health(STATE_AVAILABLE))


async def health_ready_view(request: HttpRequest) -> HttpResponse:
    """No token: the platform can read (database, broker, a worker serving); yes or no, no details."""
    ok, _ = await sync_to_async(health.readiness)()
    if ok:
        return JsonResponse(_health(STATE_AVAILABLE))
    return JsonResponse(_health("UNAVAILABLE", "UNAVAILABLE", "not ready"), status=HTTPStatus.SERVICE_UNAVAILABLE)


async def not_found_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    return JsonResponse(error_body(f"Malformed request: {request.method} {request.path}"), status=HTTPStatus.NOT_FOUND)
