"""The worker's runtime for AI reads: claim → decode → batch → forward → store → notify.

``inference_run`` is what the task ``workers.tasks.infer`` runs. It claims what waits for one
model version (``workers.queue_policy`` says in which order), hands the engine's pipeline
(``workers.engine.pipeline``) the reads of the next batch while the current one runs its
forward pass, and stores each batch's outcomes in one transaction (``workers.outcomes``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress

from django.conf import settings
from django.core.files.storage import default_storage

from core.model_package import PackageError
from core.transient import is_transient, transient_reason
from recognition.display import display_copy
from recognition.models import Image, InferenceRequest, ModelVersion
from recognition.services.images import image_display_store, images_render_failed, images_rendered
from recognition.services.inference import inference_wake_taken
from recognition.services.registry import version_for
from workers import queue_policy
from workers.engine.batching import collect_batch
from workers.engine.pipeline import BatchPipeline, Item, Prepared
from workers.engine.results import ItemResult
from workers.model_cache import model_handler
from workers.outcomes import outcomes_fail, outcomes_store

logger = logging.getLogger(__name__)
MS_PER_SECOND = 1000
Status = InferenceRequest.Status

READ_RETRY_PAUSE_SECONDS = 0.05  # then 0.1, 0.2…: a blip of a fraction of a second is waited out in place


def read_stored(name: str) -> bytes:
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


_decode_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _decode_pool
    if _decode_pool is None:  # created in the worker process, after the fork
        _decode_pool = ThreadPoolExecutor(max_workers=settings.SIGHTLINE_DECODE_THREADS, thread_name_prefix="decode")
    return _decode_pool


class Batch:
    """Claimed requests and the pipeline's future preparing them."""

    def __init__(self, pipeline: BatchPipeline, ids: list[int]):
        self.ids = ids
        self.requests = queue_policy.requests_of(ids)
        self.prepared: Future[Prepared] = pipeline.prepare([_item(request.image) for request in self.requests])


def _awaits_render(image: Image) -> bool:
    """A PNG/JPEG upload stored as sent: its read makes its display copy."""
    return image.state == Image.State.RECEIVED and image.format != "DICOM" and bool(image.original)


def _item(image: Image) -> Item:
    if not _awaits_render(image):
        name = image.file.name
        return Item(read=lambda: read_stored(name))
    original_format = image.format
    return Item(read=lambda: _read_original(image), on_decoded=lambda decoded: display_copy(decoded, original_format))


def _read_original(image: Image) -> bytes:
    """The upload as sent; if another delivery of this read rendered it meanwhile (and deleted
    the original), its display copy."""
    try:
        return read_stored(image.original.name)
    except FileNotFoundError:
        image.refresh_from_db(fields=["state", "file", "original"])
        if image.state != Image.State.RENDERED:
            raise
        return read_stored(image.file.name)


def inference_run(*, request_id: int) -> int:
    """Run the request, and whatever else waits for the same model version, batch after batch.

    The first batch takes what is waiting now (a lone request does not wait for company unless
    the version sets max_wait_ms); while a batch runs its forward pass, the next one is claimed
    and decoded in the pool. A message is a wake-up for its version: when its own request was
    done meanwhile (redelivered, or batched by another task), it still takes what waits, for an
    upload that found this wake-up on its way sent none (inference_enqueue); 0 when nothing does.
    """
    queue_policy.reclaim_now_and_then()
    row = InferenceRequest.objects.select_related("model_version__model").filter(id=request_id).first()
    if row is None:
        return 0
    # first, whatever this request's state: uploads from now on send a wake-up of their own
    inference_wake_taken(model_version_id=row.model_version_id, priority=row.priority)
    first_id = request_id if row.status == Status.QUEUED else None
    version = row.model_version
    max_batch, max_wait = queue_policy.batch_limits(version)
    bulk = queue_policy.takes_bulk(row.priority)
    first = collect_batch(
        lambda n: queue_policy.claim(model_version_id=version.pk, limit=n, first_id=first_id, bulk=bulk),
        max_batch_size=max_batch,
        max_wait_ms=max_wait,
    )
    if not first:
        return 0
    try:
        handler = model_handler(version)
    except PackageError as exc:
        logger.error("model version %s refused: %s", version.pk, exc)
        outcomes_fail(queue_policy.requests_of(first), f"the model could not be loaded: {exc}")
        return len(first)
    except Exception as exc:
        if is_transient(exc):  # a storage blip while fetching the package: the whole batch waits and retries
            logger.warning("model version %s not loaded (%s); its batch goes back to the queue", version.pk, exc)
            queue_policy.requeue_transient(first, reason=f"the model could not be loaded: {transient_reason(exc)}")
            return 0
        outcomes_fail(queue_policy.requests_of(first), "the worker failed to load the model")
        raise

    claimed: set[int] = set(first)  # claimed by this task and not stored yet
    try:
        return _run_batches(version, BatchPipeline(handler, _pool()), first, claimed, max_batch, bulk)
    except Exception as exc:
        if is_transient(exc) and claimed:  # the database or storage went away mid-batch
            with suppress(Exception):  # best effort: the database may still be away
                queue_policy.requeue_transient(sorted(claimed), reason=transient_reason(exc))
        raise


