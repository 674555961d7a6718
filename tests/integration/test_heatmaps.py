"""Grad-CAM on request: asked for once however many ask, made by the worker's code once, pushed,
served; never made by a read. The web side and the worker side in-process, with the real engine,
database and storage; the broker call and the channel-layer send are the only stand-ins (the real
ones are in tests/e2e/test_heatmap_live.py)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from celery import current_app
from django.core.files.storage import default_storage
from django.utils import timezone
from PIL import Image as PILImage

from accounts.models import AccessEvent
from recognition.models import ModelVersion, Result
from recognition.services.heatmaps import HEATMAP_RETRY_AFTER_SECONDS, result_heatmap_request
from recognition.services.images import image_upload
from tests.conftest import api_client_for, png_bytes, upload_file
from workers.heatmaps import heatmap_compute
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def sent(monkeypatch):
    """Tasks sent to the broker (by name) and messages sent to the channel layer, recorded."""
    tasks, messages = [], []
    app = type(current_app._get_current_object())
    monkeypatch.setattr(app, "send_task", lambda self, name, **options: tasks.append((name, options)))
    monkeypatch.setattr("accounts.events.send", lambda group, message: messages.append((group, message)))
    return tasks, messages


def read_image(membership, seed=9):
    image = image_upload(membership=membership, upload=upload_file(png_bytes(opacity=True, seed=seed)))
    inference_run(request_id=image.inference_requests.get().pk)
    image.refresh_from_db()  # rendered by the read where the upload only received it
    return image


def heatmap_files(tenant_id) -> set[str]:
    directory = f"tenants/{tenant_id}/heatmaps"
    return set(default_storage.listdir(directory)[1]) if default_storage.exists(directory) else set()


def test_a_read_stores_no_heatmap_and_says_none_was_asked_for(clinician_a, demo_model):
    image = read_image(clinician_a)
    assert Result.objects.get().heatmap == ""
    (result,) = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/").json()["results"]
    assert result["has_heatmap"] is False and result["heatmap_status"] == "none"


def test_many_viewers_asking_enqueue_one_computation(
    clinician_a, viewer_a, demo_model, sent, django_capture_on_commit_callbacks
):
    tasks, _ = sent
    image = read_image(clinician_a)
    with django_capture_on_commit_callbacks(execute=True):
        first = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
        again = api_client_for(viewer_a).get(f"/api/v1/images/{image.pk}/heatmap/")
    for response in (first, again):
        assert response.status_code == 202
        assert response.json() == {"status": "computing", "retry_after": HEATMAP_RETRY_AFTER_SECONDS}
        assert response["Retry-After"] == str(HEATMAP_RETRY_AFTER_SECONDS)
    result = Result.objects.get()
    assert tasks == [("workers.tasks.heatmap_compute", {"args": [result.pk], "queue": "interactive"})]
    assert AccessEvent.objects.filter(action="image.heatmap", target_id=str(image.pk)).count() == 2
    (shown,) = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/").json()["results"]
    assert shown["heatmap_status"] == "computing" and shown["has_heatmap"] is False


def test_a_request_no_worker_answered_is_sent_again_after_the_stall_time(
    clinician_a, demo_model, sent, settings, django_capture_on_commit_callbacks
):
    tasks, _ = sent
    image = read_image(clinician_a)
    stalled = timezone.now() - timedelta(seconds=settings.SIGHTLINE_HEATMAP_STALL_SECONDS + 1)
    Result.objects.update(heatmap_requested_at=stalled)  # asked, and its message lost with the broker
    with django_capture_on_commit_callbacks(execute=True):
        assert api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/").status_code == 202
        assert api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/").status_code == 202
    assert len(tasks) == 1  # sent again once, not by every request after the stall
    assert Result.objects.get().heatmap_requested_at > stalled


def test_the_worker_makes_it_once_pushes_heatmap_ready_and_it_is_served(
    clinician_a, clinician_b, demo_model, sent, django_capture_on_commit_callbacks
):
    _, messages = sent
    image = read_image(clinician_a)
    result = Result.objects.get()
    before = heatmap_files(clinician_a.tenant_id)  # stored files outlive the rolled-back rows of earlier tests
    with django_capture_on_commit_callbacks(execute=True):
        api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
        assert heatmap_compute(result_id=result.pk) == "ready"
        assert heatmap_compute(result_id=result.pk) == "ready"  # a second delivery changes nothing
    result.refresh_from_db()
    assert result.heatmap.name.startswith(f"tenants/{clinician_a.tenant_id}/heatmaps/")
    assert heatmap_files(clinician_a.tenant_id) - before == {result.heatmap.name.rsplit("/", 1)[1]}
    assert messages == [
        (
            f"tenant-{clinician_a.tenant_id}",
            {"type": "heatmap.ready", "image": image.pk, "result": result.pk, "status": "ready"},
        )
    ]

    response = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    overlay = PILImage.open(io.BytesIO(b"".join(response.streaming_content)))
    assert overlay.convert("RGBA").size == (image.width, image.height)  # laid over the image as shown
    (shown,) = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/").json()["results"]
    assert shown["heatmap_status"] == "ready" and shown["has_heatmap"] is True
    assert api_client_for(clinician_b).get(f"/api/v1/images/{image.pk}/heatmap/").status_code == 404


def test_two_deliveries_racing_store_one_overlay_and_the_loser_deletes_its_file(clinician_a, demo_model, monkeypatch):
    import workers.heatmaps as worker

    read_image(clinician_a)
    result = Result.objects.get()
    before = heatmap_files(clinician_a.tenant_id)
    make = worker._overlay

    def made_while_another_delivery_stored_its_own(row):
        png = make(row)
        Result.objects.filter(pk=row.pk).update(
            heatmap=default_storage.save(f"tenants/{row.tenant_id}/heatmaps/winner-{row.pk}.png", io.BytesIO(png))
        )
        return png

    monkeypatch.setattr(worker, "_overlay", made_while_another_delivery_stored_its_own)
    assert heatmap_compute(result_id=result.pk) == "ready"
    result.refresh_from_db()
    assert heatmap_files(clinician_a.tenant_id) - before == {result.heatmap.name.rsplit("/", 1)[1]}
    assert result.heatmap.name.startswith(f"tenants/{clinician_a.tenant_id}/heatmaps/winner-")


def test_another_hospital_gets_404_and_its_attempt_is_logged(clinician_a, clinician_b, demo_model, sent):
    tasks, _ = sent
    image = read_image(clinician_a)
    response = api_client_for(clinician_b).get(f"/api/v1/images/{image.pk}/heatmap/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert AccessEvent.objects.filter(action="image.heatmap", outcome="denied", target_id=str(image.pk)).count() == 1
    assert Result.objects.get().heatmap_requested_at is None and tasks == []


def test_a_model_without_a_gradcam_layer_has_no_heatmap_and_asks_no_worker(
    clinician_a, demo_model, sent, django_capture_on_commit_callbacks
):
    tasks, _ = sent
    image = read_image(clinician_a)
    manifest = {key: value for key, value in demo_model.manifest.items() if key != "gradcam_layer"}
    ModelVersion.objects.filter(pk=demo_model.pk).update(manifest=manifest)
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_heatmap"
    assert tasks == []
    (shown,) = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/").json()["results"]
    assert shown["heatmap_status"] == "unavailable"


def test_an_image_without_a_result_has_no_heatmap(clinician_a, demo_model, sent):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=4)))  # its read still queued
    response = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
    assert response.status_code == 404 and "no heatmap" in response.json()["error"]["message"]


def test_a_heatmap_that_cannot_be_made_ends_unavailable_in_words(
    clinician_a, demo_model, sent, django_capture_on_commit_callbacks
):
    _, messages = sent
    image = read_image(clinician_a)
    result = Result.objects.get()
    default_storage.delete(image.file.name)  # the display copy is gone: not a blip, no retry
    with django_capture_on_commit_callbacks(execute=True):
        assert heatmap_compute(result_id=result.pk) == "unavailable"
    assert messages[-1][1] == {"type": "heatmap.ready", "image": image.pk, "result": result.pk, "status": "unavailable"}
    response = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/heatmap/")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "This image has no heatmap: the stored image is gone"


def test_platform_callers_ask_by_result_without_a_membership(
    clinician_a, demo_model, sent, django_capture_on_commit_callbacks
):
    tasks, _ = sent
    read_image(clinician_a)
    result = Result.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        assert result_heatmap_request(result_id=result.pk).status == "computing"
    assert len(tasks) == 1
    heatmap_compute(result_id=result.pk)
    state = result_heatmap_request(result_id=result.pk)
    assert state.status == "ready" and state.result.heatmap


def test_the_viewer_page_asks_for_it_and_the_page_endpoint_answers_like_the_api(
    client, clinician_a, clinician_b, demo_model, sent
):
    image = read_image(clinician_a)
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{image.pk}/")
    assert b"data-heatmap-url" in page.content and b"Heatmap computing" in page.content
    assert b"sightline-config" in page.content  # the feed that carries heatmap.ready
    computing = client.get(f"/images/{image.pk}/heatmap/")
    assert computing.status_code == 202 and computing.json()["status"] == "computing"
    heatmap_compute(result_id=Result.objects.get().pk)
    ready = client.get(f"/images/{image.pk}/heatmap/")
    assert ready.status_code == 200 and ready["Content-Type"] == "image/png"
    assert AccessEvent.objects.filter(action="image.heatmap", target_id=str(image.pk)).count() == 2
    client.force_login(clinician_b.user)
    assert client.get(f"/images/{image.pk}/heatmap/").status_code == 404


def test_a_blip_is_raised_for_the_task_to_retry_and_leaves_the_heatmap_computing(clinician_a, demo_model, monkeypatch):
    import workers.heatmaps as worker

    read_image(clinician_a)
    result = Result.objects.get()

    def storage_away(version):
        raise ConnectionResetError("the storage went away")

    monkeypatch.setattr(worker, "model_handler", storage_away)
    with pytest.raises(ConnectionResetError):  # TransientRetryTask retries it with a backoff
        heatmap_compute(result_id=result.pk)
    result.refresh_from_db()
    assert result.heatmap == "" and result.heatmap_error == ""  # not given up: a retry or a re-request makes it
