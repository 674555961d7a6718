"""Queue AI reads after commit; in the worker, claim a batch, run it, store one outcome each."""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Case, F, IntegerField, Q, Value, When, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from config.errors import Unavailable
from core.model_package import PackageError
from core.transient import backoff_seconds, is_transient, transient_reason
from workers.engine.batching import collect_batch
from workers.engine.results import ItemResult

from .. import events
from ..models import Image, InferenceRequest, ModelAlias, ModelVersion, Result
from ..storage import heatmap_key
from .registry import Routing, model_handler, model_routing
from .studies import study_summary_refresh

logger = logging.getLogger(__name__)
Status = InferenceRequest.Status


def _default_production_version() -> ModelVersion | None:
    alias = (
        ModelAlias.objects.select_related("version__model")
        .filter(model__name=settings.SIGHTLINE_DEFAULT_MODEL, name=ModelAlias.Name.PRODUCTION)
        .first()
    )
    return alias.version if alias else None


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
    transaction.on_commit(lambda: _enqueue(request.pk, priority), robust=True)
    return request


def _enqueue(
    request_id: int, priority: int = InferenceRequest.Priority.INTERACTIVE, countdown: float | None = None
) -> None:
    from workers.tasks import infer  # the task module imports this one

    queue = "interactive" if priority == InferenceRequest.Priority.INTERACTIVE else "bulk"
    try:
        options = {"countdown": countdown} if countdown else {}
        infer.apply_async(args=[request_id], queue=queue, **options)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # the request stays queued in the database: a worker's start-up, or beat's reconciliation
        # within a minute, wakes it once the broker is back
        logger.warning("broker unavailable; request %s stays queued until it is woken up", request_id)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim(*, model_version_id: int, limit: int, first_id: int | None = None) -> list[int]:
    """Move up to ``limit`` queued requests of one version to running, in the order they should
    run: the triggering request, then interactive ones, then bulk ones round-robin across
    hospitals (each hospital's oldest first), so one hospital's big job cannot starve another's.
    A batch never mixes the two: interactive requests do not wait for bulk ones to fill it."""
    ranked = (
        InferenceRequest.objects.filter(
            model_version_id=model_version_id, status=Status.QUEUED, attempts__lt=settings.SIGHTLINE_MAX_ATTEMPTS
        )
        # a request sent back by a transient error waits out its backoff
        .filter(Q(retry_after__isnull=True) | Q(retry_after__lte=timezone.now()))
        .annotate(turn=Window(RowNumber(), partition_by=[F("priority"), F("tenant_id")], order_by=F("id").asc()))
        .order_by(
            Case(When(id=first_id, then=Value(0)), default=Value(1), output_field=IntegerField()),
            "priority",
            "turn",
            "id",
        )
    )
    ranked_rows = list(ranked.values_list("id", "priority")[:limit])
    if not ranked_rows:
        return []
    batch_priority = min(priority for _, priority in ranked_rows)
    candidates = [request_id for request_id, priority in ranked_rows if priority == batch_priority]
    with transaction.atomic():
        # window functions cannot be locked FOR UPDATE: lock the chosen rows in a second step;
        # another worker may have taken some of them meanwhile, which only makes this batch smaller
        locked = set(
            InferenceRequest.objects.select_for_update(skip_locked=True)
            .filter(id__in=candidates, status=Status.QUEUED)
            .values_list("id", flat=True)
        )
        if locked:
            InferenceRequest.objects.filter(id__in=locked).update(
                status=Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1, claimed_by=_worker_id()
            )
    return [request_id for request_id in candidates if request_id in locked]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_last_reclaim = 0.0
RECLAIM_INTERVAL_SECONDS = 30  # a dead process's requests wait at most this long (or a worker restart)


def _reclaim_now_and_then() -> None:
    global _last_reclaim
    if time.monotonic() - _last_reclaim > RECLAIM_INTERVAL_SECONDS:
        _last_reclaim = time.monotonic()
        inference_reclaim_orphans()


