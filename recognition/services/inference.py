"""Queue AI reads after commit; in the worker, claim a batch, run it, store one outcome each."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Case, F, IntegerField, Value, When
from django.utils import timezone

from config.errors import Unavailable
from workers.engine.batching import collect_batch
from workers.engine.handler import ItemResult
from workers.engine.package import PackageError

from .. import events
from ..models import Image, InferenceRequest, ModelAlias, ModelVersion, Result
from .registry import model_handler

logger = logging.getLogger(__name__)
Status = InferenceRequest.Status


def _default_production_version() -> ModelVersion | None:
    alias = (
        ModelAlias.objects.select_related("version__model")
        .filter(model__name=settings.SIGHTLINE_DEFAULT_MODEL, name=ModelAlias.Name.PRODUCTION)
        .first()
    )
    return alias.version if alias else None


def model_version_for_tenant(*, tenant) -> ModelVersion:
    """The version that reads this hospital's images: the default model's production alias."""
    version = _default_production_version()
    if version is None:
        raise Unavailable(
            "No production model is registered yet, so images cannot be read. "
            "Platform staff register one with `manage.py build_demo_model` or `register_model`.",
            code="no_model",
        )
    return version


def inference_request_create(*, image: Image, model_version: ModelVersion) -> InferenceRequest:
    request = InferenceRequest.objects.create(tenant=image.tenant, image=image, model_version=model_version)
    # robust: a broker outage must not undo a committed upload; the request stays queued in
    # the database, which is what re-enqueueing reads
    transaction.on_commit(lambda: _enqueue(request.pk), robust=True)
    return request


def _enqueue(request_id: int) -> None:
    from workers.tasks import infer  # the task module imports this one

    infer.apply_async(args=[request_id], queue="interactive")


def _claimer(*, model_version_id: int, first_id: int):
    """``take(n)``: atomically move up to n queued requests of one version to running."""

    def take(limit: int) -> list[int]:
        with transaction.atomic():
            ids = list(
                InferenceRequest.objects.select_for_update(skip_locked=True)
                .filter(model_version_id=model_version_id, status=Status.QUEUED)
                .order_by(
                    Case(When(id=first_id, then=Value(0)), default=Value(1), output_field=IntegerField()),
                    "id",
                )
                .values_list("id", flat=True)[:limit]
            )
            if ids:
                InferenceRequest.objects.filter(id__in=ids, status=Status.QUEUED).update(
                    status=Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1
                )
            return ids

    return take


def inference_run(*, request_id: int) -> int:
    """Run the request and whatever else waits for the same model version. Returns batch size.

    Redelivered or already-batched requests find nothing queued and return 0.
    """
    row = InferenceRequest.objects.filter(id=request_id).values("model_version_id", "status").first()
    if row is None or row["status"] != Status.QUEUED:
        return 0
    take = _claimer(model_version_id=row["model_version_id"], first_id=request_id)
    ids = collect_batch(
        take, max_batch_size=settings.SIGHTLINE_MAX_BATCH_SIZE, max_wait_ms=settings.SIGHTLINE_MAX_WAIT_MS
    )
    if not ids:
        return 0
    requests = list(
        InferenceRequest.objects.filter(id__in=ids).select_related("image", "model_version__model").order_by("id")
    )
    model_version = requests[0].model_version
    try:
        handler = model_handler(model_version)
    except PackageError as exc:
        logger.error("model version %s refused: %s", model_version.pk, exc)
        _store_outcomes(requests, [ItemResult(error=f"the model could not be loaded: {exc}")] * len(requests))
        return len(requests)
    except Exception:
        _store_outcomes(requests, [ItemResult(error="the worker failed to load the model")] * len(requests))
        raise

    payloads: list[bytes | None] = []
    for request in requests:
        try:
            with default_storage.open(request.image.file.name, "rb") as stored:
                payloads.append(stored.read())
        except OSError:
            payloads.append(None)
    readable = [data for data in payloads if data is not None]
    started = time.perf_counter()
    try:
        predictions = iter(handler.predict(readable) if readable else [])
    except Exception as exc:  # e.g. out of GPU memory: the batch fails in words, never stays running
        logger.exception("forward pass failed for a batch of %d", len(requests))
        _store_outcomes(requests, [ItemResult(error=f"inference failed: {type(exc).__name__}")] * len(requests))
        return len(requests)
    outcomes = [
        next(predictions) if data is not None else ItemResult(error="the stored image could not be read")
        for data in payloads
    ]
    logger.info("batch of %d on %s in %.1f ms", len(requests), handler.device, (time.perf_counter() - started) * 1000)
    _store_outcomes(requests, outcomes)
    return len(requests)


def _store_outcomes(requests: list[InferenceRequest], outcomes: list[ItemResult]) -> None:
    now = timezone.now()
    with transaction.atomic():
        for request, outcome in zip(requests, outcomes, strict=True):
            status = Status.DONE if outcome.ok else Status.FAILED
            claimed = InferenceRequest.objects.filter(id=request.pk, status=Status.RUNNING).update(
                status=status, error=outcome.error[:500], finished_at=now, batch_size=len(requests)
            )
            if not claimed:  # finished elsewhere meanwhile: its outcome stands
                continue
            if outcome.ok:
                Result.objects.get_or_create(
                    image_id=request.image_id,
                    model_version_id=request.model_version_id,
                    defaults={
                        "tenant_id": request.tenant_id,
                        "request": request,
                        "probabilities": outcome.probabilities,
                        "top_label": outcome.top_label,
                        "top_probability": outcome.top_probability,
                    },
                )
            events.result_ready_on_commit(
                tenant_id=request.tenant_id,
                image_id=request.image_id,
                status=status,
                top_label=outcome.top_label,
                probability=outcome.top_probability if outcome.ok else None,
            )


def inference_warm_up() -> None:
    """Load the default production model in this worker process, if one is registered."""
    version = _default_production_version()
    if version is not None:
        model_handler(version)
