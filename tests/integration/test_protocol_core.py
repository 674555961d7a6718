"""The protocols' shared core (protocols/core.py), through the KServe v2 routes: who may call
(the API's own authenticators, roles and hospitals), which version answers, that an image read is
a real, audited read of the caller's hospital on the caller's lane, kept out of clinicians'
worklists, and that a wait past the timeout answers 504 with the request id while the read goes
on. A read is finished by the real runner (``workers.runner.inference_run``) in a thread, as a
worker would, against committed rows."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import AccessEvent, Role
from accounts.service_accounts import api_key_create, api_key_revoke, service_account_create
from recognition.models import Image, InferenceRequest, ModelVersion, Study
from tests.conftest import PASSWORD, api_client_for, member, png_bytes
from tests.integration.test_registry import run, variant

Priority = InferenceRequest.Priority
INFER = "/v2/models/sightline-demo/infer"
WORKER_POLL_SECONDS = 0.05
WORKER_GIVES_UP_SECONDS = 60


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


def key_for(admin, name="nightly", role=Role.CLINICIAN, interactive=False):
    account = service_account_create(actor=admin, name=name, role=role)
    if interactive:
        account.interactive = True
        account.save(update_fields=["interactive"])
    key, raw = api_key_create(actor=admin, service_account=account)
    return key, raw


def client_with(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def image_request(*images: bytes) -> dict:
    """A KServe v2 JSON request with a BYTES input: each image as its base64 text."""
    encoded = [base64.b64encode(image).decode() for image in images]
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}]}


def post(client, body: dict, path: str = INFER):
    return client.post(path, json.dumps(body), content_type="application/json")


class Worker:
    """The worker's runner in a thread: it reads each queued request as the Celery task would."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        from django.db import connection

        from workers.runner import inference_run

        deadline = time.monotonic() + WORKER_GIVES_UP_SECONDS
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                queued = InferenceRequest.objects.filter(status=InferenceRequest.Status.QUEUED).first()
                if queued is not None:
                    inference_run(request_id=queued.pk)
                else:
                    time.sleep(WORKER_POLL_SECONDS)
        except BaseException as error:  # the test reports it
            self.error = error
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        assert self.error is None, self.error


# --- who may call ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_health_needs_no_token_and_names_no_hospital_or_model(demo_model):
    client = APIClient()
    live = client.get("/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    server = client.get("/v2").json()
    assert "binary_tensor_data" in server["extensions"]
    assert "sightline-demo" not in json.dumps(server)
    assert client.get("/v2/nothing-here").json() == {"error": "Not found."}


@pytest.mark.django_db
def test_without_a_valid_key_every_model_route_is_401_in_the_protocols_shape(demo_model, admin_a):
    anonymous = APIClient()
    for response in (
        anonymous.get("/v2/models/sightline-demo"),
        anonymous.get("/v2/models/sightline-demo/ready"),
        post(anonymous, image_request(png_bytes())),
    ):
        assert response.status_code == 401, response.content
        assert set(response.json()) == {"error"}
        assert response["WWW-Authenticate"].startswith("Bearer")
    key, raw = key_for(admin_a)
    assert client_with(raw + "x").get("/v2/models/sightline-demo").status_code == 401  # malformed
    api_key_revoke(actor=admin_a, api_key=key)
    revoked = client_with(raw).get("/v2/models/sightline-demo")
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]
    assert AccessEvent.objects.filter(action="auth.api_key", outcome=AccessEvent.Outcome.DENIED).exists()
    assert not Image.objects.exists()


@pytest.mark.django_db
def test_a_viewer_reads_metadata_but_cannot_infer_and_the_refusal_is_logged(demo_model, admin_a):
    _, raw = key_for(admin_a, name="dashboards", role=Role.VIEWER)
    viewer = client_with(raw)
    assert viewer.get("/v2/models/sightline-demo").status_code == 200
    refused = post(viewer, image_request(png_bytes()))
    assert refused.status_code == 403 and set(refused.json()) == {"error"}
    tensor = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]}
    assert post(viewer, tensor).status_code == 403
    denied = AccessEvent.objects.filter(action="image.upload", outcome=AccessEvent.Outcome.DENIED)
    assert denied.count() == 2 and "(key " in denied.first().actor_label
    assert not Image.objects.exists()


