"""Storing a batch's outcomes: one transaction per batch, whatever its size."""

from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from accounts import events
from core.bulk import rows_update
from dicomnet.sending import results_export_on_commit
from recognition.models import ERROR_LENGTH, InferenceRequest, Result
from recognition.services.jobs import batch_items_on_outcome
from recognition.services.shadow import shadow_reads_queue, shadow_split_exists
from recognition.services.studies import study_summary_refresh
from workers.engine.results import ItemResult

Status = InferenceRequest.Status
_MS = timedelta(milliseconds=1)
OUTCOME_FIELDS = ["status", "error", "finished_at", "batch_size", "claimed_by", "wait_ms", "inference_ms"]


def outcomes_store(requests: list[InferenceRequest], outcomes: list[ItemResult], *, on_stored=None) -> None:
    """One UPDATE for the requests, one INSERT for the results, one refresh of the studies, and
    the notifications sent together after commit: the number of statements does not grow with
    the batch. A request that is no longer running (it was reclaimed and finished elsewhere
    meanwhile) keeps the outcome it has. ``on_stored(finished)`` runs inside the transaction
    (the display copies of images rendered in the same pass)."""
    now = timezone.now()
    with transaction.atomic():
        # id → whether its hospital splits the model (the shadow reads' look-up, in the same statement)
        running = dict(
            InferenceRequest.objects.select_for_update()
            .filter(id__in=[request.pk for request in requests], status=Status.RUNNING)
            .annotate(split=shadow_split_exists())
            .values_list("id", "split")
        )
        finished, results, notices = [], [], []
        for request, outcome in zip(requests, outcomes, strict=True):
            if request.pk not in running:
                continue
            started = request.started_at or now
            request.status = Status.DONE if outcome.ok else Status.FAILED
            request.error = outcome.error[:ERROR_LENGTH]
            request.finished_at = now
            request.batch_size = len(requests)
            request.claimed_by = ""
            request.wait_ms = max(0, (started - request.created) // _MS)
            request.inference_ms = max(0, (now - started) // _MS)
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
                    )
                )
            if request.shadow:
                continue  # compared on the agreement page, never pushed to clinicians
            notices.append(
                events.ResultNotice(
                    tenant_id=request.tenant_id,
                    image_id=request.image_id,
                    status=request.status,
                    top_label=outcome.top_label,
                    probability=outcome.top_probability if outcome.ok else None,
                )
            )
        if on_stored is not None:
            on_stored(finished)
        rows_update(finished, OUTCOME_FIELDS)
        # unique per (image, version): a result made by an earlier delivery stands
        Result.objects.bulk_create(results, ignore_conflicts=True)
        # the image came with the row; a shadow read changes nothing a clinician sees
        study_summary_refresh({request.image.study_id for request in finished if not request.shadow})
        bulk = [r for r in finished if r.priority == InferenceRequest.Priority.BULK and not r.shadow]
        if bulk:  # only bulk requests belong to jobs (a shadow read to none)
            batch_items_on_outcome(
                {status: [r.pk for r in bulk if r.status == status] for status in (Status.DONE, Status.FAILED)}, now
            )
        # the other arm of a hospital's A/B split reads a share of its images
        shadow_reads_queue([request for request in finished if running[request.pk]])
        events.results_ready_on_commit(notices)
        # a model-server protocol's request waits in a web process for these (protocols/core.py)
        events.protocol_reads_done_on_commit([request.pk for request in finished if request.protocol])
        # issue 15: a DICOM image's finding goes back to the hospital's PACS (dicomnet/sending.py);
        # a batch of PNG/JPEG uploads asks nothing (that look-up was 8% of the worker's own time)
        results_export_on_commit(
            [r.pk for r in finished if r.status == Status.DONE and not r.shadow and r.image.format == "DICOM"]
        )


def outcomes_fail(requests: list[InferenceRequest], error: str) -> None:
    """The same failure, in words, for every request given."""
    outcomes_store(requests, [ItemResult(error=error)] * len(requests))
