"""Reads of bulk jobs, always through the member's hospital: one job, the list, their progress
and their results. The writes are in ``services/jobs/``.

A page of jobs reads its progress in one annotated query (item counts per state, the uploads
pending and refused, the pace of the latest run, each a subquery), plus one for the words of
refused uploads when the page has any: not four or five queries per job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.db.models import Count, F, IntegerField, Max, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.access import tenant_object_get
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require

from .models import BatchItem, BatchJob, BatchUpload

Item, Job, Upload = BatchItem.Status, BatchJob.Status, BatchUpload.Status
FINISHED_UPLOADS = Q(status__in=[Upload.COMPLETE, Upload.REFUSED])  # these block nothing
RESULT_CHUNK_ROWS = 1000  # items read per query by a results export (it streams; memory stays flat)


def batch_job_get(*, membership: Membership, job_id: int, request=None, for_update: bool = False) -> BatchJob:
    """One job of the member's hospital (another hospital's is a 404, and logged)."""
    require(membership, Action.IMAGE_VIEW, request=request)
    return tenant_object_get(
        BatchJob.objects.select_related("model_version__model"),
        membership=membership,
        pk=job_id,
        request=request,
        action="batch.view",
        target_type="batch_job",
        message="No such job.",
        for_update=for_update,
    )


def batch_job_list(*, membership: Membership, request=None) -> QuerySet[BatchJob]:
    """The hospital's jobs, newest first, each with its progress annotated (see
    ``batch_jobs_progress``); the API pages through them, the jobs page shows the newest."""
    require(membership, Action.IMAGE_VIEW, request=request)
    return _with_progress(
        BatchJob.objects.for_tenant(membership.tenant)
        .select_related("model_version__model")
        .order_by("-created", "-id")
    )


def job_uploads_pending(job: BatchJob) -> QuerySet[BatchUpload]:
    """Archives still arriving or being unpacked: until they are done the job cannot start."""
    return job.uploads.exclude(FINISHED_UPLOADS)


def _count(queryset: QuerySet) -> Coalesce:
    """The rows of ``queryset`` (filtered on OuterRef("pk")) as a subquery: 0 when none."""
    counted = queryset.order_by().values("job_id").annotate(n=Count("id")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def _with_progress(jobs: QuerySet[BatchJob]) -> QuerySet[BatchJob]:
    items = BatchItem.objects.filter(job=OuterRef("pk"))
    uploads = BatchUpload.objects.filter(job=OuterRef("pk"))
    # the pace of the latest run (a retry starts a new one), not of the job's whole life
    read = items.filter(
        status__in=[Item.DONE, Item.FAILED], request__isnull=False, finished_at__gte=OuterRef("progress_since")
    )
    last_read = read.order_by().values("job_id").annotate(last=Max("finished_at")).values("last")
    return jobs.annotate(
        progress_since=Coalesce(F("resumed_at"), F("started_at")),
        **{f"items_{status}": _count(items.filter(status=status)) for status in Item.values},
        uploads_pending_n=_count(uploads.exclude(FINISHED_UPLOADS)),
        uploads_refused_n=_count(uploads.filter(status=Upload.REFUSED)),
        read_n=_count(read),
        read_last=Subquery(last_read),
    )


@dataclass(frozen=True)
class JobProgress:
    counts: dict[str, int]
    total: int
    finished: int
    state: str  # open, running, finished, cancelled
    images_per_s: float | None
    eta_s: float | None
    uploads_pending: int
    refused: tuple[str, ...] = ()  # each refused archive or prefix, and why, in words


def batch_job_progress(job: BatchJob) -> JobProgress:
    """One job's progress (its annotations, when it came from ``batch_job_list``)."""
    return batch_jobs_progress([job])[0]


def batch_jobs_progress(jobs: Iterable[BatchJob]) -> list[JobProgress]:
    """The progress of each job, in order; each one's ``_progress`` is set too (the API's
    serializer reads it). Jobs read without the annotations are read again with them, in one
    query; the refused uploads' words are one more query, only when a job has one."""
    jobs = list(jobs)
    missing = [job.pk for job in jobs if not hasattr(job, "uploads_refused_n")]
    if missing:
        annotated = _with_progress(BatchJob.objects.filter(pk__in=missing)).in_bulk()
        for job in jobs:
            if job.pk in annotated:
                for name in ("progress_since", "uploads_pending_n", "uploads_refused_n", "read_n", "read_last"):
                    setattr(job, name, getattr(annotated[job.pk], name))
                for status in Item.values:
                    setattr(job, f"items_{status}", getattr(annotated[job.pk], f"items_{status}"))
    refused: dict[int, list[str]] = {}
    with_refused = [job.pk for job in jobs if job.uploads_refused_n]  # type: ignore[attr-defined]  # annotated
    if with_refused:
        rows = (
            BatchUpload.objects.filter(job_id__in=with_refused, status=Upload.REFUSED)
            .order_by("id")
            .values_list("job_id", "kind", "source", "error")
        )
        for job_id, kind, source, error in rows:
            where = "The archive" if kind == "zip" else "The storage prefix " + source
            refused.setdefault(job_id, []).append(f"{where} was refused: {error}")
    progress = []
    for job in jobs:
        job._progress = _progress(job, tuple(refused.get(job.pk, ())))  # type: ignore[attr-defined]  # the serializer's cache
        progress.append(job._progress)  # type: ignore[attr-defined]
    return progress


def _progress(job: BatchJob, refused: tuple[str, ...]) -> JobProgress:
    counts = {status: getattr(job, f"items_{status}") for status in Item.values}
    total = sum(counts.values())
    finished = counts[Item.DONE] + counts[Item.FAILED] + counts[Item.CANCELLED]
    uploads_pending = job.uploads_pending_n  # type: ignore[attr-defined]
    state = job.status
    if job.status == Job.RUNNING and finished == total and not uploads_pending:
        state = "finished"
    rate = eta = None
    since = job.progress_since  # type: ignore[attr-defined]
    if since:
        count, last = job.read_n, job.read_last  # type: ignore[attr-defined]
        end = timezone.now() if state == Job.RUNNING else (last or timezone.now())
        elapsed = (end - since).total_seconds()
        if count and elapsed > 0:
            rate = round(count / elapsed, 2)
            remaining = counts[Item.QUEUED] + counts[Item.RUNNING]
            eta = round(remaining / rate, 1) if state == Job.RUNNING else 0.0
    return JobProgress(counts, total, finished, state, rate, eta, uploads_pending, refused)


def batch_results(job: BatchJob) -> Iterator[dict]:
    """One row per item, in order, with the finding or the error in words."""
    items = (
        BatchItem.objects.filter(job=job)
        .select_related("request__result", "request__model_version__model")  # the version's name, in one query
        .order_by("id")
    )
    for item in items.iterator(chunk_size=RESULT_CHUNK_ROWS):
        request = item.request
        result = getattr(request, "result", None) if request else None
        error = item.error or (request.error if request and item.status == Item.FAILED else "")
        yield {
            "item": item.pk,
            "position": item.position,
            "image": item.image_id,
            "status": item.status,
            "top_label": result.top_label if result else "",
            "probability": result.top_probability if result else None,
            "model_version": str(request.model_version) if request else "",
            "error": error,
        }
