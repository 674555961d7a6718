"""The worker's service, in-process, with the real engine and database."""

import pytest
from django.core.files.storage import default_storage

from recognition.models import InferenceRequest, Result
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def queue_images(membership, count, **kwargs):
    images = [
        image_upload(membership=membership, upload=upload_file(png_bytes(seed=i, **kwargs))) for i in range(count)
    ]
    return [InferenceRequest.objects.get(image=image) for image in images]


def test_waiting_requests_of_one_version_run_as_full_batches(clinician_a, clinician_b, demo_model, settings):
    settings.SIGHTLINE_MAX_BATCH_SIZE = 4
    requests = queue_images(clinician_a, 3) + queue_images(clinician_b, 3)
    assert inference_run(request_id=requests[4].pk) == 6  # a batch of 4, then the 2 left
    first = InferenceRequest.objects.get(pk=requests[4].pk)
    assert first.status == "done" and first.batch_size == 4  # the triggering request is always in the first batch
    assert sorted(InferenceRequest.objects.values_list("batch_size", flat=True)) == [2, 2, 4, 4, 4, 4]
    for request in InferenceRequest.objects.all():
        assert request.result.tenant_id == request.tenant_id  # results stay with their hospital


def test_one_task_runs_at_most_the_configured_number_of_batches(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_BATCH_SIZE = 2
    settings.SIGHTLINE_MAX_BATCHES_PER_TASK = 2
    requests = queue_images(clinician_a, 5)
    assert inference_run(request_id=requests[0].pk) == 4
    assert InferenceRequest.objects.filter(status="queued").count() == 1


def test_interactive_requests_go_first_and_bulk_work_is_shared_round_robin(
    clinician_a, clinician_b, demo_model, settings
):
    from recognition.models import InferenceRequest as IR
    from workers.queue_policy import claim

    a_bulk = queue_images(clinician_a, 4)
    b_bulk = queue_images(clinician_b, 2)
    IR.objects.filter(pk__in=[r.pk for r in a_bulk + b_bulk]).update(priority=IR.Priority.BULK)
    interactive = queue_images(clinician_b, 1)[0]
    # a person waiting comes before any bulk work, in a batch of its own (not filled up with bulk)
    assert claim(model_version_id=demo_model.pk, limit=7, first_id=a_bulk[0].pk) == [interactive.pk]
    order = claim(model_version_id=demo_model.pk, limit=7)
    tenants = [IR.objects.get(pk=i).tenant_id for i in order]
    a, b = clinician_a.tenant_id, clinician_b.tenant_id
    assert tenants == [a, b, a, b, a, a]  # hospital A's bigger job does not starve B


def test_a_clinicians_request_overtakes_a_bulk_batch_already_claimed_ahead(
    clinician_a, clinician_b, demo_model, settings, monkeypatch
):
    """While bulk batch 1 runs, batch 2 is claimed and decoded ahead; a clinician's upload
    arriving meanwhile runs before batch 2, whose requests go back to the queue uncounted."""
    from workers.model_cache import model_handler

    settings.SIGHTLINE_MAX_BATCH_SIZE = 2
    bulk = queue_images(clinician_a, 4)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=InferenceRequest.Priority.BULK)
    handler = model_handler(demo_model)
    forward, order = handler.infer, []

    def infer_and_meanwhile_a_clinician_uploads(batch):
        if not order:
            order.append(queue_images(clinician_b, 1, size=40)[0].pk)
        return forward(batch)

    monkeypatch.setattr(handler, "infer", infer_and_meanwhile_a_clinician_uploads)
    assert inference_run(request_id=bulk[0].pk) == 5
    finished = list(InferenceRequest.objects.order_by("finished_at", "id").values_list("id", "attempts"))
    interactive = order[0]
    ids = [request_id for request_id, _ in finished]
    assert set(ids[:2]) == {bulk[0].pk, bulk[1].pk}
    assert ids[2] == interactive  # before bulk[2] and bulk[3], which had been claimed ahead
    assert all(attempts == 1 for _, attempts in finished)


