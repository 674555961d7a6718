"""A bulk job's life: create (idempotently, for the version ``version_for`` answers), start (one
bulk-priority request per item; the engine claims bulk work round-robin across hospitals and
always after interactive work), cancel, retry; and the record of each in the access log."""

from __future__ import annotations

from functools import partial

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.access import member_action_record
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.bulk import rows_update
from core.errors import Conflict, Invalid

from ...job_selectors import batch_job_get, job_uploads_pending
from ...models import IDEMPOTENCY_KEY_LENGTH, JOB_NAME_LENGTH, BatchItem, BatchJob, InferenceRequest, PreliminaryResult
from ..inference import inference_enqueue
from ..registry import version_for
from ..screening import SCREEN_FIRST, SCREEN_IN_ORDER
from .bookkeeping import batch_jobs_notify

Item, Job = BatchItem.Status, BatchJob.Status
QUEUE_CHUNK_ROWS = 1000  # bulk requests created per INSERT when a job starts


def batch_job_create(
    *,
    membership: Membership,
    name: str,
    model: str = "",
    alias: str = "",
    version: str = "",
    idempotency_key: str = "",
    request=None,
) -> tuple[BatchJob, bool]:
    """A new open job, or — for a repeated Idempotency-Key — the job that key made. (job, created)"""
    require(membership, Action.BATCH_SUBMIT, request=request)
    name = name.strip()[:JOB_NAME_LENGTH]
    if not name:
        raise Invalid("Give the job a name.", code="name_required")
    if len(idempotency_key) > IDEMPOTENCY_KEY_LENGTH:
        raise Invalid(
            f"The Idempotency-Key is longer than {IDEMPOTENCY_KEY_LENGTH} characters.", code="bad_idempotency_key"
        )
    # the hospital's pin wins over the production alias, as for single uploads (no split: no image)
    chosen = version_for(tenant=membership.tenant, model_name=model, alias=alias, version=version, required=True)
    assert chosen is not None  # required: a 404 otherwise
    with transaction.atomic():
        if idempotency_key:
            existing = (
                BatchJob.objects.for_tenant(membership.tenant)
                .select_for_update()
                .filter(created_by=membership.user, idempotency_key=idempotency_key)
                .first()
            )
            if existing is not None:
                if (existing.name, existing.model_version_id) != (name, chosen.pk):
                    raise Conflict(
                        "This Idempotency-Key was used for a different job; use a new key.", code="idempotency_mismatch"
                    )
                return existing, False
        try:
            with transaction.atomic():  # a savepoint: a concurrent create with the same key may win
                job = BatchJob.objects.create(
                    tenant=membership.tenant,
                    name=name,
                    model_version=chosen,
                    created_by=membership.user,
                    idempotency_key=idempotency_key,
                )
        except IntegrityError:
            # the unique key: another request with this key committed its job while this one
            # inserted (PostgreSQL makes the insert wait for it), so that job is the answer
            existing = (
                BatchJob.objects.for_tenant(membership.tenant)
                .filter(created_by=membership.user, idempotency_key=idempotency_key)
                .first()
                if idempotency_key
                else None
            )
            if existing is None:
                raise
            if (existing.name, existing.model_version_id) != (name, chosen.pk):
                raise Conflict(
                    "This Idempotency-Key was used for a different job; use a new key.", code="idempotency_mismatch"
                ) from None
            return existing, False
        batch_job_record(membership, "batch.create", job, request)
    return job, True


def batch_job_record(membership: Membership, action: str, job: BatchJob, request) -> None:
    """The member's action on the job, in the access log (in the caller's transaction)."""
    member_action_record(membership, action, request=request, target_type="batch_job", target_id=job.pk)


def batch_job_open_for_items(membership: Membership, job_id: int, request) -> BatchJob:
    """The job, its row locked, that items may still be added to (409 once it has started)."""
    require(membership, Action.BATCH_SUBMIT, request=request)
    job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
    if job.status != Job.OPEN:
        raise Conflict("Items can be added only before the job starts.", code="job_started")
    return job


