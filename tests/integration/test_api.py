"""API v1 against the real database: JWT, upload, status, isolation, error shape."""

import pytest
from django.core.files.storage import default_storage
from rest_framework.test import APIClient

from accounts.models import AccessEvent, Role
from accounts.services import membership_grant
from accounts.signals import username_tried
from recognition.models import Image, InferenceRequest, Study
from tests.conftest import PASSWORD, api_client_for, png_bytes, render_received

pytestmark = pytest.mark.django_db


def stored_files():
    try:
        return set(default_storage.listdir("tenants")[0])
    except FileNotFoundError:
        return set()


def upload(client, data, **fields):
    return client.post("/api/v1/images/", {"file": _named(data), **fields}, format="multipart")


def _named(data, name="scan.png"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="image/png")


def test_token_obtain_and_refresh_rotates_the_refresh_token(clinician_a):
    client = APIClient()
    response = client.post("/api/v1/auth/token/", {"username": "clinician", "password": PASSWORD}, format="json")
    assert response.status_code == 200
    tokens = response.json()
    refreshed = client.post("/api/v1/auth/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    assert refreshed.status_code == 200
    assert refreshed.json()["refresh"] != tokens["refresh"]
    again = client.post("/api/v1/auth/token/refresh/", {"refresh": tokens["refresh"]}, format="json")
    assert again.status_code == 401  # the old refresh token was blacklisted by rotation
    assert again.json()["error"]["code"]


def test_a_wrong_password_is_401_in_the_error_shape_and_logged(clinician_a):
    response = APIClient().post("/api/v1/auth/token/", {"username": "clinician", "password": "nope"}, format="json")
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"code", "message", "detail"}
    typed = username_tried("clinician")  # the keyed hash of the name typed (issue 11, ids)
    assert AccessEvent.objects.filter(action="auth.login", outcome="failed", actor_label=typed).count() == 1


def test_the_api_accepts_a_bearer_token(clinician_a, demo_model):
    client = APIClient()
    access = client.post("/api/v1/auth/token/", {"username": "clinician", "password": PASSWORD}).json()["access"]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    assert client.get("/api/v1/images/").status_code == 200


def test_anonymous_requests_are_401():
    response = APIClient().get("/api/v1/images/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_upload_stores_the_image_and_queues_one_read_after_commit(
    clinician_a, demo_model, django_capture_on_commit_callbacks
):
    client = api_client_for(clinician_a)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = upload(client, png_bytes(), patient_id="PSEUDO-9", accession_number="ACC-1", modality="DX")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "queued"
    assert body["study"]["accession_number"] == "ACC-1"
    assert body["state"] == "received"  # stored as sent; the worker that reads it makes the display copy
    image = Image.objects.get(pk=body["id"])
    assert image.tenant == clinician_a.tenant
    assert image.uploaded_by == clinician_a.user
    assert image.original.name.startswith(f"tenants/{clinician_a.tenant_id}/originals/") and not image.file
    assert "scan" not in image.original.name  # the server names objects, not the client
    assert InferenceRequest.objects.get(image=image).model_version == demo_model
    assert len(callbacks) == 2  # the enqueue and the worklist's study.updated wait for the commit
    assert AccessEvent.objects.filter(action="image.upload", target_id=str(image.pk)).count() == 1


def test_the_task_message_carries_only_the_request_id(clinician_a, demo_model, django_capture_on_commit_callbacks):
    from unittest import mock

    client = api_client_for(clinician_a)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        image_id = upload(client, png_bytes(), patient_id="PSEUDO-9").json()["id"]
    with mock.patch("recognition.enqueue.current_app") as app:
        callbacks[0]()
    request_id = InferenceRequest.objects.get(image_id=image_id).pk
    app.send_task.assert_called_once_with("workers.tasks.infer", args=[request_id], queue="interactive")


