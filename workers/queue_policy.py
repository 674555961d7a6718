"""Which waiting request runs next, and what happens to requests a worker could not finish.

The database is the queue's truth; the broker's messages only wake a worker. Here, and only
here, is the order: the triggering request, then interactive ones, then bulk ones round-robin
across hospitals, and within each hospital's turns the images its browser screen called
suspicious first (``screen_order``: untrusted input, so it reorders only that hospital's own
share, never another hospital's turn); the lanes (``SIGHTLINE_WORKER_LANE``): ``interactive`` takes interactive
requests and falls back to bulk ones only when none waits, ``bulk`` takes bulk ones only, ``all``
(one worker for everything) behaves like ``interactive``. Plus what gives requests back: a dead
process's claims (reclaim), a transient error (requeue with a backoff), a claim not started
(release), and a request stuck past its time limit (reconcile).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, IntegerField, Q, Value, When, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from core.transient import backoff_seconds
from recognition.models import InferenceRequest, ModelVersion
from recognition.services.inference import inference_enqueue
from workers.outcomes import outcomes_fail

logger = logging.getLogger(__name__)
Status = InferenceRequest.Status
Priority = InferenceRequest.Priority
LANES = ("all", "interactive", "bulk")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_lane() -> str:
    lane = settings.SIGHTLINE_WORKER_LANE
    if lane not in LANES:
        raise ValueError(f"SIGHTLINE_WORKER_LANE is {lane!r}; use one of {', '.join(LANES)}")
    return lane


def batch_limits(version: ModelVersion) -> tuple[int, float]:
    """(largest batch, longest wait for company in ms): the version's manifest, else the worker's."""
    manifest = version.manifest
    return (
        manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE,
        manifest.get("max_wait_ms") if manifest.get("max_wait_ms") is not None else settings.SIGHTLINE_MAX_WAIT_MS,
    )


def takes_bulk(priority: int) -> bool:
    """Whether a task woken by a message of this priority claims bulk work: on the interactive
    lane only one woken from the bulk queue (it took that message because it was idle); a task
    for a clinician's read there ends when no clinician's read is left, and the lane takes bulk
    work again only by taking a bulk message (workers/bootsteps.py BulkWhenIdle says when)."""
    return worker_lane() != "interactive" or priority == Priority.BULK


def claim(*, model_version_id: int, limit: int, first_id: int | None = None, bulk: bool = True) -> list[int]:
    """Move up to ``limit`` queued requests of one version to running, in the order they should
    run (see the module's docstring). A batch never mixes priorities: interactive requests do not
    wait for bulk ones to fill it; bulk work claimed by the interactive lane comes in batches of
    SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH at most, and none when ``bulk`` is False (``takes_bulk``)."""
    waiting = InferenceRequest.objects.filter(
        model_version_id=model_version_id, status=Status.QUEUED, attempts__lt=settings.SIGHTLINE_MAX_ATTEMPTS
    )
    if worker_lane() == "bulk":
        waiting = waiting.filter(priority=Priority.BULK)
    elif not bulk and worker_lane() == "interactive":
        waiting = waiting.filter(priority=Priority.INTERACTIVE)
    ranked = (
        # a request sent back by a transient error waits out its backoff
        waiting.filter(Q(retry_after__isnull=True) | Q(retry_after__lte=timezone.now()))
        # a hospital's n-th turn in its priority is its n-th request, suspicious ones (screen_order 0)
        # first: the screen moves work only within the hospital's own turns
        .annotate(
            turn=Window(
                RowNumber(),
                partition_by=[F("priority"), F("tenant_id")],
                order_by=[F("screen_order").asc(), F("id").asc()],
            )
        )
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
    if batch_priority == Priority.BULK and worker_lane() == "interactive":
        # beside a bulk lane, the one that serves clinicians takes bulk work in small bites (see
        # the setting); a single worker for everything ("all") takes it in full batches
        candidates = candidates[: max(1, settings.SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH)]
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
                status=Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1, claimed_by=worker_id()
            )
    return [request_id for request_id in candidates if request_id in locked]


def yields_to_interactive(version_id: int, priority: int) -> bool:
    """A bulk batch about to run on a lane that serves clinicians gives way when one waits."""
    if priority != Priority.BULK or worker_lane() == "bulk":
        return False
    return InferenceRequest.objects.filter(
        model_version_id=version_id, status=Status.QUEUED, priority=Priority.INTERACTIVE
    ).exists()


def hands_over(version_id: int, priority: int) -> bool:
    """A bulk batch on the interactive lane found a clinician's read waiting: on that lane the
    bulk task ends, with a wake-up for each lane's waiting work (coalesced: usually the read's own
    upload sent the interactive one), so the read runs as a task of its own and the lane stops
    taking bulk messages until it is idle again; True when it does. A single worker for
    everything (``all``) turns to the read inside the task instead."""
    if worker_lane() != "interactive" or priority != Priority.BULK:
        return False
    for lane_priority in (Priority.INTERACTIVE, Priority.BULK):
        waiting = (
            InferenceRequest.objects.filter(model_version_id=version_id, status=Status.QUEUED, priority=lane_priority)
            .order_by("id")
            .values_list("id", flat=True)
            .first()
        )
        if waiting is not None:
            inference_enqueue(waiting, lane_priority, model_version_id=version_id)
    return True


def release(ids: list[int]) -> None:
    """Claimed but not started: back to the queue, and the attempt does not count."""
    InferenceRequest.objects.filter(id__in=ids, status=Status.RUNNING, claimed_by=worker_id()).update(
        status=Status.QUEUED, claimed_by="", started_at=None, attempts=F("attempts") - 1
    )


def wake_next(version_id: int) -> None:
    """After commit, one wake-up for the version's next waiting request."""
    waiting = (
        InferenceRequest.objects.filter(model_version_id=version_id, status=Status.QUEUED)
        .order_by("priority", "id")
        .values_list("id", "priority")
        .first()
    )
    if waiting is not None:
        request_id, priority = waiting
        transaction.on_commit(lambda: inference_enqueue(request_id, priority, model_version_id=version_id), robust=True)


