"""Two lanes, the web side: interactive uploads refused (429, Retry-After) past the backlog bound,
bulk work never counted or refused, and per-lane depth and latency in /metrics."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import AccessEvent
from config.openapi import declared_statuses
from recognition.apis import ImageListCreateApi
from recognition.models import Image, InferenceRequest
from recognition.services.admission import interactive_backlog
from recognition.services.images import image_upload
from tests.conftest import api_client_for, png_bytes, upload_file
from tests.e2e.conftest import free_port
from tests.integration.test_health import _plans
from workers.runner import inference_run

pytestmark = pytest.mark.django_db
Priority, Status = InferenceRequest.Priority, InferenceRequest.Status


def upload(client, seed: int):
    return client.post(
        "/api/v1/images/", {"file": SimpleUploadedFile("scan.png", png_bytes(seed=seed, size=64))}, format="multipart"
    )


def queue_bulk(version, image, n: int) -> None:
    InferenceRequest.objects.bulk_create(
        InferenceRequest(tenant=image.tenant, image=image, model_version=version, priority=Priority.BULK)
        for _ in range(n)
    )


def test_the_upload_past_the_bound_is_refused_with_retry_after_and_stores_nothing(settings, clinician_a, demo_model):
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 2
    settings.SIGHTLINE_INTERACTIVE_RETRY_AFTER_SECONDS = 7
    client = api_client_for(clinician_a)
    assert [upload(client, seed).status_code for seed in (1, 2)] == [201, 201]  # both wait: no worker here
    images, events = Image.objects.count(), AccessEvent.objects.count()

    refused = upload(client, 3)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "7"
    error = refused.json()["error"]
    assert error["code"] == "interactive_backlog"
    assert "try again in 7 seconds" in error["message"] and "not stored" in error["message"]
    assert (Image.objects.count(), AccessEvent.objects.count()) == (images, events)  # nothing stored
    assert InferenceRequest.objects.filter(priority=Priority.INTERACTIVE).count() == 2

    inference_run(request_id=InferenceRequest.objects.order_by("id").first().pk)  # the backlog is read
    assert upload(client, 4).status_code == 201


def test_a_bound_of_zero_never_refuses(settings, clinician_a, demo_model):
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 0
    client = api_client_for(clinician_a)
    assert [upload(client, seed).status_code for seed in (1, 2)] == [201, 201]


def test_bulk_reads_are_not_counted_and_bulk_uploads_are_not_refused(settings, clinician_a, demo_model):
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 1
    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "night films"}, format="json").json()
    files = [SimpleUploadedFile(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(3)]
    assert client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart").status_code == 202
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200
    assert InferenceRequest.objects.filter(priority=Priority.BULK, status=Status.QUEUED).count() == 3
    assert upload(client, 7).status_code == 201  # three bulk reads wait, no interactive one

    assert upload(client, 8).status_code == 429  # now one interactive read waits: the bound
    job = client.post("/api/v1/batches/", {"name": "more films"}, format="json").json()
    files = [SimpleUploadedFile("x.png", png_bytes(seed=9, size=64))]
    assert client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart").status_code == 202
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200


def test_the_upload_page_answers_429_with_retry_after_in_words(settings, client, clinician_a, demo_model):
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 1
    image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=1)))
    client.force_login(clinician_a.user)
    images = Image.objects.count()
    response = client.post("/upload/", {"files": [SimpleUploadedFile("a.png", png_bytes(seed=2))]})
    assert response.status_code == 429
    assert response["Retry-After"] == str(settings.SIGHTLINE_INTERACTIVE_RETRY_AFTER_SECONDS)
    assert b"Too many images are waiting" in response.content
    assert Image.objects.count() == images


def test_the_schema_documents_the_429_of_an_upload():
    assert 429 in declared_statuses(ImageListCreateApi, "post")


def test_the_backlog_is_one_query_on_the_claim_index_that_reads_no_bulk_row(clinician_a, demo_model):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=1)))
    queue_bulk(demo_model, image, 300)  # a bulk job's backlog beside one interactive read
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # the planner's statistics, as a live database keeps them
            cursor.execute("ANALYZE recognition_inferencerequest")
    with CaptureQueriesContext(connection) as captured:
        assert interactive_backlog() == 1
    (query,) = captured.captured_queries
    (plan,) = _plans([query])
    # each version's queued interactive reads are one range of (version, status, priority, id):
    # the bulk rows are not read (only the model versions' small table is read whole)
    assert "inference_claim" in plan and "inference_running" not in plan, plan
    steps = plan.split(" | ")
    assert not [step for step in steps if step.startswith("SCAN") and "modelversion" not in step], plan
    assert "Seq Scan on recognition_inferencerequest" not in plan, plan

    image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=2)))
    assert interactive_backlog() == 2


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_show_depth_and_latency_per_lane(client, settings, clinician_a, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # broker depth is absent then
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 50
    first = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=1)))
    inference_run(request_id=first.inference_requests.get().pk)
    image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=2)))  # waits
    queue_bulk(demo_model, first, 4)
    one_bulk = InferenceRequest.objects.filter(priority=Priority.BULK).order_by("id").first()
    InferenceRequest.objects.filter(pk=one_bulk.pk).update(status=Status.RUNNING)
    done = InferenceRequest.objects.get(status=Status.DONE)
    InferenceRequest.objects.filter(pk=done.pk).update(wait_ms=40, inference_ms=30, batch_size=1)
    InferenceRequest.objects.create(
        tenant=done.tenant,
        image=done.image,
        model_version=demo_model,
        priority=Priority.BULK,
        status=Status.DONE,
        wait_ms=3000,
        inference_ms=200,
        batch_size=8,
        started_at=done.finished_at,
        finished_at=done.finished_at,
    )

    samples = metric_samples(client.get("/metrics").content.decode())

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("sightline_lane_requests", lane="interactive", status="queued") == 1
    assert value("sightline_lane_requests", lane="interactive", status="running") == 0
    assert value("sightline_lane_requests", lane="bulk", status="queued") == 3
    assert value("sightline_lane_requests", lane="bulk", status="running") == 1
    assert value("sightline_inference_requests", status="queued") == 4  # both lanes together
    assert value("sightline_interactive_queue_max") == 50
    # wait: the interactive read within 50 ms, the bulk one only past 2.5 s
    assert value("sightline_queue_wait_ms_bucket", lane="interactive", le="50") == 1
    assert value("sightline_queue_wait_ms_bucket", lane="bulk", le="2500") == 0
    assert value("sightline_queue_wait_ms_bucket", lane="bulk", le="10000") == 1
    assert value("sightline_queue_wait_ms_gsum", lane="bulk") == 3000
    assert value("sightline_inference_latency_ms_bucket", lane="interactive", le="25") == 0
    assert value("sightline_inference_latency_ms_bucket", lane="interactive", le="50") == 1
    assert value("sightline_inference_latency_ms_gcount", lane="bulk") == 1
    assert value("sightline_batch_size_bucket", lane="bulk", le="4") == 0
    assert value("sightline_batch_size_bucket", lane="bulk", le="8") == 1
    assert value("sightline_inference_finished", status="done") == 2