def test_status_shows_the_result_once_there_is_one(clinician_a, demo_model):
    from workers.runner import inference_run

    client = api_client_for(clinician_a)
    image_id = upload(client, png_bytes(opacity=True, seed=4)).json()["id"]
    assert client.get(f"/api/v1/images/{image_id}/").json()["status"] == "queued"
    inference_run(request_id=InferenceRequest.objects.get(image_id=image_id).pk)
    body = client.get(f"/api/v1/images/{image_id}/").json()
    assert body["status"] == "done"
    assert body["top_label"] == "round_opacity"
    (result,) = body["results"]
    assert result["model"] == "sightline-demo" and result["model_version"] == "1.0.0" and result["demo"] is True
    assert set(result["probabilities"]) == {"no_finding", "round_opacity"}


def test_another_hospitals_image_is_404_like_a_missing_one(clinician_a, clinician_b, demo_model):
    image_id = upload(api_client_for(clinician_a), png_bytes()).json()["id"]
    outsider = api_client_for(clinician_b)
    for url in (f"/api/v1/images/{image_id}/", f"/api/v1/images/{image_id}/file/"):
        theirs, missing = outsider.get(url), outsider.get("/api/v1/images/999999/")
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json() == missing.json()
    assert outsider.get("/api/v1/images/").json()["results"] == []
    denied = AccessEvent.objects.filter(outcome="denied", target_id=str(image_id), actor=clinician_b.user)
    assert denied.count() == 2


def test_viewing_and_downloading_are_logged(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    image_id = upload(client, png_bytes()).json()["id"]
    render_received(Image.objects.get(pk=image_id))
    assert client.get(f"/api/v1/images/{image_id}/").status_code == 200
    download = client.get(f"/api/v1/images/{image_id}/file/")
    assert download.status_code == 200 and download["Content-Type"] == "image/png"
    assert b"".join(download.streaming_content).startswith(b"\x89PNG")
    actions = list(
        AccessEvent.objects.filter(target_type="image", target_id=str(image_id)).values_list("action", flat=True)
    )
    assert actions == ["image.upload", "image.view", "image.download"]


def test_a_viewer_may_read_but_not_upload(viewer_a, demo_model):
    response = upload(api_client_for(viewer_a), png_bytes())
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert Image.objects.count() == 0
    assert AccessEvent.objects.filter(action="image.upload", outcome="denied").count() == 1


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"this is not an image at all", 415, "not_an_image"),
        (
            b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,"
            b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
            415,
            "unsupported_format",
        ),
        (png_bytes()[:600], 422, "damaged_image"),
        (b"", 422, "empty_file"),
    ],
    ids=["text", "gif", "truncated-png", "empty"],
)
def test_bad_uploads_get_a_clear_error_and_leave_nothing_behind(clinician_a, demo_model, data, status, code):
    before = stored_files()
    response = upload(api_client_for(clinician_a), data)
    assert response.status_code == status, response.json()
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert Image.objects.count() == Study.objects.count() == InferenceRequest.objects.count() == 0
    assert stored_files() == before


