"""TorchServe's inference API and the read-only part of its management API, over the shared core
(https://pytorch.org/serve/inference_api.html, https://pytorch.org/serve/management_api.html).

- ``POST /predictions/{model}[/{version}]``: the image as the body (``curl -T scan.png`` or
  ``--data-binary @scan.png``) or multipart (``curl -F data=@scan.png``); an image read, answered
  ``{label: probability, …}``, the five most probable first, as TorchServe's ``image_classifier``
  handler answers. ``version`` is the semantic version (``1.0.0``) or the integer serial.
- ``GET /models``, ``GET /models/{model}[/{version}|/all]``: descriptions in the management
  format, the parts that mean something here. Registering, scaling and unregistering stay with
  platform staff: those verbs answer 403 in TorchServe's error shape.
- ``GET /ping``: ``{"status": "Healthy"}``, no token, nothing about hospitals or models.

This module holds the formats (pure functions, tested without a server) and the views.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

TOP_K = 5  # TorchServe's image_classifier handler answers its five most probable classes
# the form fields TorchServe's handlers read the input from, in their order
INPUT_FIELDS = ("data", "body")
MODELS_PAGE_DEFAULT = 100  # TorchServe's default page of GET /models
MODELS_PAGE_MAX = 1000
RUNTIME = "python"

# TorchServe's error types (its frontend's exception class names), by status
ERROR_TYPES = {
    400: "BadRequestException",
    401: "UnauthorizedException",
    403: "ForbiddenException",
    404: "ModelNotFoundException",
    405: "MethodNotAllowedException",
    409: "ConflictStatusException",
    413: "RequestEntityTooLargeException",
    415: "UnsupportedMediaTypeException",
    422: "BadRequestException",
    429: "ServiceUnavailableException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
    504: "RequestTimeoutException",
}
MANAGEMENT_REFUSED = "Model registration, scaling and removal stay with the platform's staff: this API is read-only."


class FormatError(ValueError):
    """The request is not one this API reads: a 400 in TorchServe's shape."""


def error_body(status: int, message: str, *, type_: str = "") -> dict:
    return {"code": status, "type": type_ or ERROR_TYPES.get(status, "InternalServerException"), "message": message}


def missing_model(name: str) -> str:
    return f"Model not found: {name}"


def missing_version(name: str, version: str) -> str:
    return f"Model version: {version} does not exist for model: {name}"


# --- reading a request ---------------------------------------------------------------------------


def _text_input(value: str) -> bytes:
    """A form field holding the image as text: base64, as TorchServe's vision handler reads it."""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("The form field holds text that is not a base64 image; send the file itself.") from None


def prediction_input(*, body: bytes, multipart: bool, files: dict[str, bytes], fields: dict[str, str]) -> bytes:
    """The one image of a prediction request: the ``data`` or ``body`` part of a multipart form
    (a file, or base64 text), else its only file; else the raw body."""
    if multipart:
        for name in INPUT_FIELDS:
            if name in files:
                data = files[name]
                break
            if name in fields:
                data = _text_input(fields[name])
                break
        else:
            if len(files) != 1:
                raise FormatError(
                    "Send the image as the form field 'data' (curl -F data=@scan.png)"
                    + (f"; got the files {', '.join(sorted(files))}." if files else ".")
                )
            data = next(iter(files.values()))
    else:
        data = body
    if not data:
        raise FormatError("Invalid input: the request holds no image (curl -T scan.png or -F data=@scan.png).")
    return data


# --- shaping an answer ---------------------------------------------------------------------------


def prediction_response(*, labels: tuple[str, ...] | list[str], probabilities: list[float]) -> dict[str, float]:
    """``{label: probability}``, the ``TOP_K`` most probable, most probable first (a dict keeps
    its order in JSON)."""
    pairs = sorted(zip(labels, (float(p) for p in probabilities), strict=True), key=lambda pair: -pair[1])
    return dict(pairs[:TOP_K])


@dataclass(frozen=True)
class WorkerFacts:
    """A worker as the management API shows one: an ordinal, not a host name."""

    id: str
    gpu: bool
    loaded: bool  # it holds this version in memory now


def model_description(
    *,
    name: str,
    version: str,
    serial: int,
    package_name: str,
    batch_size: int,
    max_batch_delay_ms: float,
    response_timeout_s: float,
    workers: list[WorkerFacts],
    details: dict | None = None,
) -> dict:
    """One entry of ``GET /models/{model}``'s list. Workers load a version when its first
    request comes (``minWorkers`` 0, ``loadedAtStartup`` false); ``maxWorkers`` counts the
    workers alive now, ``workers`` lists those, READY where the version is in memory."""
    return {
        "modelName": name,
        "modelVersion": version,
        "modelUrl": package_name,
        "runtime": RUNTIME,
        "minWorkers": 0,
        "maxWorkers": len(workers),
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": response_timeout_s,
        "loadedAtStartup": False,
        "workers": [
            {"id": worker.id, "status": "READY" if worker.loaded else "UNLOADED", "gpu": worker.gpu}
            for worker in workers
        ],
        "serial": serial,
        **({"metadata": details} if details else {}),
    }


def models_page(models: list[tuple[str, str]], *, limit: object, next_page_token: object) -> dict:
    """``GET /models``: ``(name, package name)`` pairs, ``limit`` at a time from the
    ``next_page_token`` offset, as TorchServe pages them."""
    try:
        size = MODELS_PAGE_DEFAULT if limit in (None, "") else int(str(limit))
        start = 0 if next_page_token in (None, "") else int(str(next_page_token))
    except ValueError:
        raise FormatError("limit and next_page_token are whole numbers.") from None
    if not 1 <= size <= MODELS_PAGE_MAX or start < 0:
        raise FormatError(f"limit is 1 to {MODELS_PAGE_MAX}; next_page_token is not negative.")
    page = sorted(models)[start : start + size]
    answer: dict = {}
    if start + size < len(models):
        answer["nextPageToken"] = str(start + size)
    answer["models"] = [{"modelName": name, "modelUrl": url} for name, url in page]
    return answer
