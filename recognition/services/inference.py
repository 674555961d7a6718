"""The web side of an AI read: which version reads a hospital's upload, and the request queued
after commit. The worker side (claim, batch, forward, store) is ``workers/runner.py``."""

from __future__ import annotations

import logging
from dataclasses import replace

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from core.errors import Unavailable

from ..enqueue import task_send
from ..models import Image, InferenceRequest, ModelVersion
from .registry import Routing, model_routing, version_for

logger = logging.getLogger(__name__)
INFER_TASK = "workers.tasks.infer"
# How long a wake-up's marker lives (see inference_enqueue): a wake-up lost with its marker
# still set delays the version's next one at most this long (beat's reconciliation wakes what
# waits within a minute regardless); one found still pending after it only costs a spare message.
WAKE_PENDING_SECONDS = 10


def upload_routing(
    *,
    tenant,
    model_name: str = "",
    version: str = "",
    alias: str = "",
    serial: int | None = None,
    priority: int = InferenceRequest.Priority.INTERACTIVE,
    protocol: str = "",
) -> Routing:
    """The hospital's routing for uploads, or 503 (before anything is stored) without a model.

    A named ``version``, ``serial`` or ``alias`` (the upload API's choice, a protocol's URL) is
    checked by ``version_for``'s rule (404 for one the hospital may not use, 409 not ready) and
    reads every image of the upload; otherwise the hospital's pin, split or production alias
    does. ``priority`` and ``protocol`` say how the reads are queued."""
    name = model_name or settings.SIGHTLINE_DEFAULT_MODEL
    routing = model_routing(tenant=tenant, model_name=name)
    if version or alias or serial is not None:
        chosen = version_for(
            tenant=tenant, model_name=name, version=version, alias=alias, serial=serial, routing=routing, required=True
        )
        routing = Routing(chosen, None, None)
    elif version_for(routing=routing) is None:
        if model_name:
            version_for(tenant=tenant, model_name=name, routing=routing, required=True)  # 404 in words
        raise Unavailable(
            "No production model is registered yet, so images cannot be read. "
            "Platform staff register one with `manage.py build_demo_model` or `register_model`.",
            code="no_model",
        )
    return replace(routing, priority=priority, protocol=protocol)


def inference_request_create(
    *,
    image: Image,
    model_version: ModelVersion,
    priority: int = InferenceRequest.Priority.INTERACTIVE,
    protocol: str = "",
) -> InferenceRequest:
    request = InferenceRequest.objects.create(
        tenant=image.tenant, image=image, model_version=model_version, priority=priority, protocol=protocol
    )
    # robust: a broker outage must not undo a committed upload; the request stays queued in
    # the database, which is what re-enqueueing reads
    transaction.on_commit(
        lambda: inference_enqueue(request.pk, priority, model_version_id=model_version.pk), robust=True
    )
    return request


def inference_queue(priority: int) -> str:
    """The broker queue (the lane) a request of this priority is sent on."""
    return "interactive" if priority == InferenceRequest.Priority.INTERACTIVE else "bulk"


def _wake_marker(model_version_id: int, queue: str) -> str:
    return f"sightline:wake:{queue}:{model_version_id}"


def inference_enqueue(
    request_id: int,
    priority: int = InferenceRequest.Priority.INTERACTIVE,
    countdown: float | None = None,
    *,
    model_version_id: int | None = None,
) -> bool:
    """Wake a worker for a queued request. With the broker away the request stays queued in the
    database: a worker's start-up, or beat's reconciliation within a minute, wakes it.

    Given the request's ``model_version_id``, wake-ups coalesce: one waits on each lane for each
    version at a time (a marker in the shared cache, set only if absent). The worker that takes
    it clears the marker before it claims (``inference_wake_taken``), and a task claims
    everything its version has waiting, so a request that found a wake-up on its way is claimed
    by that one. Under load this sends one message per batch rather than one per upload (each
    cost the web ≈1.3 core-ms and the worker a no-op task). A delayed wake-up (``countdown``)
    never coalesces: a request must not wait for another's backoff."""
    queue = inference_queue(priority)
    if model_version_id is not None and countdown is None:
        try:
            if not cache.add(_wake_marker(model_version_id, queue), 1, WAKE_PENDING_SECONDS):
                return True  # one is on its way: it claims this request too
        except Exception:  # the cache away: send one as if none were on its way
            logger.warning("wake-up marker not readable; sending a wake-up", exc_info=True)
    return task_send(INFER_TASK, args=[request_id], queue=queue, countdown=countdown)


def inference_wake_taken(*, model_version_id: int, priority: int) -> None:
    """A worker took a wake-up for this version and lane: the next request sends a new one.
    Called before the worker claims, so nothing queued after it is left without a wake-up."""
    try:
        cache.delete(_wake_marker(model_version_id, inference_queue(priority)))
    except Exception:  # the marker expires by itself after WAKE_PENDING_SECONDS
        logger.warning("wake-up marker not cleared", exc_info=True)