def test_too_many_pixels_is_413(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_IMAGE_PIXELS = 100 * 100
    response = upload(api_client_for(clinician_a), png_bytes(size=256))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_pixels"


def test_too_many_bytes_is_413(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_UPLOAD_BYTES = 1000
    response = upload(api_client_for(clinician_a), png_bytes(size=256))
    assert response.status_code == 413


def test_uploads_are_served_only_as_a_copy_without_metadata(clinician_a, demo_model):
    import io

    from PIL import Image as PILImage
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "DOE^JANE")
    source = io.BytesIO()
    PILImage.open(io.BytesIO(png_bytes())).save(source, "PNG", pnginfo=info)
    client = api_client_for(clinician_a)
    image_id = upload(client, source.getvalue()).json()["id"]
    assert client.get(f"/api/v1/images/{image_id}/file/").status_code == 409  # received: the original never is
    render_received(Image.objects.get(pk=image_id))
    stored = b"".join(client.get(f"/api/v1/images/{image_id}/file/").streaming_content)
    assert b"DOE^JANE" not in stored
    assert PILImage.open(io.BytesIO(stored)).format == "PNG"


def test_missing_file_field_is_400(clinician_a, demo_model):
    response = api_client_for(clinician_a).post("/api/v1/images/", {}, format="multipart")
    assert response.status_code == 400
    assert "file" in response.json()["error"]["detail"]


def test_no_registered_model_is_503_and_stores_nothing(clinician_a):
    response = upload(api_client_for(clinician_a), png_bytes())
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_model"
    assert Image.objects.count() == 0


def test_a_member_of_two_hospitals_picks_one_with_x_tenant(clinician_a, hospital_b, demo_model):
    membership_grant(tenant=hospital_b, user=clinician_a.user, role=Role.VIEWER)
    client = api_client_for(clinician_a)
    ambiguous = client.get("/api/v1/images/")
    assert ambiguous.status_code == 400 and ambiguous.json()["error"]["code"] == "tenant_required"
    created = upload(client.__class__(), b"")  # anonymous: 401 before anything else
    assert created.status_code == 401
    client.credentials(HTTP_X_TENANT="demo-general")
    image_id = upload(client, png_bytes()).json()["id"]
    client.credentials(HTTP_X_TENANT="demo-childrens")
    assert client.get(f"/api/v1/images/{image_id}/").status_code == 404
    assert upload(client, png_bytes()).status_code == 403  # viewer there
    client.credentials(HTTP_X_TENANT="no-such-hospital")
    assert client.get("/api/v1/images/").status_code == 404


def test_the_client_cannot_set_the_tenant_or_the_uploader(clinician_a, clinician_b, demo_model):
    response = upload(
        api_client_for(clinician_a), png_bytes(), tenant=clinician_b.tenant_id, uploaded_by=clinician_b.user_id
    )
    image = Image.objects.get(pk=response.json()["id"])
    assert image.tenant == clinician_a.tenant and image.uploaded_by == clinician_a.user


def test_the_openapi_schema_describes_the_image_endpoints(client):
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/api/v1/images/", "/api/v1/images/{image_id}/", "/api/v1/auth/token/"} <= set(schema["paths"])
    assert client.get("/api/v1/docs/").status_code == 200


def test_reading_the_list_is_logged(clinician_a, demo_model):
    api_client_for(clinician_a).get("/api/v1/images/")
    assert (
        AccessEvent.objects.filter(action="image.list", actor=clinician_a.user, tenant=clinician_a.tenant).count() == 1
    )


def test_an_accession_number_of_another_patient_is_409(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    assert upload(client, png_bytes(), accession_number="ACC-7", patient_id="P-1").status_code == 201
    response = upload(client, png_bytes(), accession_number="ACC-7", patient_id="P-2")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "accession_patient_mismatch"
    assert Image.objects.count() == 1
    assert upload(client, png_bytes(), accession_number="ACC-7", patient_id="P-1").status_code == 201


def test_a_request_larger_than_the_cap_is_413_before_parsing(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_REQUEST_BYTES = 2000
    response = upload(api_client_for(clinician_a), png_bytes(size=256))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert Image.objects.count() == 0


def test_the_api_download_is_not_cached(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    image_id = upload(client, png_bytes()).json()["id"]
    render_received(Image.objects.get(pk=image_id))
    assert client.get(f"/api/v1/images/{image_id}/file/")["Cache-Control"] == "private, no-store"


@pytest.mark.django_db(transaction=True)
def test_a_broker_outage_keeps_the_committed_upload(clinician_a, demo_model):
    """The enqueue runs after commit; if Redis is down, the image and its queued request stay."""
    from unittest import mock

    with (
        mock.patch("recognition.enqueue.current_app") as app,
        mock.patch("recognition.enqueue.logger") as logger,
    ):
        app.send_task.side_effect = ConnectionError("broker down")
        response = upload(api_client_for(clinician_a), png_bytes())
    assert response.status_code == 201
    assert "broker unavailable" in logger.warning.call_args.args[0]  # one line, not a traceback
    image = Image.objects.get(pk=response.json()["id"])
    assert default_storage.exists(image.original.name)
    assert InferenceRequest.objects.get(image=image).status == "queued"
