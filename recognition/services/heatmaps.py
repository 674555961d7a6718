"""Grad-CAM heatmaps on request, the web side: asked for, made once by a worker, kept.

A read never makes a heatmap. Whoever wants one asks (the viewer when it opens an image, the API,
an export or a PACS sender later): the first request stamps ``Result.heatmap_requested_at`` with a
conditional UPDATE and enqueues ``workers.tasks.heatmap_compute`` after commit, by name; every
other request meanwhile finds it computing and enqueues nothing. The worker stores the overlay
and pushes ``heatmap.ready`` on the hospital's feed. A request whose worker never answered
(a message lost with the broker, a worker gone) is sent again by the first one who asks after
``SIGHTLINE_HEATMAP_STALL_SECONDS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Membership
from core.errors import NotFound
from core.transient import is_transient

from ..models import Image, Result
from ..selectors import image_get

logger = logging.getLogger(__name__)

HEATMAP_TASK = "workers.tasks.heatmap_compute"  # recognition enqueues workers' tasks by name only
# what a 202 tells the client to wait before asking again: one Grad-CAM pass is a few ms on the
# demo model (README), so the wait is the interactive queue ahead of it
HEATMAP_RETRY_AFTER_SECONDS = 2


class HeatmapStatus:
    NONE = "none"  # nobody asked yet
    COMPUTING = "computing"  # asked; a worker makes it
    READY = "ready"
    UNAVAILABLE = "unavailable"  # the model names no Grad-CAM layer, or a worker could not make it

    choices = (NONE, COMPUTING, READY, UNAVAILABLE)


@dataclass(frozen=True)
class HeatmapState:
    status: str
    result: Result


def explains(result: Result) -> bool:
    """The result's model names a layer for Grad-CAM (its manifest's ``gradcam_layer``)."""
    return bool(result.model_version.manifest.get("gradcam_layer"))


def result_heatmap_status(result: Result) -> str:
    if result.heatmap:
        return HeatmapStatus.READY
    if not explains(result) or result.heatmap_error:
        return HeatmapStatus.UNAVAILABLE
    return HeatmapStatus.COMPUTING if result.heatmap_requested_at else HeatmapStatus.NONE


def image_heatmap_result(image: Image) -> Result | None:
    """The result whose heatmap an image shows: its newest one whose model explains itself (the
    image reached through ``image_get``, its results prefetched newest first)."""
    return next((result for result in image.results.all() if explains(result)), None)


def heatmap_request(*, membership: Membership, image_id: int, request=None) -> HeatmapState:
    """An image of the member's hospital: its heatmap ready, or now computing (asked of a worker
    once, however many ask). 404 for another hospital's image, an image without a result or one
    whose model has no Grad-CAM layer; the access is logged as ``image.heatmap`` before it asks."""
    # logged first, outside any transaction of ours: a denial stays logged though its 404 is raised,
    # and an access log that cannot be written asks no worker
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.heatmap")
    result = image_heatmap_result(image)
    state = _ask(result) if result is not None else None
    if state is None:
        raise NotFound("This image has no heatmap: no finding of a model that explains itself.", code="no_heatmap")
    if state.status == HeatmapStatus.UNAVAILABLE:
        raise NotFound(f"This image has no heatmap: {state.result.heatmap_error}", code="no_heatmap")
    return state


def result_heatmap_request(*, result_id: int) -> HeatmapState:
    """The same for platform-internal callers (an export, a PACS sender) that hold a result id
    and log their own access; ``HeatmapStatus.UNAVAILABLE`` instead of a 404."""
    return _ask(Result.objects.select_related("model_version").get(pk=result_id))


def _ask(result: Result) -> HeatmapState:
    status = result_heatmap_status(result)
    if status in (HeatmapStatus.READY, HeatmapStatus.UNAVAILABLE):
        return HeatmapState(status, result)
    now = timezone.now()
    stalled = now - timedelta(seconds=settings.SIGHTLINE_HEATMAP_STALL_SECONDS)
    if result.heatmap_requested_at is not None and result.heatmap_requested_at >= stalled:
        return HeatmapState(HeatmapStatus.COMPUTING, result)  # asked recently: a worker is on it
    asked = (
        Result.objects.filter(pk=result.pk, heatmap="", heatmap_error="")
        .filter(Q(heatmap_requested_at__isnull=True) | Q(heatmap_requested_at__lt=stalled))
        .update(heatmap_requested_at=now)
    )
    if asked:  # this request won: the only one that enqueues, after commit
        result.heatmap_requested_at = now
        result_id = result.pk
        transaction.on_commit(lambda: _enqueue(result_id), robust=True)
    return HeatmapState(HeatmapStatus.COMPUTING, result)


def _enqueue(result_id: int) -> None:
    from celery import current_app  # the project's app (config/__init__.py loads it)

    try:
        current_app.send_task(HEATMAP_TASK, args=[result_id], queue="interactive")
    except Exception as exc:
        if not is_transient(exc):
            raise
        # heatmap_requested_at stays: the first request after the stall time sends it again
        logger.warning("broker unavailable; the heatmap of result %s waits for the next request", result_id)
