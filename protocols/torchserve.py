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
from http import HTTPStatus
from pathlib import PurePath

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core.errors import Conflict, Forbidden, Invalid, NotFound, Unprocessable
from protocols.core import Caller, Failure, image_read, protocol_body, protocol_caller, protocol_version, protocol_view
from protocols.core import model_metadata as core_metadata
from recognition import health
from recognition.models import AIModel, ModelVersion

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


# --- the views -----------------------------------------------------------------------------------

PROTOCOL = "torchserve"
REQUEST_IDS_HEADER = "X-Inference-Request-Ids"  # an image read's record, for a client that looks again
ALL_VERSIONS = "all"


def _json(body: object, status: int = HTTPStatus.OK) -> JsonResponse:
    return JsonResponse(body, status=status, safe=False)


def render_failure(failure: Failure) -> HttpResponse:
    return _json(error_body(failure.status, failure.message), status=failure.status)


async def _version(*, caller: Caller, name: str, version: str) -> ModelVersion:
    """The version that answers (the hospital's routing when ``version`` is empty), under the
    registry's rule; what the hospital may not use is missing, in TorchServe's words."""
    try:
        return await protocol_version(caller=caller, model_name=name, version=version)
    except NotFound as missing:
        if missing.code == "unknown_model" or not version:
            raise NotFound(missing_model(name), code=missing.code) from None
        raise NotFound(missing_version(name, version), code=missing.code) from None


def _multipart(request: HttpRequest) -> tuple[dict[str, bytes], dict[str, str]]:
    files = {name: upload.read() for name in request.FILES if (upload := request.FILES.get(name)) is not None}
    return files, {name: str(request.POST.get(name, "")) for name in request.POST}


@csrf_exempt
@protocol_view(render_failure)
async def predictions_view(request: HttpRequest, name: str, version: str = "") -> HttpResponse:
    """``POST /predictions/{model}[/{version}]`` (PUT too, as ``curl -T`` sends): one image."""
    if request.method not in ("POST", "PUT"):
        return render_failure(Failure(HTTPStatus.METHOD_NOT_ALLOWED, "method", "Predictions are POSTed."))
    caller = await protocol_caller(request)
    chosen = await _version(caller=caller, name=name, version=version)
    multipart = request.content_type == "multipart/form-data"
    files, fields = await sync_to_async(_multipart)(request) if multipart else ({}, {})
    try:
        data = prediction_input(
            body=b"" if multipart else protocol_body(request), multipart=multipart, files=files, fields=fields
        )
    except FormatError as wrong:
        raise Invalid(str(wrong)) from None
    (outcome,) = await image_read(caller=caller, version=chosen, images=[data], protocol=PROTOCOL)
    if not outcome.ok:
        raise Unprocessable(
            f"The model could not read the image (request {outcome.request_id}): {outcome.error}", code="read_failed"
        )
    response = _json(prediction_response(labels=outcome.labels, probabilities=list(outcome.probabilities)))
    response[REQUEST_IDS_HEADER] = str(outcome.request_id)
    return response


def _model_names() -> list[str]:
    return list(AIModel.objects.order_by("name").values_list("name", flat=True))


def _ready_versions(name: str) -> list[str]:
    return list(
        ModelVersion.objects.filter(model__name=name, status=ModelVersion.Status.READY)
        .order_by("serial")
        .values_list("version", flat=True)
    )


async def _usable(*, caller: Caller, name: str) -> list[ModelVersion]:
    """Every ready version of ``name`` this hospital may name, each asked of the one rule."""
    usable = []
    for version in await sync_to_async(_ready_versions)(name):
        try:
            usable.append(await protocol_version(caller=caller, model_name=name, version=version))
        except (NotFound, Conflict):
            continue
    return usable


def _package_name(version: ModelVersion) -> str:
    return PurePath(version.package.name or "").name


def _workers(version: ModelVersion) -> list[WorkerFacts]:
    try:
        alive = health.workers_alive()
    except Exception:  # Redis away: no worker can be seen, none is listed
        return []
    return [
        WorkerFacts(id=str(i), gpu=str(worker.get("device", "")).startswith("cuda"),
                    loaded=version.weights_sha256 in worker.get("models", []))
        for i, worker in enumerate(alive, start=1)
    ]  # fmt: skip


def _describe(version: ModelVersion) -> dict:
    """Sync: it reads the version's model and the workers' heartbeats (Redis)."""
    manifest = version.manifest
    return model_description(
        name=version.model.name,
        version=version.version,
        serial=version.serial,
        package_name=_package_name(version),
        batch_size=manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE,
        max_batch_delay_ms=float(manifest.get("max_wait_ms") or settings.SIGHTLINE_MAX_WAIT_MS),
        response_timeout_s=float(settings.SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS),
        workers=_workers(version),
        details=core_metadata(version).description(),
    )


def _refuse_management(request: HttpRequest) -> None:
    if request.method != "GET":
        raise Forbidden(MANAGEMENT_REFUSED, code="read_only")


@csrf_exempt
@protocol_view(render_failure)
async def models_view(request: HttpRequest) -> HttpResponse:
    """``GET /models``: the models this hospital may use, each with the package that answers it."""
    caller = await protocol_caller(request, action=None)
    _refuse_management(request)
    listed = []
    for name in await sync_to_async(_model_names)():
        try:
            chosen = await protocol_version(caller=caller, model_name=name)
        except (NotFound, Conflict):
            continue
        listed.append((name, _package_name(chosen)))
    try:
        page = models_page(listed, limit=request.GET.get("limit"), next_page_token=request.GET.get("next_page_token"))
    except FormatError as wrong:
        raise Invalid(str(wrong)) from None
    return _json(page)


@csrf_exempt
@protocol_view(render_failure)
async def model_view(request: HttpRequest, name: str, version: str = "") -> HttpResponse:
    """``GET /models/{model}`` (the version that answers this hospital), ``/models/{model}/{version}``
    or ``/models/{model}/all`` (every version it may use)."""
    caller = await protocol_caller(request, action=None)
    _refuse_management(request)
    if version == ALL_VERSIONS:
        versions = await _usable(caller=caller, name=name)
        if not versions:
            raise NotFound(missing_model(name))
    else:
        versions = [await _version(caller=caller, name=name, version=version)]
    return _json([await sync_to_async(_describe)(chosen) for chosen in versions])


@csrf_exempt
@protocol_view(render_failure)
async def management_view(request: HttpRequest, name: str, version: str) -> HttpResponse:
    """``PUT /models/{model}/{version}/set-default`` and the like: staff's, not a client's."""
    await protocol_caller(request, action=None)
    raise Forbidden(MANAGEMENT_REFUSED, code="read_only")


async def ping_view(request: HttpRequest) -> HttpResponse:
    """No token: healthy when the platform can read (database, broker, a worker serving). Yes or
    no, nothing about hospitals or models."""
    ok, _ = await sync_to_async(health.readiness)()
    if ok:
        return _json({"status": "Healthy"})
    return _json({"status": "Unhealthy"}, status=HTTPStatus.INTERNAL_SERVER_ERROR)


async def not_found_view(request: HttpRequest, rest: str = "") -> HttpResponse:
    return _json(error_body(HTTPStatus.NOT_FOUND, f"Requested resource is not found: {request.path}",
                            type_="ResourceNotFoundException"), status=HTTPStatus.NOT_FOUND)  # fmt: skip
