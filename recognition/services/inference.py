"""The web side of an AI read: which version reads a hospital's upload, and the request queued
after commit. The worker side (claim, batch, forward, store) is ``workers/runner.py``."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from config.errors import Unavailable

from ..enqueue import task_send
from ..models import Image, InferenceRequest, ModelVersion
from .registry import Routing, model_routing

INFER_TASK = "workers.tasks.infer"


def upload_routing(*, tenant) -> Routing:
    """The hospital's routing for uploads, or 503 (before anything is stored) without a model."""
    routing = model_routing(tenant=tenant, model_name=settings.SIGHTLINE_DEFAULT_MODEL)
    if routing.version_for(None) is None:
        raise Unavailable(
            "No production model is registered yet, so images cannot be read. "
            "Platform staff register one with `manage.py build_demo_model` or `register_model`.",
            code="no_model",
        )
    return routing


def inference_request_create(
    *, image: Image, model_version: ModelVersion, priority: int = InferenceRequest.Priority.INTERACTIVE
) -> InferenceRequest:
    request = InferenceRequest.objects.create(
        tenant=image.tenant, image=image, model_version=model_version, priority=priority
    )
    # robust: a broker outage must not undo a committed upload; the request stays queued in
    # the database, which is what re-enqueueing reads
    transaction.on_commit(lambda: inference_enqueue(request.pk, priority), robust=True)
    return request


def inference_queue(priority: int) -> str:
    """The broker queue (the lane) a request of this priority is sent on."""
    return "interactive" if priority == InferenceRequest.Priority.INTERACTIVE else "bulk"


def inference_enqueue(
    request_id: int, priority: int = InferenceRequest.Priority.INTERACTIVE, countdown: float | None = None
) -> bool:
    """Wake a worker for a queued request. With the broker away the request stays queued in the
    database: a worker's start-up, or beat's reconciliation within a minute, wakes it."""
    return task_send(INFER_TASK, args=[request_id], queue=inference_queue(priority), countdown=countdown)