def _run_batches(
    version: ModelVersion, pipeline: BatchPipeline, first: list[int], claimed: set[int], limit: int, bulk: bool
) -> int:
    done, batches = 0, 0
    current: Batch | None = Batch(pipeline, first)
    while current is not None:
        batch = current
        priority = batch.requests[0].priority
        if queue_policy.yields_to_interactive(version.pk, priority):
            # a clinician's read arrived while this bulk batch waited its turn: it goes first
            queue_policy.release(batch.ids)
            claimed.difference_update(batch.ids)
            if queue_policy.hands_over(version.pk, priority):
                break  # the interactive lane: the read runs as its own task (see hands_over)
            ids = queue_policy.claim(model_version_id=version.pk, limit=limit, bulk=bulk)
            if not ids:
                break
            claimed.update(ids)
            batch = Batch(pipeline, ids)
        batches += 1
        current = None
        if batches < settings.SIGHTLINE_MAX_BATCHES_PER_TASK:
            more = queue_policy.claim(model_version_id=version.pk, limit=limit, bulk=bulk)
            if more:
                claimed.update(more)
                current = Batch(pipeline, more)
        else:  # yield the worker to other versions' tasks; a new task picks up what is left
            queue_policy.wake_next(version.pk)
        done += _finish(batch, pipeline)
        claimed.difference_update(batch.ids)
    return done


def _finish(batch: Batch, pipeline: BatchPipeline) -> int:
    """Forward pass and outcomes of one prepared batch, with the display copies of the images
    it rendered on the way; returns the requests stored."""
    started = time.perf_counter()
    transient: dict[int, str] = {}
    prepared = None
    try:
        prepared = batch.prepared.result()
        for position, exc in prepared.read_failures.items():
            if is_transient(exc):
                transient[position] = transient_reason(exc)
            else:  # gone, or refused for good: this image fails alone, the batch runs
                logger.warning("stored image of request %s could not be read: %r", batch.ids[position], exc)
        outcomes = pipeline.run(prepared)
    except Exception as exc:  # e.g. out of GPU memory: the batch fails in words, never stays running
        logger.exception("forward pass failed for a batch of %d", len(batch.ids))
        outcomes = [ItemResult(error=f"inference failed: {type(exc).__name__}")] * len(batch.ids)
    logger.info(
        "batch of %d on %s in %.1f ms",
        len(batch.ids),
        pipeline.handler.device,
        (time.perf_counter() - started) * MS_PER_SECOND,
    )
    requests = batch.requests
    if transient:  # reads that kept failing with a blip: back to the queue, not failed
        for position, reason in transient.items():
            reason = f"the stored image could not be read: {reason}"
            queue_policy.requeue_transient([batch.ids[position]], reason=reason)
    kept = [position for position in range(len(batch.ids)) if position not in transient]
    rendered, unrenderable = _display_copies(batch, prepared, outcomes, kept)
    try:
        outcomes_store(
            [requests[p] for p in kept],
            [outcomes[p] for p in kept],
            on_stored=lambda finished: _render_outcomes(rendered, unrenderable),
        )
    except BaseException:
        for _, _, name in rendered:  # no row points at them
            with suppress(Exception):
                default_storage.delete(name)
        raise
    return len(kept)


def _display_copies(batch: Batch, prepared: Prepared | None, outcomes, kept: list[int]):
    """Store the display copies the pipeline made; (rendered, [(image, reason)] that cannot be)."""
    rendered, unrenderable = [], []
    for position in kept:
        image = batch.requests[position].image
        if not _awaits_render(image):
            continue
        copy = prepared.decoded.get(position) if prepared is not None else None
        if copy is not None:
            rendered.append((image, copy, image_display_store(image=image, copy=copy)))
        elif prepared is not None and position in prepared.decoded_failures:
            logger.warning(
                "image %s: its display copy could not be made: %r", image.pk, prepared.decoded_failures[position]
            )
            unrenderable.append((image, "This image could not be converted for display."))
        elif prepared is not None and outcomes[position].error and position not in prepared.read_failures:
            unrenderable.append((image, "The image is damaged and cannot be read."))
        # a read that failed for good, or a batch that failed as a whole: it stays received, and
        # images_render_reconcile renders it (or says why not) after SIGHTLINE_RENDER_STALL_SECONDS
    return rendered, unrenderable


def _render_outcomes(rendered, unrenderable) -> None:
    """Inside the outcome transaction: the rendered images move to rendered, the others fail."""
    images_rendered(rendered)
    for image, reason in unrenderable:
        images_render_failed([image], reason)


def inference_warm_up() -> None:
    """Load the default production model in this worker process, if one is registered."""
    version = version_for()
    if version is not None:
        model_handler(version)