def inference_reclaim_orphans() -> set[int]:
    """Requests left running by a worker process of this host that has died (kill -9, OOM):
    back to queued, or failed once they have used up their attempts. Returns their versions."""
    prefix = f"{socket.gethostname()}:"
    orphans = [
        (request_id, claimed_by, version_id)
        for request_id, claimed_by, version_id in InferenceRequest.objects.filter(
            status=Status.RUNNING, claimed_by__startswith=prefix
        ).values_list("id", "claimed_by", "model_version_id")
        if not _process_alive(int(claimed_by.rsplit(":", 1)[1]))
    ]
    if not orphans:
        return set()
    ids = [request_id for request_id, _, _ in orphans]
    running = InferenceRequest.objects.filter(id__in=ids, status=Status.RUNNING)
    with transaction.atomic():
        exhausted = list(running.filter(attempts__gte=settings.SIGHTLINE_MAX_ATTEMPTS))
        _store_outcomes(
            exhausted,
            [ItemResult(error=f"stopped after {settings.SIGHTLINE_MAX_ATTEMPTS} attempts: the worker kept failing")]
            * len(exhausted),
        )
        reset = running.update(status=Status.QUEUED, claimed_by="", started_at=None)
    logger.warning("reclaimed %d orphaned requests (%d given up)", reset, len(exhausted))
    return {version_id for _, _, version_id in orphans}


def inference_requeue_waiting() -> int:
    """One wake-up task per model version with queued requests (after a restart or an outage):
    the database knows what still needs work, whatever happened to the broker's messages."""
    versions = InferenceRequest.objects.filter(status=Status.QUEUED).values_list("model_version_id", flat=True)
    versions = set(versions)
    for version_id in versions:
        _wake_next(version_id)
    return len(versions)


def _batch_limits(version: ModelVersion) -> tuple[int, float]:
    manifest = version.manifest
    return (
        manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE,
        manifest.get("max_wait_ms") if manifest.get("max_wait_ms") is not None else settings.SIGHTLINE_MAX_WAIT_MS,
    )


READ_RETRY_PAUSE_SECONDS = 0.05  # then 0.1, 0.2…: a blip of a fraction of a second is waited out in place
TRANSIENT_PLACEHOLDER = "a transient error; sent back to the queue"


