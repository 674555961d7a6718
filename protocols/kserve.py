"""The Open Inference Protocol (KServe v2) over REST, as Triton's ``tritonclient.http`` speaks it.

- ``GET /v2/health/live``, ``GET /v2/health/ready``: no token; they say nothing about hospitals or
  models (ready: the database and the broker answer).
- ``GET /v2``: server metadata, with the extensions this server has.
- ``GET /v2/models/{name}[/versions/{v}]``, ``…/ready``: model metadata (labels, shapes,
  normalisation: enough to build an FP32 input) and readiness; a token.
- ``POST /v2/models/{name}[/versions/{v}]/infer``: one input, either ``BYTES`` (encoded PNG/JPEG,
  one per batch element: a real read, in the caller's hospital) or ``FP32`` of the model's input
  shape (a stateless read); outputs ``probabilities`` (FP32 [N, labels]) and ``label`` (BYTES [N]).
  JSON tensors or the binary tensor data extension (``Inference-Header-Content-Length``), both
  ways; in JSON a ``BYTES`` element carrying an image is its base64 text.

``{v}`` is the version's serial (what tritonclient sends: "1") or its semantic version. Errors
are ``{"error": "..."}`` with the HTTP status, as the protocol has them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core.errors import Conflict, Invalid, Unprocessable
from recognition.health import readiness

from . import core

PROTOCOL = "kserve"
SERVER_NAME = "sightline"
SERVER_VERSION = "1"  # the platform's API version (/api/v1/)
EXTENSIONS = ["binary_tensor_data"]  # the only extension served (no repository, shared memory, statistics)
IMAGE_DATATYPE, TENSOR_DATATYPE = "BYTES", "FP32"
PROBABILITIES, LABEL = "probabilities", "label"
OUTPUTS = (PROBABILITIES, LABEL)
HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES_PREFIX = struct.Struct("<I")  # each BYTES element: its length, 4-byte little-endian, then the bytes
FP32_BYTES = 4


def _error(failure: core.Failure) -> HttpResponse:
    return JsonResponse({"error": failure.message}, status=failure.status)


view = core.protocol_view(_error)


def _method(request: HttpRequest, allowed: str) -> None:
    if request.method != allowed:
        raise _NotAllowed(f"{request.method} is not allowed here; use {allowed}.")


class _NotAllowed(Invalid):
    status, code = 405, "method_not_allowed"


# --- health and server metadata (no token) -----------------------------------------------------


@csrf_exempt
@view
async def health_live(request: HttpRequest) -> HttpResponse:
    _method(request, "GET")
    return JsonResponse({"live": True})


@csrf_exempt
@view
async def health_ready(request: HttpRequest) -> HttpResponse:
    _method(request, "GET")
    _, checks = await core.run_sync(readiness)
    ready = checks["database"]["ok"] and checks["broker"]["ok"]
    return JsonResponse({"ready": ready}, status=200 if ready else 503)


@csrf_exempt
@view
async def server_metadata(request: HttpRequest) -> HttpResponse:
    _method(request, "GET")
    return JsonResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


@csrf_exempt
@view
async def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    return JsonResponse({"error": "Not found."}, status=404)


# --- model metadata and readiness (a token) ----------------------------------------------------


def metadata_body(metadata: core.ModelMetadata) -> dict:
    return {
        "name": metadata.name,
        "versions": [str(metadata.serial)],
        "platform": f"sightline_{metadata.framework}",
        "inputs": [
            {"name": "input", "datatype": TENSOR_DATATYPE, "shape": metadata.input_shape},
            {"name": "image", "datatype": IMAGE_DATATYPE, "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": TENSOR_DATATYPE, "shape": metadata.output_shape},
            {"name": LABEL, "datatype": IMAGE_DATATYPE, "shape": [-1]},
        ],
        # what the tensors mean: labels in output order, the input's preprocessing, both versions
        "parameters": metadata.description(),
    }


@csrf_exempt
@view
async def model_metadata(request: HttpRequest, name: str, version: str = "") -> HttpResponse:
    _method(request, "GET")
    caller = await core.protocol_caller(request, action=None)
    found = await core.protocol_version(caller=caller, model_name=name, version=version)
    return JsonResponse(metadata_body(core.model_metadata(found)))


@csrf_exempt
@view
async def model_ready(request: HttpRequest, name: str, version: str = "") -> HttpResponse:
    _method(request, "GET")
    caller = await core.protocol_caller(request, action=None)
    try:
        found = await core.protocol_version(caller=caller, model_name=name, version=version)
    except Conflict:  # registered, still being checked or refused: not ready (404s stay 404s)
        return JsonResponse({"name": name, "ready": False}, status=400)
    return JsonResponse({"name": name, "ready": found.status == found.Status.READY})


# --- inference ---------------------------------------------------------------------------------


def _elements(shape: list[int]) -> int:
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise Invalid(f"A tensor's shape is a list of non-negative integers, not {shape!r}.", code="bad_shape")
    return math.prod(shape)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: length-prefixed elements, end to end."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + BYTES_PREFIX.size > len(raw):
            raise Invalid("A BYTES tensor's binary data ends inside an element's length.", code="bad_bytes")
        (length,) = BYTES_PREFIX.unpack_from(raw, offset)
        offset += BYTES_PREFIX.size
        if offset + length > len(raw):
            raise Invalid("A BYTES tensor's binary data ends inside an element.", code="bad_bytes")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _flat(data) -> list:
    if isinstance(data, list):
        return [item for part in data for item in _flat(part)]
    return [data]


def _b64(text) -> bytes:
    if not isinstance(text, str):
        raise Invalid("In JSON, a BYTES element carrying an image is its base64 text.", code="bad_bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Invalid("In JSON, a BYTES element carrying an image is its base64 text.", code="bad_bytes") from exc


class Parsed:
    """An infer request: its one input (images or a tensor) and the outputs it asks for."""

    def __init__(self, header: dict, images: list[bytes] | None, tensor: np.ndarray | None, outputs: list):
        self.header, self.images, self.tensor, self.outputs = header, images, tensor, outputs


def parse_infer(body: bytes, header_length: str | None) -> Parsed:
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise Invalid(f"{HEADER_LENGTH} must be the length of the JSON part of the body.", code="bad_header")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        json_part, binary = body, b""
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid(f"The inference request is not JSON: {exc}", code="bad_json") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise Invalid('An inference request names its inputs: {"inputs": [...]}.', code="no_input")
    if len(header["inputs"]) != 1:
        raise Invalid(
            "Send one input: a BYTES tensor of encoded images, or an FP32 tensor of the model's input shape.",
            code="one_input",
        )
    offset, images, tensor = 0, None, None
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise Invalid("Each input is an object with name, datatype, shape and data.", code="bad_input")
        datatype, shape = spec.get("datatype"), spec.get("shape") or []
        count = _elements(shape)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise Invalid("An input's binary_data_size runs past the end of the body.", code="bad_binary")
            raw, offset = binary[offset : offset + size], offset + size
        elif "data" not in spec:
            raise Invalid(f"The input {spec.get('name')!r} has no data.", code="no_data")
        if datatype == IMAGE_DATATYPE:
            images = _bytes_elements(raw) if raw is not None else [_b64(item) for item in _flat(spec["data"])]
            if len(images) != count:
                raise Invalid(f"The BYTES input has {len(images)} elements; its shape says {count}.", code="bad_shape")
        elif datatype == TENSOR_DATATYPE:
            if raw is not None:
                if len(raw) != count * FP32_BYTES:
                    raise Invalid(
                        f"The FP32 input has {len(raw)} bytes; its shape needs {count * FP32_BYTES}.", code="bad_shape"
                    )
                values = np.frombuffer(raw, dtype="<f4")
            else:
                try:
                    values = np.asarray(_flat(spec["data"]), dtype=np.float32)
                except (TypeError, ValueError) as exc:
                    raise Invalid("The FP32 input's data are not numbers.", code="bad_data") from exc
                if values.size != count:
                    raise Invalid(f"The FP32 input has {values.size} values; its shape says {count}.", code="bad_shape")
            tensor = values.reshape(shape)
        else:
            raise Invalid(
                f"The input's datatype is {datatype!r}; send BYTES (encoded images) or FP32 (a tensor).",
                code="bad_datatype",
            )
    return Parsed(header, images, tensor, _outputs(header))


def _outputs(header: dict) -> list[tuple[str, bool]]:
    """(name, binary) for each output to send: those asked for, else all."""
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    asked = header.get("outputs")
    if not asked:
        return [(name, binary_default) for name in OUTPUTS]
    chosen = []
    for spec in asked:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise Invalid(f"There is no output {name!r}; the outputs are {', '.join(OUTPUTS)}.", code="bad_output")
        chosen.append((name, bool((spec.get("parameters") or {}).get("binary_data", binary_default))))
    return chosen


def _bytes_binary(items: list[bytes]) -> bytes:
    return b"".join(BYTES_PREFIX.pack(len(item)) + item for item in items)


def infer_response(
    *, metadata: core.ModelMetadata, parsed: Parsed, probabilities: np.ndarray, parameters: dict | None = None
) -> HttpResponse:
    labels = [metadata.labels[int(row.argmax())] for row in probabilities] if len(probabilities) else []
    outputs, chunks = [], []
    for name, binary in parsed.outputs:
        if name == PROBABILITIES:
            tensor = {"name": name, "datatype": TENSOR_DATATYPE, "shape": list(probabilities.shape)}
            raw = probabilities.astype("<f4").tobytes()
            data: list = probabilities.astype(np.float32).ravel().tolist()
        else:
            tensor = {"name": name, "datatype": IMAGE_DATATYPE, "shape": [len(labels)]}
            raw, data = _bytes_binary([label.encode() for label in labels]), labels
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": metadata.name, "model_version": str(metadata.serial), "outputs": outputs}
    if "id" in parsed.header:
        body["id"] = parsed.header["id"]
    if parameters:
        body["parameters"] = parameters
    encoded = json.dumps(body).encode()
    if not chunks:
        return HttpResponse(encoded, content_type="application/json")
    response = HttpResponse(encoded + b"".join(chunks), content_type="application/octet-stream")
    response[HEADER_LENGTH] = str(len(encoded))
    return response


MICROSECONDS = 1_000_000


def _parsed(request: HttpRequest) -> Parsed:
    return parse_infer(core.protocol_body(request), request.headers.get(HEADER_LENGTH))


def _timeout(header: dict) -> float | None:
    """The request's ``parameters.timeout`` (microseconds, as tritonclient's ``timeout=`` sends it)
    in seconds: a client may wait less than SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS, never more."""
    value = (header.get("parameters") or {}).get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid("The timeout parameter is a whole number of microseconds.", code="bad_timeout")
    return value / MICROSECONDS


@csrf_exempt
@view
async def infer(request: HttpRequest, name: str, version: str = "") -> HttpResponse:
    _method(request, "POST")
    caller = await core.protocol_caller(request)  # a viewer may not: 403
    found = await core.protocol_version(caller=caller, model_name=name, version=version)
    if request.headers.get("Content-Encoding", "identity") != "identity":
        raise Invalid("Compressed request bodies are not accepted; send the body as it is.", code="compressed")
    parsed = await core.run_sync(_parsed, request)  # reading and decoding the body: off the event loop
    metadata = core.model_metadata(found)
    timeout = _timeout(parsed.header)
    if parsed.tensor is not None:
        probabilities = await core.tensor_read(
            caller=caller, version=found, array=parsed.tensor, protocol=PROTOCOL, timeout=timeout
        )
        return infer_response(metadata=metadata, parsed=parsed, probabilities=probabilities)
    assert parsed.images is not None
    outcomes = await core.image_read(
        caller=caller, version=found, images=parsed.images, protocol=PROTOCOL, timeout=timeout
    )
    failed = [(i, outcome) for i, outcome in enumerate(outcomes) if not outcome.ok]
    if failed:
        words = "; ".join(f"image {i} (request {o.request_id}): {o.error}" for i, o in failed)
        raise Unprocessable(f"Not every image could be read: {words}.", code="read_failed")
    probabilities = np.asarray([outcome.probabilities for outcome in outcomes], dtype=np.float32)
    ids = {
        "request_ids": [outcome.request_id for outcome in outcomes],
        "image_ids": [outcome.image_id for outcome in outcomes],
    }
    return infer_response(metadata=metadata, parsed=parsed, probabilities=probabilities, parameters=ids)
