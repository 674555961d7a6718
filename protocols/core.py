"""What every model-server protocol (KServe v2, TF Serving, TorchServe) shares: who is calling,
which version answers, what a client needs to build an input, and the two kinds of read.

A protocol module only parses its own request format and renders its own answers and errors;
everything below is the same for all three:

- ``await protocol_caller(request, action=...)``: the API's own DRF authenticators (service-account
  keys, JWTs; no sessions, so no CSRF question), its throttle, the hospital (``X-Tenant`` or the
  only one), the role check; the caller's lane (``interactive``).
- ``protocol_version``: ``registry.version_for`` for the caller's hospital; a URL's version may be
  the integer serial (what TF Serving and tritonclient send) or the semantic version.
- ``model_metadata``: labels, the NCHW input shape, datatype and normalisation.
- ``await image_read``: encoded images become image records and inference requests in the
  caller's hospital (the upload path: same checks, limits and access log), read by the workers
  like any upload, answered when the worker's push arrives (the database is the truth).
- ``await tensor_read``: an FP32 tensor, normalised as the metadata says, read by a worker and
  forgotten: audited and counted, no record.
- ``protocol_view``: runs an async view and renders whatever it raised in the protocol's format.

The views are async and wait on the channel layer, so a read waiting for its worker holds no
thread (``protocols/asgi.py`` serves them with async middleware only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from channels.layers import get_channel_layer  # type: ignore[import-untyped]
from django.conf import settings
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from prometheus_client import Counter
from rest_framework import exceptions as drf_exceptions
from rest_framework.authentication import SessionAuthentication
from rest_framework.request import Request
from rest_framework.settings import api_settings

from accounts import events
from accounts.access import member_action_record
from accounts.models import ApiKey, Membership
from accounts.permissions import Action
from accounts.selectors import membership_resolve
from accounts.services import require
from core.body_limit import too_large_body
from core.errors import DomainError, Invalid, NotFound, TooLarge, Unavailable, UnsupportedMedia
from recognition import dicom, health
from recognition.enqueue import task_send
from recognition.models import Image, InferenceRequest, ModelVersion, Result
from recognition.services.admission import interactive_admission
from recognition.services.images import StudyFields, _images_from_bytes, _read_upload, image_check
from recognition.services.inference import inference_queue
from recognition.services.registry import Routing, version_for

from .asgi import run_sync

logger = logging.getLogger(__name__)

Status = InferenceRequest.Status
FINISHED = (Status.DONE, Status.FAILED, Status.CANCELLED)
CHANNELS = 3  # RGB: every registered model takes three channels (core.model_package)
PIXEL_SCALE = 1 / 255  # uint8 pixels → [0, 1] before the mean and std (workers/engine/handler.py)
# the database is looked at again this often while a read waits, should its push be lost
RECHECK_SECONDS = 1.0
TENSOR_TASK = "protocols.tasks.tensor_read"
TENSOR_KEY_PREFIX = "sightline:protocol-tensor:"
TENSOR_KEY_BYTES = 16  # 128 random bits name one tensor read's cache entries
SERVER_ERROR = 500
TENSOR_KEY_MARGIN_SECONDS = 60  # a tensor outlives its wait by this much: a late worker finds it, then nothing

# counted in the web process that answered (``/metrics`` of that process: the reads themselves
# are in the access log, which every replica shares)
TENSOR_READS = Counter(
    "sightline_protocol_tensor_reads",
    "Stateless FP32 tensor reads answered by a model-server protocol, by outcome",
    ["protocol", "outcome"],
    registry=health._registry,
)


class ProtocolTimeout(DomainError):
    """The read did not finish within SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS; it goes on."""

    status, code = 504, "timeout"


# --- who is calling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    membership: Membership
    interactive: bool  # its reads go to the interactive lane (a person waits on them)
    request: HttpRequest  # .user and .auth set as the API's are, for the access log

    @property
    def tenant(self):
        return self.membership.tenant

    @property
    def priority(self) -> int:
        return InferenceRequest.Priority.INTERACTIVE if self.interactive else InferenceRequest.Priority.BULK


def _authenticator_classes() -> list[type]:
    # sessions are left out: a protocol client carries a key or a token, and a browser's cookie
    # must not make a cross-site POST count as the person's (there is no CSRF check here)
    classes: list[type] = list(api_settings.DEFAULT_AUTHENTICATION_CLASSES)  # type: ignore[arg-type]  # imported
    return [cls for cls in classes if not issubclass(cls, SessionAuthentication)]


def _caller(request: HttpRequest, action: Action | None) -> Caller:
    drf = Request(request, authenticators=[cls() for cls in _authenticator_classes()])
    user = drf.user  # runs the authenticators: a refused key or token raises AuthenticationFailed (401)
    if not user.is_authenticated:
        raise drf_exceptions.NotAuthenticated("Authentication credentials were not provided.")
    throttles: list[Any] = list(api_settings.DEFAULT_THROTTLE_CLASSES)  # imported classes, not their names
    for throttle_class in throttles:
        throttle = throttle_class()
        if not throttle.allow_request(drf, None):
            raise drf_exceptions.Throttled(wait=throttle.wait())
    request.user, request.auth = user, drf.auth  # type: ignore[attr-defined]  # what the access log reads
    membership = membership_resolve(user=user, tenant_slug=request.headers.get("X-Tenant"), request=request)
    if action is not None:
        require(membership, action, request=request)  # 403, logged, for a viewer
    if isinstance(drf.auth, ApiKey):
        interactive = drf.auth.service_account.interactive
    else:
        interactive = membership.role in settings.SIGHTLINE_PROTOCOL_INTERACTIVE_ROLES
    return Caller(membership=membership, interactive=interactive, request=request)


async def protocol_caller(request: HttpRequest, *, action: Action | None = Action.IMAGE_UPLOAD) -> Caller:
    """The authenticated member a protocol request acts as (401 / 403 / 404 / 429 as the API's).
    ``action``: what the request does (None: reading model metadata, any member may)."""
    return await run_sync(_caller, request, action)


# --- which version -----------------------------------------------------------------------------


def _version(*, caller: Caller | None, model_name: str, version: str) -> ModelVersion:
    kwargs: dict = {}
    if version.isdigit():
        kwargs["serial"] = int(version)
    elif version:
        kwargs["version"] = version
    tenant = caller.tenant if caller is not None else None
    found = version_for(tenant=tenant, model_name=model_name, required=True, **kwargs)
    if found is None:  # required: version_for raises rather than answer None
        raise NotFound(f"{model_name} has no version to answer.", code="unknown_version")
    return found


async def protocol_version(*, caller: Caller | None, model_name: str, version: str = "") -> ModelVersion:
    """The version that answers: ``version`` as the URL names it (its serial, "1", or its semantic
    version, "1.0.0"), or the hospital's routing when empty. 404 for an unknown model or version
    and for one the hospital may not use (as for another hospital's object), 409 for one not ready."""
    return await run_sync(_version, caller=caller, model_name=model_name, version=version)


# --- what a client needs to know ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: str  # semantic
    serial: int
    labels: tuple[str, ...]
    task: str  # single-label (softmax) or multi-label (one sigmoid per label)
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    framework: str
    ready: bool
    datatype: str = "FP32"
    layout: str = "NCHW"

    @property
    def input_shape(self) -> list[int]:
        """-1: any batch size."""
        return [-1, CHANNELS, self.input_size, self.input_size]

    @property
    def output_shape(self) -> list[int]:
        return [-1, len(self.labels)]

    def preprocessing(self) -> dict:
        """How an FP32 input is made from an image, in words a client can follow."""
        return {
            "color": "RGB",
            "resize": f"{self.input_size}x{self.input_size} bilinear",
            "scale": PIXEL_SCALE,
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": "(pixel / 255 - mean[c]) / std[c]",
            "layout": self.layout,
        }

    def description(self) -> dict:
        """The same facts as a JSON object, for the protocols that carry free-form metadata."""
        return {
            "name": self.name,
            "version": self.version,
            "serial": self.serial,
            "labels": list(self.labels),
            "task": self.task,
            "framework": self.framework,
            "input": {"datatype": self.datatype, "shape": self.input_shape, **self.preprocessing()},
            "output": {"datatype": self.datatype, "shape": self.output_shape, "labels": list(self.labels)},
        }


def model_metadata(version: ModelVersion) -> ModelMetadata:
    manifest = version.manifest
    return ModelMetadata(
        name=version.model.name,
        version=version.version,
        serial=version.serial,
        labels=tuple(manifest.get("labels", ())),
        task=manifest.get("task", "single-label"),
        input_size=int(manifest["input_size"]),
        mean=tuple(float(v) for v in manifest["mean"]),
        std=tuple(float(v) for v in manifest["std"]),
        framework=manifest.get("framework", "torchvision"),
        ready=version.status == ModelVersion.Status.READY,
    )


# --- waiting without a thread ------------------------------------------------------------------


async def _wait(groups: Sequence[str], check: Callable[[], Awaitable[object | None]], timeout: float) -> object | None:
    """``check()``'s first answer that is not None, looked at after each push to ``groups`` (and
    every RECHECK_SECONDS, should a push be lost), or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    layer, channel = get_channel_layer(), None
    try:
        try:
            channel = await layer.new_channel()
            for group in groups:
                await layer.group_add(group, channel)
        except Exception:  # the channel layer away: the database alone answers, checked in turn
            logger.warning("protocol read waits without pushes", exc_info=True)
            channel = None
        while True:
            answer = await check()  # after subscribing: a push sent before it cannot be missed
            if answer is not None:
                return answer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            pause = min(remaining, RECHECK_SECONDS)
            if channel is None:
                await asyncio.sleep(pause)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(layer.receive(channel), timeout=pause)
    finally:
        if channel is not None:
            for group in groups:
                try:
                    await layer.group_discard(group, channel)
                except Exception:  # the group's entry expires by itself
                    logger.debug("could not leave %s", group, exc_info=True)


def _timeout_seconds(asked: float | None = None) -> float:
    """The setting, or less when the client asks for less (e.g. a KServe request's ``timeout``)."""
    limit = float(settings.SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS)
    return limit if asked is None or asked <= 0 else min(limit, asked)


# --- reads of encoded images -------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOutcome:
    """One image's read: its probabilities per label (in the model's label order), or its error."""

    request_id: int
    image_id: int
    labels: tuple[str, ...]
    probabilities: tuple[float, ...] = ()
    top_label: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class _Queued:
    request_ids: list[int] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)


def _image_store(*, caller: Caller, version: ModelVersion, images: list[bytes], protocol: str) -> _Queued:
    """Each image as an upload of the caller's hospital (the same checks, limits and access log),
    its read queued on the caller's lane for ``version``; all or none."""
    if not images:
        raise Invalid("Send at least one image.", code="no_input")
    if len(images) > settings.DATA_UPLOAD_MAX_NUMBER_FILES:
        raise TooLarge(f"Send at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} images in one request.")
    # the version chosen reads every image, on the caller's lane, marked with the protocol
    routing = Routing(version, None, None, priority=caller.priority, protocol=protocol)
    queued = _Queued()

    def audited(stored: list[Image]) -> None:  # inside the upload's own transaction
        for image in stored:
            member_action_record(
                caller.membership,
                f"protocol.{protocol}_read",
                request=caller.request,
                target_type="image",
                target_id=image.pk,
            )

    if caller.interactive:
        interactive_admission()  # 429 while too many interactive reads wait, as for an upload
    # every image checked before any is stored (the upload's byte limit, empty file, format,
    # pixels, damage), so one bad image refuses the request with nothing stored
    checked = [_read_upload(ContentFile(data)) for data in images]
    for data in checked:
        if dicom.looks_like_dicom(data):
            # one answer per input: a DICOM file may be many frames, or be rendered later
            raise UnsupportedMedia("A protocol read takes PNG or JPEG images.", code="unsupported_format")
        image_check(data)
    for data in checked:
        stored = _images_from_bytes(
            membership=caller.membership,
            data=data,
            fields=StudyFields(),
            request=caller.request,
            routing=routing,
            on_stored=audited,
        )
        queued.image_ids.extend(image.pk for image in stored)
    queued.request_ids = list(
        InferenceRequest.objects.for_tenant(caller.tenant)
        .filter(image_id__in=queued.image_ids, model_version=version)
        .order_by("image_id")
        .values_list("id", flat=True)
    )
    return queued


def _outcomes(*, tenant, version: ModelVersion, queued: _Queued) -> list[ReadOutcome] | None:
    """Every read's outcome once all have finished; None while one still waits or runs."""
    rows = dict(
        InferenceRequest.objects.for_tenant(tenant)
        .filter(pk__in=queued.request_ids)
        .values_list("image_id", "status")
        .order_by()
    )
    if len(rows) < len(queued.image_ids) or any(status not in FINISHED for status in rows.values()):
        return None
    errors = dict(
        InferenceRequest.objects.for_tenant(tenant).filter(pk__in=queued.request_ids).values_list("image_id", "error")
    )
    results = {
        result.image_id: result
        for result in Result.objects.for_tenant(tenant).filter(image_id__in=queued.image_ids, model_version=version)
    }
    labels = tuple(version.labels)
    outcomes = []
    for request_id, image_id in zip(queued.request_ids, queued.image_ids, strict=True):
        result = results.get(image_id)
        if result is None:
            error = errors.get(image_id) or f"the read ended {rows[image_id]}"
            outcomes.append(ReadOutcome(request_id, image_id, labels, error=error))
            continue
        probabilities = tuple(float(result.probabilities.get(label, 0.0)) for label in labels)
        outcomes.append(ReadOutcome(request_id, image_id, labels, probabilities, result.top_label))
    return outcomes


async def image_read(
    *, caller: Caller, version: ModelVersion, images: list[bytes], protocol: str, timeout: float | None = None
) -> list[ReadOutcome]:
    """Store and read ``images`` (encoded PNG/JPEG) in the caller's hospital, one outcome each,
    in order; ProtocolTimeout (504, naming the requests and where their results will be) when
    the workers have not answered within SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS (or ``timeout``
    seconds, when the client asked for less)."""
    queued = await run_sync(_image_store, caller=caller, version=version, images=images, protocol=protocol)

    async def check():
        return await run_sync(_outcomes, tenant=caller.tenant, version=version, queued=queued)

    groups = [events.protocol_read_group(pk) for pk in queued.request_ids]
    waited = _timeout_seconds(timeout)
    outcomes = await _wait(groups, check, waited)
    if outcomes is None:
        pages = ", ".join(f"/api/v1/images/{pk}/" for pk in queued.image_ids)
        ids = ", ".join(str(pk) for pk in queued.request_ids)
        raise ProtocolTimeout(
            f"The read did not finish within {waited:g} s; it goes on. "
            f"Request id {ids}: the result will be at {pages} (the platform's API, same credentials).",
            detail={"request_ids": queued.request_ids, "image_ids": queued.image_ids},
        )
    assert isinstance(outcomes, list)
    return outcomes


# --- stateless tensor reads --------------------------------------------------------------------


def tensor_check(array: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """The FP32 input as the model takes it (N, 3, H, W), C-contiguous; 400 in words otherwise."""
    expected = metadata.input_shape[1:]
    if array.ndim == len(expected):  # one image without its batch dimension
        array = array[np.newaxis]
    if array.ndim != len(expected) + 1 or list(array.shape[1:]) != expected or array.shape[0] < 1:
        raise Invalid(
            f"The FP32 input must have shape [N, {', '.join(map(str, expected))}] (the model metadata's "
            f"input), not {list(array.shape)}.",
            code="bad_shape",
        )
    if array.shape[0] > settings.DATA_UPLOAD_MAX_NUMBER_FILES:
        raise TooLarge(f"Send at most {settings.DATA_UPLOAD_MAX_NUMBER_FILES} inputs in one request.")
    if not np.isfinite(array).all():
        raise Invalid("The FP32 input holds NaN or infinite values.", code="bad_values")
    return np.ascontiguousarray(array, dtype="<f4")


def tensor_cache_keys(key: str) -> tuple[str, str]:
    """(the input's cache key, the answer's) for one tensor read."""
    return f"{TENSOR_KEY_PREFIX}{key}:input", f"{TENSOR_KEY_PREFIX}{key}:output"


def _tensor_send(*, caller: Caller, version: ModelVersion, array: np.ndarray, protocol: str) -> str:
    key = secrets.token_hex(TENSOR_KEY_BYTES)
    input_key, _ = tensor_cache_keys(key)
    lifetime = int(_timeout_seconds()) + TENSOR_KEY_MARGIN_SECONDS
    with transaction.atomic():
        member_action_record(
            caller.membership,
            "protocol.tensor_read",
            request=caller.request,
            target_type="model_version",
            target_id=version.pk,
        )
        try:  # pixels travel through the cache, never in the task message
            cache.set(input_key, {"shape": list(array.shape), "data": array.tobytes()}, lifetime)
        except Exception as exc:
            raise Unavailable(
                "The read cannot be queued right now; try again shortly.", code="cache_unavailable"
            ) from exc
        queue = inference_queue(caller.priority)
        transaction.on_commit(lambda: task_send(TENSOR_TASK, args=[key, version.pk], queue=queue), robust=True)
    return key


async def tensor_read(
    *, caller: Caller, version: ModelVersion, array: np.ndarray, protocol: str, timeout: float | None = None
) -> np.ndarray:
    """Probabilities (N, labels) for an FP32 input, computed by a worker on the caller's lane.
    Nothing is recorded but the access-log entry; the input is dropped from the cache once read."""
    metadata = model_metadata(version)
    array = tensor_check(array, metadata)
    key = await run_sync(_tensor_send, caller=caller, version=version, array=array, protocol=protocol)
    _, output_key = tensor_cache_keys(key)

    async def answered():
        return await run_sync(cache.get, output_key)

    waited = _timeout_seconds(timeout)
    answer = await _wait([events.protocol_tensor_group(key)], answered, waited)
    if answer is None:
        TENSOR_READS.labels(protocol, "timeout").inc()
        raise ProtocolTimeout(
            f"The read did not finish within {waited:g} s (tensor read {key}); "
            "a tensor read keeps nothing, so send it again.",
            detail={"request_ids": [key]},
        )
    await run_sync(cache.delete, output_key)
    assert isinstance(answer, dict)
    if answer.get("error"):
        TENSOR_READS.labels(protocol, "failed").inc()
        raise Unavailable(f"The model could not read the input: {answer['error']}", code="read_failed")
    TENSOR_READS.labels(protocol, "done").inc()
    return np.asarray(answer["probabilities"], dtype=np.float32)


# --- request bodies ----------------------------------------------------------------------------


def protocol_body(request: HttpRequest) -> bytes:
    """The whole body, within the platform's request limit (SIGHTLINE_MAX_REQUEST_BYTES, which the
    ASGI layer enforces first), not Django's form-data limit: a tensor or a batch of images is
    larger than a form, and each image is checked against the upload limits on its own."""
    limit = settings.SIGHTLINE_MAX_REQUEST_BYTES
    body = request.read(limit + 1)
    if len(body) > limit:
        raise TooLarge(too_large_body(limit)["error"]["message"])
    return body


# --- answering in the protocol's own format ----------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """What went wrong, for a protocol to render in its own format."""

    status: int
    code: str
    message: str
    detail: object = None
    headers: dict[str, str] = field(default_factory=dict)


def failure_of(exc: Exception) -> Failure | None:
    """A domain error or DRF's own (authentication, throttling) as a Failure; None for a bug."""
    if isinstance(exc, DomainError):
        return Failure(exc.status, exc.code, exc.message, exc.detail, dict(exc.headers))
    if isinstance(exc, drf_exceptions.APIException):
        headers = {}
        if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
            headers["WWW-Authenticate"] = 'Bearer realm="api"'
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(int(wait))
        codes = exc.get_codes()
        return Failure(exc.status_code, codes if isinstance(codes, str) else "invalid", str(exc.detail), None, headers)
    return None


Renderer = Callable[[Failure], HttpResponse]
View = Callable[..., Any]  # an async view (Django's stubs know sync views only)


def protocol_view(render: Renderer) -> Callable[[View], View]:
    """An async view whose refusals (domain errors, DRF's 401/429) are answered by ``render``."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            try:
                return await view(request, *args, **kwargs)
            except Exception as exc:
                failure = failure_of(exc)
                if failure is None:  # a bug: logged with its traceback, answered in the protocol's shape
                    logger.exception("protocol request %s failed", getattr(request, "request_id", ""))
                    failure = Failure(SERVER_ERROR, "server_error", "Something went wrong on our side.")
                response = render(failure)
                for name, value in failure.headers.items():
                    response[name] = value
                return response

        return wrapped

    return decorate
