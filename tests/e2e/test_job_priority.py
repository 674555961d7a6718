"""While a bulk job keeps the only worker busy, a clinician's single upload is read before the job's
remaining images: it jumps the queue, waiting for at most the bulk batches already under way.

Behaviour, not speed: the order is read from the requests' own timestamps (created, finished_at);
how fast anything runs is the benchmarks' business (bench/)."""

from __future__ import annotations

import pytest
import requests
from django.conf import settings
from django.db.models import Q

from accounts.models import Membership
from recognition.models import BatchItem, InferenceRequest, Result
from recognition.services.jobs import batch_items_add_files, batch_job_create
from tests.conftest import png_bytes, upload_file
from tests.e2e.test_batches_live import _assert_exactly_once, bearer, wait_until

pytestmark = pytest.mark.e2e

BULK_IMAGES = 200


def test_an_interactive_upload_is_read_before_a_running_jobs_remaining_images(stack, live_demo):
    clinician = Membership.objects.get(user__username="clinician")
    job, _ = batch_job_create(membership=clinician, name="night run")
    files = [upload_file(png_bytes(size=256, seed=n), name=f"{n}.png") for n in range(BULK_IMAGES)]
    batch_items_add_files(membership=clinician, job_id=job.pk, files=files)
    # the batch size the stack's worker uses (its environment is this process's)
    max_batch = job.model_version.manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE
    assert max_batch <= BULK_IMAGES // 8, "too few images to keep the worker busy"

    headers = bearer(stack, "clinician")
    started = requests.post(f"{stack.base_url}/api/v1/batches/{job.pk}/start/", headers=headers, timeout=30)
    assert started.status_code == 200, started.text
    assert (started.json()["status"], started.json()["total"]) == ("running", BULK_IMAGES)
    # the worker is into the job: a batch is done, the rest waits
    assert wait_until(lambda: BatchItem.objects.filter(job=job, status="done").exists(), 120, 0.02)

    response = requests.post(
        f"{stack.base_url}/api/v1/images/",
        files={"file": ("urgent.png", png_bytes(size=256, seed=10_000), "application/octet-stream")},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text
    interactive = InferenceRequest.objects.get(image_id=response.json()["id"])
    assert interactive.priority == InferenceRequest.Priority.INTERACTIVE

    def finished():
        interactive.refresh_from_db()
        return interactive.status not in (InferenceRequest.Status.QUEUED, InferenceRequest.Status.RUNNING)

    assert wait_until(finished, 180, 0.05), interactive.status
    assert interactive.status == InferenceRequest.Status.DONE, interactive.error
    assert Result.objects.filter(request=interactive).count() == 1

    bulk = InferenceRequest.objects.filter(batch_items__job=job)
    assert bulk.count() == BULK_IMAGES and set(bulk.values_list("priority", flat=True)) == {1}

    def unfinished_at(moment):
        return bulk.filter(Q(finished_at__isnull=True) | Q(finished_at__gt=moment))

    # the scenario happened: when the clinician's request was made, much of the job still waited
    waiting_then = unfinished_at(interactive.created).count()
    assert waiting_then >= 3 * max_batch, f"only {waiting_then} bulk images were left: the job ran ahead"
    # it jumped the queue: bulk images were still waiting when its result was stored ...
    assert unfinished_at(interactive.finished_at).exists(), "every bulk image was read before it"
    # ... and it waited for at most the bulk batches already under way, not for the job's queue
    read_meanwhile = bulk.filter(finished_at__gt=interactive.created, finished_at__lte=interactive.finished_at)
    assert read_meanwhile.count() <= 2 * max_batch, (
        f"{read_meanwhile.count()} bulk images were read while it waited (batches of {max_batch})"
    )

    assert wait_until(lambda: not BatchItem.objects.filter(job=job).exclude(status="done").exists(), 300, 0.5), list(
        BatchItem.objects.filter(job=job).values_list("status", flat=True)
    )
    _assert_exactly_once(job, BULK_IMAGES)
    interactive.refresh_from_db()
    assert interactive.status == InferenceRequest.Status.DONE and interactive.attempts == 1