def batch_job_start(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """Queue every pending item at bulk priority, in chunks the worker batches."""
    with transaction.atomic():
        job = batch_job_open_for_items(membership, job_id, request)
        if job_uploads_pending(job).exists():
            raise Conflict("An archive is still being unpacked; start the job when it is done.", code="expanding")
        job.status, job.started_at = Job.RUNNING, timezone.now()
        job.resumed_at = job.started_at
        job.save(update_fields=["status", "started_at", "resumed_at"])
        _queue(job, BatchItem.objects.filter(job=job, status=Item.PENDING, image__isnull=False))
        batch_job_record(membership, "batch.start", job, request)
        batch_jobs_notify([job])
    return job


def _queue(job: BatchJob, items) -> None:
    """One bulk request per item, created in bulk; wake-ups go out after commit, one per chunk."""
    chunk = job.model_version.manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE
    # a screen that called an item suspicious puts its read first within the hospital's bulk turns
    pending = list(items.values_list("id", "image_id", "image__preliminary__route"))
    for start in range(0, len(pending), QUEUE_CHUNK_ROWS):
        part = pending[start : start + QUEUE_CHUNK_ROWS]
        requests = InferenceRequest.objects.bulk_create(
            [
                InferenceRequest(
                    tenant_id=job.tenant_id,
                    image_id=image_id,
                    model_version_id=job.model_version_id,
                    priority=InferenceRequest.Priority.BULK,
                    screen_order=SCREEN_FIRST if route == PreliminaryResult.Route.FIRST else SCREEN_IN_ORDER,
                )
                for _, image_id, route in part
            ]
        )
        rows = [
            BatchItem(pk=item_id, request_id=r.pk, status=Item.QUEUED)
            for (item_id, _, _), r in zip(part, requests, strict=True)
        ]
        rows_update(rows, ["request_id", "status"])
        first_ids = [r.pk for r in requests[::chunk]]
        transaction.on_commit(partial(_wake, first_ids), robust=True)


def _wake(request_ids: list[int]) -> None:
    for request_id in request_ids:
        inference_enqueue(request_id, InferenceRequest.Priority.BULK)


def batch_job_cancel(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """Items that have not started stop; running ones finish."""
    require(membership, Action.BATCH_SUBMIT, request=request)
    with transaction.atomic():
        job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
        if job.status == Job.CANCELLED:
            return job
        if job.status == Job.RUNNING and not _unfinished(job):
            raise Conflict("The job has finished: there is nothing left to cancel.", code="finished")
        waiting = BatchItem.objects.filter(job=job, status__in=[Item.PENDING, Item.QUEUED])
        InferenceRequest.objects.filter(
            id__in=waiting.exclude(request=None).values("request_id"), status=InferenceRequest.Status.QUEUED
        ).update(status=InferenceRequest.Status.CANCELLED, finished_at=timezone.now())
        # a queued item whose request a worker claimed meanwhile runs to its end
        waiting.exclude(request__status=InferenceRequest.Status.RUNNING).update(
            status=Item.CANCELLED, finished_at=timezone.now()
        )
        job.status, job.cancelled_at = Job.CANCELLED, timezone.now()
        job.save(update_fields=["status", "cancelled_at"])
        batch_job_record(membership, "batch.cancel", job, request)
        batch_jobs_notify([job])
    return job


def _unfinished(job: BatchJob) -> bool:
    return (
        BatchItem.objects.filter(job=job, status__in=[Item.PENDING, Item.QUEUED, Item.RUNNING]).exists()
        or job_uploads_pending(job).exists()
    )


def batch_job_retry(*, membership: Membership, job_id: int, request=None) -> int:
    """Failed items that have an image get a fresh request; returns how many."""
    require(membership, Action.BATCH_SUBMIT, request=request)
    with transaction.atomic():
        job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
        if job.status != Job.RUNNING:
            raise Conflict("Only a started, not cancelled job retries its failed items.", code="not_running")
        failed = BatchItem.objects.filter(job=job, status=Item.FAILED, image__isnull=False)
        count = failed.count()
        if count:
            job.resumed_at = timezone.now()
            job.save(update_fields=["resumed_at"])
        _queue(job, failed)
        batch_job_record(membership, "batch.retry", job, request)
        batch_jobs_notify([job])
    return count


def batch_results_open(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """The job whose results are being downloaded; the download is recorded before it streams."""
    job = batch_job_get(membership=membership, job_id=job_id, request=request)
    batch_job_record(membership, "batch.results", job, request)
    return job