@pytest.mark.django_db
def test_a_person_with_a_token_may_call_and_another_hospital_named_is_a_404(demo_model, clinician_a, hospital_b):
    client = APIClient()
    tokens = client.post("/api/v1/auth/token/", {"username": "clinician", "password": PASSWORD}, format="json")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.json()['access']}")
    assert client.get("/v2/models/sightline-demo").status_code == 200
    elsewhere = client.get("/v2/models/sightline-demo", HTTP_X_TENANT=hospital_b.slug)
    assert elsewhere.status_code == 404 and set(elsewhere.json()) == {"error"}
    # a browser session is not a protocol credential: no CSRF check guards these routes
    session = APIClient()
    session.force_login(clinician_a.user)
    assert session.get("/api/v1/images/").status_code == 200  # the API takes the session
    assert session.get("/v2/models/sightline-demo").status_code == 401


# --- which version, and what a client needs to know ----------------------------------------------


@pytest.mark.django_db
def test_metadata_states_everything_an_fp32_input_needs(demo_model, admin_a):
    _, raw = key_for(admin_a)
    client = client_with(raw)
    metadata = client.get("/v2/models/sightline-demo").json()
    size = demo_model.manifest["input_size"]
    assert metadata["name"] == "sightline-demo" and metadata["versions"] == [str(demo_model.serial)]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, size, size]} in metadata["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]
    labels = demo_model.manifest["labels"]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)]} in metadata["outputs"]
    described = metadata["parameters"]
    assert described["labels"] == labels and described["version"] == demo_model.version
    assert described["input"]["mean"] == demo_model.manifest["mean"]
    assert described["input"]["std"] == demo_model.manifest["std"]
    assert described["task"] == demo_model.manifest["task"]
    # the version named by its serial (as tritonclient sends it) or its semantic version
    for version in (str(demo_model.serial), demo_model.version):
        assert client.get(f"/v2/models/sightline-demo/versions/{version}").json()["name"] == "sightline-demo"
        assert client.get(f"/v2/models/sightline-demo/versions/{version}/ready").json()["ready"] is True
    for missing in ("/v2/models/nope", "/v2/models/sightline-demo/versions/99", "/v2/models/nope/ready"):
        response = client.get(missing)
        assert response.status_code == 404 and set(response.json()) == {"error"}, missing


@pytest.mark.django_db
def test_a_version_the_hospital_may_not_use_is_a_404_until_an_operator_allows_it(
    demo_model, demo_package, tmp_path, admin_a
):
    from recognition.models import ModelAllowance

    run("register_model", str(variant(demo_package, tmp_path, version="1.1.0")), "--validate-here")
    other = ModelVersion.objects.get(version="1.1.0")
    _, raw = key_for(admin_a)
    client = client_with(raw)
    for version in (str(other.serial), "1.1.0"):
        response = client.get(f"/v2/models/sightline-demo/versions/{version}")
        assert response.status_code == 404 and set(response.json()) == {"error"}, version
        assert (
            post(client, image_request(png_bytes()), f"/v2/models/sightline-demo/versions/{version}/infer").status_code
            == 404
        )
    assert not Image.objects.exists()
    ModelAllowance.objects.create(tenant=admin_a.tenant, model=other.model, version=other)
    assert client.get(f"/v2/models/sightline-demo/versions/{other.serial}").status_code == 200