def _read_stored(name: str) -> bytes:
    """One image's bytes; a transient error is tried again here, SIGHTLINE_READ_TRIES in all."""
    tries = max(1, settings.SIGHTLINE_READ_TRIES)
    for attempt in range(tries):
        try:
            with default_storage.open(name, "rb") as stored:
                return stored.read()
        except Exception as exc:
            if attempt + 1 >= tries or not is_transient(exc):
                raise
            logger.info("reading %s failed (%s); trying again", name, transient_reason(exc))
            time.sleep(READ_RETRY_PAUSE_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


def _prepare(handler, names: list[str]):
    """Storage read and decode for one batch: runs in the decode pool beside the forward pass.
    Returns (tensor, one error per name, {position: reason} of reads that kept failing with a
    transient error: those requests go back to the queue instead of failing)."""
    import torch  # the worker's: the web process imports this module and never loads torch

    tensors, errors, transient = [], [], {}
    for position, name in enumerate(names):
        try:
            data = _read_stored(name)
        except Exception as exc:
            if is_transient(exc):
                transient[position] = transient_reason(exc)
                errors.append(TRANSIENT_PLACEHOLDER)
            else:  # gone, or refused for good: this image fails alone, the batch runs
                logger.warning("stored image %s could not be read: %r", name, exc)
                errors.append("the stored image could not be read")
            continue
        batch, (error,) = handler.preprocess([data])
        errors.append(error)
        if batch is not None:
            tensors.append(batch[0])
    return (torch.stack(tensors) if tensors else None), errors, transient


_decode_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _decode_pool
    if _decode_pool is None:  # created in the worker process, after the fork
        _decode_pool = ThreadPoolExecutor(max_workers=settings.SIGHTLINE_DECODE_THREADS, thread_name_prefix="decode")
    return _decode_pool


def inference_run(*, request_id: int) -> int:
    """Run the request, and whatever else waits for the same model version, batch after batch.

    The first batch takes what is waiting now (a lone request does not wait for company unless
    the version sets max_wait_ms); while a batch runs its forward pass, the next one is claimed
    and decoded in the pool. Redelivered or already-batched requests find nothing and return 0.
    """
    _reclaim_now_and_then()
    row = InferenceRequest.objects.filter(id=request_id).values("model_version_id", "status").first()
    if row is None or row["status"] != Status.QUEUED:
        return 0
    version = ModelVersion.objects.select_related("model").get(pk=row["model_version_id"])
    max_batch, max_wait = _batch_limits(version)
    first = collect_batch(
        lambda n: _claim(model_version_id=version.pk, limit=n, first_id=request_id),
        max_batch_size=max_batch,
        max_wait_ms=max_wait,
    )
    if not first:
        return 0
    try:
        handler = model_handler(version)
    except PackageError as exc:
        logger.error("model version %s refused: %s", version.pk, exc)
        _store_outcomes(_rows(first), [ItemResult(error=f"the model could not be loaded: {exc}")] * len(first))
        return len(first)
    except Exception as exc:
        if is_transient(exc):  # a storage blip while fetching the package: the whole batch waits and retries
            logger.warning("model version %s not loaded (%s); its batch goes back to the queue", version.pk, exc)
            _requeue_transient(first, reason=f"the model could not be loaded: {transient_reason(exc)}")
            return 0
        _store_outcomes(_rows(first), [ItemResult(error="the worker failed to load the model")] * len(first))
        raise

    claimed: set[int] = set(first)  # claimed by this task and not stored yet
    try:
        return _run_batches(version, handler, first, claimed, max_batch)
    except Exception as exc:
        if is_transient(exc) and claimed:  # the database or storage went away mid-batch
            with suppress(Exception):  # best effort: the database may still be away
                _requeue_transient(sorted(claimed), reason=transient_reason(exc))
        raise


def _run_batches(version: ModelVersion, handler, first: list[int], claimed: set[int], max_batch: int) -> int:
    done, batches = 0, 0
    current = (first, _pool().submit(_prepare, handler, _file_names(first)))
    while current is not None:
        ids, prepared = current
        requests = _rows(ids)
        if requests[0].priority == InferenceRequest.Priority.BULK and _interactive_waiting(version.pk):
            # a clinician's read arrived while this bulk batch waited its turn: it goes first
            _release(ids)
            claimed.difference_update(ids)
            ids = _claim(model_version_id=version.pk, limit=max_batch)
            if not ids:
                break
            claimed.update(ids)
            prepared, requests = _pool().submit(_prepare, handler, _file_names(ids)), _rows(ids)
        batches += 1
        current = None
        if batches < settings.SIGHTLINE_MAX_BATCHES_PER_TASK:
            more = _claim(model_version_id=version.pk, limit=max_batch)
            if more:
                claimed.update(more)
                current = (more, _pool().submit(_prepare, handler, _file_names(more)))
        else:  # yield the worker to other versions' tasks; a new task picks up what is left
            _wake_next(version.pk)
        started = time.perf_counter()
        heatmaps: dict[int, str] = {}
        transient: dict[int, str] = {}
        try:
            batch, errors, transient = prepared.result()
            probabilities = handler.infer(batch) if batch is not None else None
            outcomes = handler.postprocess(probabilities, errors)
        except Exception as exc:  # e.g. out of GPU memory: the batch fails in words, never stays running
            logger.exception("forward pass failed for a batch of %d", len(ids))
            outcomes = [ItemResult(error=f"inference failed: {type(exc).__name__}")] * len(ids)
        else:
            if probabilities is not None and handler.manifest.gradcam_layer and settings.SIGHTLINE_GRADCAM:
                heatmaps = _heatmaps(handler, requests, batch, errors, probabilities)
        logger.info("batch of %d on %s in %.1f ms", len(ids), handler.device, (time.perf_counter() - started) * 1000)
        if transient:  # reads that kept failing with a blip: back to the queue, not failed
            for position, reason in transient.items():
                _requeue_transient([ids[position]], reason=f"the stored image could not be read: {reason}")
            kept = [position for position in range(len(ids)) if position not in transient]
            requests, outcomes = [requests[p] for p in kept], [outcomes[p] for p in kept]
        _store_outcomes(requests, outcomes, heatmaps)
        claimed.difference_update(ids)
        done += len(requests)
    return done


WAKE_MARGIN_SECONDS = 0.25  # the wake-up lands just after the backoff ends, never just before


def _requeue_transient(ids: list[int], *, reason: str) -> None:
    """Requests a transient error stopped: back to queued, no failure recorded, their claim not
    counted as an attempt; ``transient_retries`` counts the requeue and ``retry_after`` holds the
    backoff, one for the requests sent back together, with one wake-up after it. One that has
    used up SIGHTLINE_TRANSIENT_RETRIES fails, saying what kept failing."""
    cap = settings.SIGHTLINE_TRANSIENT_RETRIES
    with transaction.atomic():
        rows = list(
            InferenceRequest.objects.select_for_update()
            .filter(id__in=ids, status=Status.RUNNING, claimed_by=_worker_id())
            .order_by("priority", "id")
            .values_list("id", "transient_retries", "priority")
        )
        exhausted = [request_id for request_id, retries, _ in rows if retries + 1 >= cap]
        if exhausted:
            _store_outcomes(_rows(exhausted), [ItemResult(error=f"{reason}, after {cap} tries")] * len(exhausted))
        waiting = [
            (request_id, retries, priority) for request_id, retries, priority in rows if request_id not in exhausted
        ]
        if not waiting:
            return
        delay = backoff_seconds(
            max(retries for _, retries, _ in waiting), cap=settings.SIGHTLINE_TRANSIENT_BACKOFF_MAX_SECONDS
        )
        InferenceRequest.objects.filter(id__in=[row[0] for row in waiting], status=Status.RUNNING).update(
            status=Status.QUEUED,
            claimed_by="",
            started_at=None,
            attempts=F("attempts") - 1,
            transient_retries=F("transient_retries") + 1,
            retry_after=timezone.now() + timezone.timedelta(seconds=delay),
        )
        first_id, _, priority = waiting[0]
        countdown = delay + WAKE_MARGIN_SECONDS
        transaction.on_commit(lambda: _enqueue(first_id, priority, countdown=countdown), robust=True)
    logger.warning(
        "%d request(s) back to the queue for %.1f s after a transient error: %s", len(waiting), delay, reason
    )


def _heatmaps(handler, requests, batch, errors, probabilities) -> dict[int, str]:
    """Grad-CAM overlays for the batch's readable images, stored beside the results. A failure
    here costs the heatmaps, never the findings."""
    from workers.engine.gradcam import gradcam, render_overlay_png

    try:
        cams = gradcam(handler, batch, probabilities.argmax(1).tolist(), handler.manifest.gradcam_layer)
        readable = [request for request, error in zip(requests, errors, strict=True) if not error]
        names = {}
        for request, cam in zip(readable, cams, strict=True):
            png = render_overlay_png(cam, (request.image.width, request.image.height), indexed=True)
            names[request.pk] = default_storage.save(heatmap_key(tenant_id=request.tenant_id), ContentFile(png))
        return names
    except Exception:
        logger.exception("Grad-CAM failed for a batch of %d", len(requests))
        return {}


def _interactive_waiting(version_id: int) -> bool:
    return InferenceRequest.objects.filter(
        model_version_id=version_id, status=Status.QUEUED, priority=InferenceRequest.Priority.INTERACTIVE
    ).exists()


def _release(ids: list[int]) -> None:
    """Claimed but not started: back to the queue, and the attempt does not count."""
    InferenceRequest.objects.filter(id__in=ids, status=Status.RUNNING, claimed_by=_worker_id()).update(
        status=Status.QUEUED, claimed_by="", started_at=None, attempts=F("attempts") - 1
    )


def _wake_next(version_id: int) -> None:
    waiting = (
        InferenceRequest.objects.filter(model_version_id=version_id, status=Status.QUEUED)
        .order_by("priority", "id")
        .values_list("id", "priority")
        .first()
    )
    if waiting is not None:
        transaction.on_commit(lambda: _enqueue(*waiting), robust=True)


def _rows(ids: list[int]) -> list[InferenceRequest]:
    by_id = InferenceRequest.objects.select_related("image", "model_version__model").in_bulk(ids)
    return [by_id[request_id] for request_id in ids]


def _file_names(ids: list[int]) -> list[str]:
    names = dict(InferenceRequest.objects.filter(id__in=ids).values_list("id", "image__file"))
    return [names[request_id] for request_id in ids]


def _store_outcomes(
    requests: list[InferenceRequest], outcomes: list[ItemResult], heatmaps: dict[int, str] | None = None
) -> None:
    """One transaction per batch: one UPDATE for the requests, one INSERT for the results, and
    the notifications sent together after commit. A request that is no longer running (it was
    reclaimed and finished elsewhere meanwhile) keeps the outcome it has."""
    heatmaps = heatmaps or {}
    now = timezone.now()
    with transaction.atomic():
        running = set(
            InferenceRequest.objects.select_for_update()
            .filter(id__in=[request.pk for request in requests], status=Status.RUNNING)
            .values_list("id", flat=True)
        )
        finished, results, notices = [], [], []
        for request, outcome in zip(requests, outcomes, strict=True):
            if request.pk not in running:
                continue
            started = request.started_at or now
            request.status = Status.DONE if outcome.ok else Status.FAILED
            request.error = outcome.error[:500]
            request.finished_at = now
            request.batch_size = len(requests)
            request.claimed_by = ""
            request.wait_ms = max(0, int((started - request.created).total_seconds() * 1000))
            request.inference_ms = max(0, int((now - started).total_seconds() * 1000))
            finished.append(request)
            if outcome.ok:
                results.append(
                    Result(
                        tenant_id=request.tenant_id,
                        image_id=request.image_id,
                        model_version_id=request.model_version_id,
                        request=request,
                        probabilities=outcome.probabilities,
                        top_label=outcome.top_label,
                        top_probability=outcome.top_probability,
                        positive_labels=list(outcome.positive_labels),
                        heatmap=heatmaps.get(request.pk, ""),
                    )
                )
            notices.append(
                events.ResultNotice(
                    tenant_id=request.tenant_id,
                    image_id=request.image_id,
                    status=request.status,
                    top_label=outcome.top_label,
                    probability=outcome.top_probability if outcome.ok else None,
                )
            )
        InferenceRequest.objects.bulk_update(finished, _OUTCOME_FIELDS)
        # unique per (image, version): a result made by an earlier delivery stands
        Result.objects.bulk_create(results, ignore_conflicts=True)
        study_summary_refresh(
            Image.objects.filter(id__in=[request.image_id for request in finished]).values_list("study_id", flat=True)
        )
        bulk = [request for request in finished if request.priority == InferenceRequest.Priority.BULK]
        if bulk:  # only bulk requests belong to jobs
            from .batches import batch_items_on_outcome  # batches imports this module

            batch_items_on_outcome(
                {status: [r.pk for r in bulk if r.status == status] for status in (Status.DONE, Status.FAILED)}, now
            )
        events.results_ready_on_commit(notices)


_OUTCOME_FIELDS = ["status", "error", "finished_at", "batch_size", "claimed_by", "wait_ms", "inference_ms"]


def inference_warm_up() -> None:
    """Load the default production model in this worker process, if one is registered."""
    version = _default_production_version()
    if version is not None:
        model_handler(version)