def screened_negatives_promote() -> int:
    """Periodic (beat): screened negatives still waiting in the bulk lane past their ``read_by``
    (recognition/services/screening.py sent them there) move to the interactive lane, and each
    version with one gets an interactive wake-up. Returns how many moved."""
    with transaction.atomic():
        # the rows read are the rows moved (by id), so every version moved gets its wake-up even
        # when another row falls due between the two statements
        due = list(
            InferenceRequest.objects.filter(
                status=Status.QUEUED, priority=Priority.BULK, read_by__lte=timezone.now()
            ).values_list("id", "model_version_id")
        )
        moved = InferenceRequest.objects.filter(
            id__in=[request_id for request_id, _ in due], status=Status.QUEUED, priority=Priority.BULK
        ).update(priority=Priority.INTERACTIVE, read_by=None)
        for version_id in {version_id for _, version_id in due}:
            wake_next(version_id)  # the version's first waiting request is interactive now
    if moved:
        logger.info("%d screened negative(s) waited their maximum: moved to the interactive lane", moved)
    return moved


def requeue_waiting() -> int:
    """One wake-up task per model version with queued requests (after a restart or an outage):
    the database knows what still needs work, whatever happened to the broker's messages."""
    versions = set(InferenceRequest.objects.filter(status=Status.QUEUED).values_list("model_version_id", flat=True))
    for version_id in versions:
        wake_next(version_id)
    return len(versions)


WAKE_MARGIN_SECONDS = 0.25  # the wake-up lands just after the backoff ends, never just before


def requeue_transient(ids: list[int], *, reason: str) -> None:
    """Requests a transient error stopped: back to queued, no failure recorded, their claim not
    counted as an attempt; ``transient_retries`` counts the requeue and ``retry_after`` holds the
    backoff, one for the requests sent back together, with one wake-up after it. One that has
    used up SIGHTLINE_TRANSIENT_RETRIES fails, saying what kept failing."""
    cap = settings.SIGHTLINE_TRANSIENT_RETRIES
    with transaction.atomic():
        rows = list(
            InferenceRequest.objects.select_for_update()
            .filter(id__in=ids, status=Status.RUNNING, claimed_by=worker_id())
            .order_by("priority", "id")
            .values_list("id", "transient_retries", "priority")
        )
        exhausted = [request_id for request_id, retries, _ in rows if retries + 1 >= cap]
        if exhausted:
            outcomes_fail(requests_of(exhausted), f"{reason}, after {cap} tries")
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
        transaction.on_commit(lambda: inference_enqueue(first_id, priority, countdown=countdown), robust=True)
    logger.warning(
        "%d request(s) back to the queue for %.1f s after a transient error: %s", len(waiting), delay, reason
    )


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


def reclaim_now_and_then() -> None:
    global _last_reclaim
    if time.monotonic() - _last_reclaim > RECLAIM_INTERVAL_SECONDS:
        _last_reclaim = time.monotonic()
        reclaim_orphans()


def reclaim_orphans() -> set[int]:
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
        exhausted = list(running.filter(attempts__gte=settings.SIGHTLINE_MAX_ATTEMPTS).select_related("image"))
        outcomes_fail(exhausted, f"stopped after {settings.SIGHTLINE_MAX_ATTEMPTS} attempts: the worker kept failing")
        reset = running.update(status=Status.QUEUED, claimed_by="", started_at=None)
    logger.warning("reclaimed %d orphaned requests (%d given up)", reset, len(exhausted))
    return {version_id for _, _, version_id in orphans}


def requests_reconcile_stuck() -> int:
    """Periodic: requests of any host left running past the time limit go back to the queue,
    or fail once their attempts are used up; then every version with queued work (a broker
    message may have been lost: Redis restarted without persistence) gets a wake-up. Returns
    how many requests were touched."""
    limit = timezone.now() - timezone.timedelta(seconds=settings.SIGHTLINE_REQUEST_TIME_LIMIT_SECONDS)
    stuck = InferenceRequest.objects.filter(status=Status.RUNNING, started_at__lt=limit)
    with transaction.atomic():
        exhausted = list(stuck.filter(attempts__gte=settings.SIGHTLINE_MAX_ATTEMPTS).select_related("image"))
        outcomes_fail(exhausted, "stopped: it ran past the time limit on every attempt")
        versions = set(stuck.values_list("model_version_id", flat=True))
        requeued = stuck.update(status=Status.QUEUED, claimed_by="", started_at=None)
        for version_id in versions:
            wake_next(version_id)
    if requeued or exhausted:
        logger.warning("reconciled %d stuck requests (%d given up)", requeued, len(exhausted))
    # for a version a worker is already draining, the extra wake-up finds nothing to do
    requeue_waiting()
    return requeued + len(exhausted)


def requests_of(ids: list[int]) -> list[InferenceRequest]:
    """The requests, in the order of ``ids``, with their image and version."""
    by_id = InferenceRequest.objects.select_related("image", "model_version__model").in_bulk(ids)
    return [by_id[request_id] for request_id in ids]