# --- image reads -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_image_read_is_an_audited_bulk_read_of_the_callers_hospital(demo_model, admin_a):
    _, raw = key_for(admin_a)
    with Worker():
        response = post(client_with(raw), image_request(png_bytes(opacity=True), png_bytes(opacity=False, seed=2)))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["model_name"] == "sightline-demo" and body["model_version"] == str(demo_model.serial)
    outputs = {output["name"]: output for output in body["outputs"]}
    labels = demo_model.manifest["labels"]
    assert outputs["probabilities"]["shape"] == [2, len(labels)]
    rows = np.asarray(outputs["probabilities"]["data"]).reshape(2, len(labels))
    assert outputs["label"]["data"] == [labels[int(row.argmax())] for row in rows]
    requests = InferenceRequest.objects.filter(pk__in=body["parameters"]["request_ids"])
    assert {(r.priority, r.protocol, r.tenant_id) for r in requests} == {(Priority.BULK, "kserve", admin_a.tenant_id)}
    images = Image.objects.filter(pk__in=body["parameters"]["image_ids"])
    assert {image.study.protocol for image in images} == {"kserve"}
    for image in images:  # the upload's own entry and the protocol's, both the key's
        for action in ("image.upload", "protocol.kserve_read"):
            event = AccessEvent.objects.get(action=action, target_type="image", target_id=str(image.pk))
            assert event.tenant_id == admin_a.tenant_id and "(key " in event.actor_label


@pytest.mark.django_db(transaction=True)
def test_an_interactive_key_reads_on_the_interactive_lane(demo_model, admin_a):
    _, raw = key_for(admin_a, name="bedside", interactive=True)
    with Worker():
        response = post(client_with(raw), image_request(png_bytes()))
    assert response.status_code == 200, response.content
    assert InferenceRequest.objects.get().priority == Priority.INTERACTIVE


@pytest.mark.django_db
@override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.3)
def test_past_the_timeout_it_is_a_504_with_the_request_id_and_the_read_goes_on(demo_model, admin_a):
    from workers.runner import inference_run

    _, raw = key_for(admin_a)
    response = post(client_with(raw), image_request(png_bytes()))
    assert response.status_code == 504, response.content
    request = InferenceRequest.objects.get()
    message = response.json()["error"]
    assert f"Request id {request.pk}" in message and f"/api/v1/images/{request.image_id}/" in message
    inference_run(request_id=request.pk)
    later = client_with(raw).get(f"/api/v1/images/{request.image_id}/")
    assert later.status_code == 200 and later.json()["results"], later.content


@pytest.mark.django_db
def test_a_bad_image_refuses_the_request_and_stores_nothing(demo_model, admin_a):
    _, raw = key_for(admin_a)
    client = client_with(raw)
    refused = post(client, image_request(png_bytes(), b"not an image"))
    assert refused.status_code == 415 and set(refused.json()) == {"error"}
    assert post(client, image_request(b"")).status_code == 422
    assert not Image.objects.exists() and not InferenceRequest.objects.exists()


@pytest.mark.django_db
def test_another_hospitals_protocol_image_is_a_404_for_its_api_page(demo_model, admin_a, clinician_b):
    from workers.runner import inference_run

    _, raw = key_for(admin_a)
    with override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.1):
        assert post(client_with(raw), image_request(png_bytes())).status_code == 504
    request = InferenceRequest.objects.get()
    inference_run(request_id=request.pk)
    assert api_client_for(clinician_b).get(f"/api/v1/images/{request.image_id}/").status_code == 404


@pytest.mark.django_db
def test_protocol_studies_stay_out_of_the_worklist_unless_asked_for(demo_model, admin_a, clinician_a):
    from tests.conftest import upload_file

    _, raw = key_for(admin_a)
    with override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.1):
        assert post(client_with(raw), image_request(png_bytes())).status_code == 504
    client = api_client_for(clinician_a)
    uploaded = client.post("/api/v1/images/", {"file": upload_file(png_bytes())}, format="multipart")
    assert uploaded.status_code == 201
    protocol_study = Study.objects.get(protocol="kserve")
    people = client.get("/api/v1/studies/").json()["results"]
    assert protocol_study.pk not in [row["id"] for row in people] and len(people) == 1
    asked = client.get("/api/v1/studies/?protocol=1").json()["results"]
    assert [row["id"] for row in asked] == [protocol_study.pk]
    images = client.get("/api/v1/images/").json()["results"]
    assert len(images) == 1 and images[0]["id"] == uploaded.json()["id"]
    assert len(client.get("/api/v1/images/?protocol=1").json()["results"]) == 1


