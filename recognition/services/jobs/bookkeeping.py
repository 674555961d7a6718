"""Inference bookkeeping for jobs: items follow their requests' outcomes, and each job touched
hears one progress message after commit."""

from __future__ import annotations

from accounts.events import jobs_progress_on_commit

from ...models import BatchItem, BatchJob

Item = BatchItem.Status


def batch_items_on_outcome(request_ids_by_status: dict[str, list[int]], now) -> None:
    """Called where the worker stores outcomes: the items follow their requests, and each job
    touched gets one progress notification after commit."""
    touched: set[tuple[int, int]] = set()
    for status, ids in request_ids_by_status.items():
        if not ids:
            continue
        items = BatchItem.objects.filter(request_id__in=ids).exclude(status=Item.CANCELLED)
        touched.update(items.values_list("job_id", "tenant_id"))
        items.update(status=status, finished_at=now)
    if touched:
        jobs_progress_on_commit((tenant_id, job_id) for job_id, tenant_id in touched)


def batch_jobs_notify(jobs: list[BatchJob]) -> None:
    jobs_progress_on_commit((job.tenant_id, job.pk) for job in jobs)