def test_a_request_already_run_in_another_batch_is_a_no_op(clinician_a, demo_model):
    first, second = queue_images(clinician_a, 2)
    assert inference_run(request_id=first.pk) == 2
    assert inference_run(request_id=second.pk) == 0  # its own message arrives later: nothing to do
    assert inference_run(request_id=first.pk) == 0  # a redelivered message changes nothing
    assert Result.objects.count() == 2
    assert InferenceRequest.objects.get(pk=first.pk).attempts == 1


def test_an_unreadable_stored_image_fails_alone(clinician_a, demo_model):
    good, broken, other = queue_images(clinician_a, 3)
    with default_storage.open(broken.image.original.name, "wb") as handle:  # the upload, as stored
        handle.write(b"garbage where a PNG was")
    assert inference_run(request_id=good.pk) == 3
    outcome = {r.pk: r for r in InferenceRequest.objects.all()}
    assert outcome[good.pk].status == outcome[other.pk].status == "done"
    assert outcome[broken.pk].status == "failed"
    assert "could not be decoded" in outcome[broken.pk].error
    assert not Result.objects.filter(request=broken).exists()
    broken.image.refresh_from_db()  # the read that decodes an upload renders it, or fails it in words
    assert broken.image.state == "failed" and "damaged" in broken.image.unprocessable_reason
    for request in (good, other):
        request.image.refresh_from_db()
        assert request.image.state == "rendered"


def test_a_missing_stored_image_fails_alone(clinician_a, demo_model):
    good, missing = queue_images(clinician_a, 2)
    default_storage.delete(missing.image.original.name)
    inference_run(request_id=good.pk)
    assert InferenceRequest.objects.get(pk=good.pk).status == "done"
    assert InferenceRequest.objects.get(pk=missing.pk).error == "the stored image could not be read"


def test_a_tampered_model_package_is_refused_and_every_request_says_so(clinician_a, demo_model, settings, tmp_path):
    from workers.model_cache import model_cache_clear

    (request,) = queue_images(clinician_a, 1)
    model_cache_clear()
    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path
    with demo_model.package.open("rb") as source:
        original = source.read()
    data = bytearray(original)
    data[-200] ^= 0xFF  # flip a byte inside the stored weights
    with default_storage.open(demo_model.package.name, "wb") as target:
        target.write(bytes(data))
    try:
        assert inference_run(request_id=request.pk) == 1
        request.refresh_from_db()
        assert request.status == "failed"
        assert "the model could not be loaded" in request.error
    finally:  # the stored package outlives the test: later ones fetch it from storage
        with default_storage.open(demo_model.package.name, "wb") as target:
            target.write(original)
        model_cache_clear()


def test_the_result_is_unique_per_image_and_model_version(clinician_a, demo_model):
    from django.db import IntegrityError, transaction

    (request,) = queue_images(clinician_a, 1)
    inference_run(request_id=request.pk)
    result = Result.objects.get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Result.objects.create(
            tenant=result.tenant,
            request=InferenceRequest.objects.create(tenant=result.tenant, image=result.image, model_version=demo_model),
            image=result.image,
            model_version=demo_model,
            probabilities={},
            top_label="x",
            top_probability=0.5,
        )


def test_a_forward_pass_that_raises_fails_its_requests_instead_of_leaving_them_running(
    clinician_a, demo_model, monkeypatch
):
    from workers.model_cache import model_handler

    requests = queue_images(clinician_a, 2)
    handler = model_handler(demo_model)

    def out_of_memory(items):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(handler, "infer", out_of_memory)
    assert inference_run(request_id=requests[0].pk) == 2
    for request in InferenceRequest.objects.all():
        assert request.status == "failed"
        assert request.error == "inference failed: RuntimeError"


# Grad-CAM is made on request, never by a read: tests/integration/test_heatmaps.py