# --- tensor reads ------------------------------------------------------------------------------


@pytest.mark.django_db
@override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.3)
def test_a_tensor_read_keeps_no_record_is_audited_and_checked_against_the_model_shape(demo_model, admin_a):
    _, raw = key_for(admin_a)
    client = client_with(raw)
    size = demo_model.manifest["input_size"]
    wrong = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}]}
    refused = post(client, wrong)
    assert refused.status_code == 400 and f"[N, 3, {size}, {size}]" in refused.json()["error"]
    values = [0.0] * (3 * size * size)
    right = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, size, size], "data": values}]}
    from recognition.health import _registry

    def timeouts():
        sample = {"protocol": "kserve", "outcome": "timeout"}
        return _registry.get_sample_value("sightline_protocol_tensor_reads_total", sample) or 0

    counted = timeouts()
    waited = post(client, right)  # no worker runs here: the 504, and nothing recorded
    assert waited.status_code == 504 and "tensor read" in waited.json()["error"]
    assert timeouts() == counted + 1
    assert b"sightline_protocol_tensor_reads_total" in APIClient().get("/metrics").content
    assert not Image.objects.exists() and not InferenceRequest.objects.exists()
    event = AccessEvent.objects.get(action="protocol.tensor_read")
    assert event.target_id == str(demo_model.pk) and event.tenant_id == admin_a.tenant_id


@pytest.mark.django_db
@override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.1)
def test_the_binary_tensor_extension_carries_length_prefixed_images(demo_model, admin_a):
    import tritonclient.http as httpclient
    from tritonclient.http._utils import _get_inference_request

    _, raw = key_for(admin_a)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([png_bytes(), png_bytes(seed=2)], dtype=object), binary_data=True)
    body, json_size = _get_inference_request(
        inputs=[tensor], request_id="", outputs=None, sequence_id=0, sequence_start=False, sequence_end=False,
        priority=0, timeout=None, custom_parameters=None,
    )  # fmt: skip
    response = client_with(raw).post(
        INFER, body, content_type="application/octet-stream", HTTP_INFERENCE_HEADER_CONTENT_LENGTH=str(json_size)
    )
    assert response.status_code == 504, response.content  # stored and queued: two images, no worker here
    assert InferenceRequest.objects.count() == 2


@pytest.mark.django_db
def test_the_worklist_page_shows_protocol_reads_only_under_its_filter(demo_model, admin_a, clinician_a):
    from django.test import Client

    _, raw = key_for(admin_a)
    with override_settings(SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS=0.1):
        assert post(client_with(raw), image_request(png_bytes())).status_code == 504
    study = Study.objects.get(protocol="kserve")
    browser = Client()
    browser.force_login(clinician_a.user)
    row = f'data-study="{study.pk}"'
    assert row not in browser.get("/worklist/").content.decode()
    filtered = browser.get("/worklist/?protocol=1").content.decode()
    assert row in filtered and 'name="protocol" value="1" checked' in filtered


@pytest.mark.django_db
def test_a_keys_rate_holds_for_protocol_calls_too(demo_model, admin_a):
    account = service_account_create(actor=admin_a, name="chatty", role=Role.CLINICIAN)
    _, raw = api_key_create(actor=admin_a, service_account=account, rate=1)
    client = client_with(raw)
    assert client.get("/v2/models/sightline-demo").status_code == 200
    limited = client.get("/v2/models/sightline-demo")
    assert limited.status_code == 429 and set(limited.json()) == {"error"} and int(limited["Retry-After"]) >= 1
