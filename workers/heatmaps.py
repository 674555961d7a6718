"""Grad-CAM on request, the worker side: one result's heatmap, made once and kept.

``recognition/services/heatmaps.py`` asks (``workers.tasks.heatmap_compute``, by name); this
loads the result's model, reads the image as the viewer shows it, explains the finding the result
holds (its top label, not a fresh forward pass's), stores the overlay and pushes ``heatmap.ready``
on the hospital's feed. Redelivery-safe: the overlay is recorded with a conditional UPDATE, so two
deliveries store one, and the loser deletes its file.
"""

from __future__ import annotations

import logging

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from accounts import events
from core.transient import is_transient
from recognition.models import REASON_LENGTH, Result
from recognition.storage import heatmap_key
from workers.model_cache import model_handler

logger = logging.getLogger(__name__)


def heatmap_compute(*, result_id: int) -> str:
    """Make and store one result's heatmap; the status it ends in (recognition's HeatmapStatus
    values). A transient error (storage, database) is raised for the task to retry; any other
    ends the request "unavailable", in words, and the viewer is told."""
    result = Result.objects.select_related("image", "model_version").filter(pk=result_id).first()
    if result is None:
        return "none"  # the image was deleted since it was asked for
    if result.heatmap:
        return "ready"  # an earlier delivery made it
    try:
        png = _overlay(result)
    except Exception as exc:
        if is_transient(exc):
            raise
        logger.exception("Grad-CAM failed for result %s", result_id)
        _unavailable(result, _reason(exc))
        return "unavailable"
    name = default_storage.save(heatmap_key(tenant_id=result.tenant_id), ContentFile(png))
    with transaction.atomic():
        stored = Result.objects.filter(pk=result.pk, heatmap="").update(heatmap=name, heatmap_error="") == 1
        if stored:
            events.heatmap_ready_on_commit(tenant_id=result.tenant_id, image_id=result.image_id, result_id=result.pk)
    if not stored:  # another delivery stored its own meanwhile
        default_storage.delete(name)
    return "ready"


def _overlay(result: Result) -> bytes:
    from workers.engine.gradcam import gradcam, render_overlay_png

    handler = model_handler(result.model_version)
    layer = handler.manifest.gradcam_layer
    if not layer:
        raise ValueError("the model names no layer for Grad-CAM")
    image = result.image
    stored = image.file or image.original  # the display copy; a received image has only its original
    with stored.open("rb") as source:
        data = source.read()
    batch, (error,) = handler.preprocess([data])
    if batch is None:
        raise ValueError(error)
    labels = list(handler.manifest.labels)
    if result.top_label not in labels:
        raise ValueError(f"the finding {result.top_label!r} is not a label of the model")
    (cam,) = gradcam(handler, batch, [labels.index(result.top_label)], layer)
    return render_overlay_png(cam, (image.width, image.height), indexed=True)


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "the stored image is gone"
    message = str(exc) or type(exc).__name__
    return f"Grad-CAM could not explain this finding: {message}"[:REASON_LENGTH]


def _unavailable(result: Result, reason: str) -> None:
    with transaction.atomic():
        if Result.objects.filter(pk=result.pk, heatmap="").update(heatmap_error=reason):
            events.heatmap_ready_on_commit(
                tenant_id=result.tenant_id, image_id=result.image_id, result_id=result.pk, status="unavailable"
            )
