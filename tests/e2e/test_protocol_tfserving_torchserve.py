"""TF Serving REST and TorchServe's inference API on the live stack (uvicorn, a real Celery
worker), called as their documentation calls them: plain HTTP with ``requests`` for TF Serving,
``curl`` for TorchServe, signed in with a service account's API key."""

from __future__ import annotations

import base64
import io
import json
import statistics
import subprocess
import time

import numpy as np
import pytest
import requests
from PIL import Image as PILImage

from accounts.models import AccessEvent, Role, Tenant
from accounts.service_accounts import api_key_create, service_account_create
from core.errors import Invalid
from recognition.models import Image, InferenceRequest, ModelAllowance, ModelVersion, Study
from tests.conftest import png_bytes
from tests.e2e.test_revocation import member
from tests.integration.test_registry import variant
from workers.engine import synthetic, training
from workers.registration import model_version_register

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

MODEL = training.DEMO_NAME
SIZE = training.DEMO_INPUT_SIZE
OPACITY, CLEAR = png_bytes(opacity=True, seed=41, size=SIZE), png_bytes(opacity=False, seed=42, size=SIZE)
TIMEOUT = 60
LATENCY_ROUNDS = 10
HEARTBEAT_WAIT = 30  # two of the worker's heartbeats (recognition.health.HEARTBEAT_SECONDS)
SECOND = "1.1.0"  # a second version of the demo model (the same weights), serial 2


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def key_for(tenant: str, role: Role, name: str, *, interactive: bool = False) -> str:
    admin = member(f"admin-{tenant}", tenant, Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name=name, role=role)
    if interactive:  # a person waits on its reads
        account.interactive = True
        account.save(update_fields=["interactive"])
    _, raw = api_key_create(actor=admin, service_account=account)
    return raw


def bearer(raw: str) -> dict:
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture
def second_version(live_demo, demo_package, tmp_path):
    """Version 2, which hospital B (Demo Children's) is allowed to name and hospital A is not."""
    version, _ = model_version_register(package_path=variant(demo_package, tmp_path, version=SECOND), alias=None)
    ModelAllowance.objects.create(tenant=childrens_hospital(), model=version.model, version=version)
    return version


def childrens_hospital() -> Tenant:
    return Tenant.objects.get(slug="demo-childrens")


def tensor_from_metadata(png: bytes, metadata: dict) -> list:
    """An FP32 input built from the metadata alone, as a client would."""
    described = metadata["metadata"]["sightline"]["input"]
    _, channels, height, width = described["shape"]
    scale, mean, std = (described["normalisation"][key] for key in ("scale", "mean", "std"))
    with PILImage.open(io.BytesIO(png)) as image:
        rgb = np.asarray(image.convert("RGB").resize((width, height), PILImage.Resampling.BILINEAR), dtype=np.float32)
    pixels = rgb.transpose(2, 0, 1) * scale
    assert pixels.shape[0] == channels
    return ((pixels - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]).tolist()


# --- TF Serving REST -----------------------------------------------------------------------------


def test_a_tf_serving_client_reads_images_and_tensors_by_version_and_label(stack, live_demo):
    raw = key_for("demo-general", Role.CLINICIAN, "tf-client")
    base, headers = f"{stack.base_url}/v1/models/{MODEL}", bearer(raw)

    status = requests.get(base, headers=headers, timeout=10)
    assert status.status_code == 200, status.text
    assert status.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert requests.get(f"{base}/labels/production", headers=headers, timeout=10).json() == status.json()
    metadata = requests.get(f"{base}/metadata", headers=headers, timeout=10).json()
    assert metadata["model_spec"]["version"] == "1"
    assert metadata["metadata"]["sightline"]["labels"] == list(synthetic.LABELS)
    tensor_input = metadata["metadata"]["signature_def"]["signature_def"]["tensor"]["inputs"]["images"]
    assert [d["size"] for d in tensor_input["tensor_shape"]["dim"]] == ["-1", "3", str(SIZE), str(SIZE)]

    # row format, two images, the model chosen by the hospital's routing
    rows = requests.post(
        f"{base}:predict", json={"instances": [b64(OPACITY), b64(CLEAR)]}, headers=headers, timeout=TIMEOUT
    )
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    assert [p["label"] for p in predictions] == ["round_opacity", "no_finding"]
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 for p in predictions)
    request_ids = [int(pk) for pk in rows.headers["X-Inference-Request-Ids"].split(",")]
    assert len(request_ids) == 2
    reads = InferenceRequest.objects.filter(pk__in=request_ids)
    assert set(reads.values_list("protocol", "priority")) == {("tfserving", InferenceRequest.Priority.BULK)}

    # columnar, version 1 named in the URL; and :classify under the production label
    columns = requests.post(
        f"{base}/versions/1:predict", json={"inputs": {"image_bytes": [b64(OPACITY)]}}, headers=headers, timeout=TIMEOUT
    )
    assert columns.status_code == 200, columns.text
    outputs = columns.json()["outputs"]
    assert outputs["label"] == ["round_opacity"]
    assert outputs["probabilities"][0] == pytest.approx(predictions[0]["probabilities"], abs=1e-4)
    classified = requests.post(
        f"{base}/labels/production:classify",
        json={"examples": [{"image": b64(CLEAR)}]},
        headers=headers,
        timeout=TIMEOUT,
    )
    assert classified.status_code == 200, classified.text
    (result,) = classified.json()["results"]
    assert result[0][0] == "no_finding" and result[0][1] > result[1][1]
    assert result[0][1] == pytest.approx(predictions[1]["probabilities"][0], abs=1e-4)

    # an FP32 tensor built from the metadata alone: the same answer, and nothing stored
    images_before = Image.objects.count()
    tensor = requests.post(
        f"{base}:predict",
        json={"instances": [tensor_from_metadata(OPACITY, metadata)]},
        headers=headers,
        timeout=TIMEOUT,
    )
    assert tensor.status_code == 200, tensor.text
    (from_tensor,) = tensor.json()["predictions"]
    assert from_tensor["label"] == "round_opacity"
    assert from_tensor["probabilities"] == pytest.approx(predictions[0]["probabilities"], abs=1e-3)
    assert Image.objects.count() == images_before

    # every read is the hospital's, out of clinicians' worklists, and in the access log
    assert set(Study.objects.values_list("protocol", flat=True)) == {"tfserving"}
    reads = AccessEvent.objects.filter(action="protocol.tfserving_read", tenant__slug="demo-general")
    assert reads.count() == 4  # two rows, one column, one example
    assert set(reads.values_list("actor__username", flat=True)) == {"svc:demo-general:tf-client"}
    assert AccessEvent.objects.filter(action="protocol.tensor_read", tenant__slug="demo-general").count() == 1


def test_tf_serving_refusals_are_in_its_own_shape(stack, live_demo, second_version, demo_package, tmp_path):
    base = f"{stack.base_url}/v1/models/{MODEL}"
    body = {"instances": [b64(OPACITY)]}

    live = requests.get(f"{stack.base_url}/v1/health/live", timeout=10)  # a probe needs no token
    assert live.json() == {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    # ready once a worker's heartbeat says it serves the production model; either way it names nothing
    ready = requests.get(f"{stack.base_url}/v1/health/ready", timeout=10)
    assert ready.status_code in (200, 503) and set(ready.json()) == {"state", "status"}
    assert MODEL not in ready.text and "demo" not in ready.text
    anonymous = requests.get(base, timeout=10)
    assert anonymous.status_code == 401
    assert set(anonymous.json()) == {"error"}
    assert requests.get(f"{stack.base_url}/v1/models/no-such-model", timeout=10).json() == anonymous.json()

    viewer = bearer(key_for("demo-general", Role.VIEWER, "tf-viewer"))
    assert requests.get(base, headers=viewer, timeout=10).status_code == 200  # status and metadata: any member
    refused = requests.post(f"{base}:predict", json=body, headers=viewer, timeout=TIMEOUT)
    assert refused.status_code == 403 and set(refused.json()) == {"error"}

    general = bearer(key_for("demo-general", Role.CLINICIAN, "tf-general"))
    childrens = bearer(key_for("demo-childrens", Role.CLINICIAN, "tf-childrens"))
    # version 2 is allowed to hospital B only: to A it does not exist
    mine = requests.post(f"{base}/versions/2:predict", json=body, headers=childrens, timeout=TIMEOUT)
    assert mine.status_code == 200, mine.text
    assert mine.json()["predictions"][0]["label"] == "round_opacity"
    for url in (f"{base}/versions/2", f"{base}/versions/2/metadata"):
        theirs = requests.get(url, headers=general, timeout=10)
        assert theirs.status_code == 404, theirs.text
        assert theirs.json() == {"error": f"Servable not found for request: Specific({MODEL}, 2)"}
    theirs = requests.post(f"{base}/versions/2:predict", json=body, headers=general, timeout=TIMEOUT)
    assert theirs.status_code == 404 and theirs.json()["error"].startswith("Servable not found")
    listed = requests.get(base, headers=childrens, timeout=10).json()["model_version_status"]
    assert [entry["version"] for entry in listed] == ["2", "1"]
    assert [e["version"] for e in requests.get(base, headers=general, timeout=10).json()["model_version_status"]] == [
        "1"
    ]

    for url, payload, words in [
        (f"{base}:predict", {"instance": []}, "Missing 'inputs' or 'instances' key"),
        (f"{base}:predict", {"instances": [[[0.0]]]}, "expected shape"),
        (f"{stack.base_url}/v1/models/no-such-model:predict", body, "Could not find any versions"),
        (f"{base}/labels/canary:predict", body, "canary"),
    ]:
        wrong = requests.post(url, json=payload, headers=general, timeout=TIMEOUT)
        assert 400 <= wrong.status_code < 500 and words in wrong.json()["error"], wrong.text
    # a version hospital B may name that its registration checks refused: ended, with the reason
    with pytest.raises(Invalid):
        model_version_register(package_path=variant(demo_package, tmp_path, version="9.0.0", labels=["a", "b", "c"]))
    refused = ModelVersion.objects.get(version="9.0.0")
    ModelAllowance.objects.create(tenant=childrens_hospital(), model=refused.model, version=refused)
    (ended,) = requests.get(f"{base}/versions/{refused.serial}", headers=childrens, timeout=10).json()[
        "model_version_status"
    ]
    assert ended["state"] == "END" and ended["status"]["error_message"] == refused.refusal_reason
    ended_read = requests.post(f"{base}/versions/{refused.serial}:predict", json=body, headers=childrens, timeout=10)
    assert ended_read.status_code == 409 and set(ended_read.json()) == {"error"}

    wrong_verb = requests.get(f"{base}:predict", headers=general, timeout=10)
    assert wrong_verb.status_code == 405 and set(wrong_verb.json()) == {"error"}
    unknown = requests.get(f"{stack.base_url}/v1/models/{MODEL}:explain", headers=general, timeout=10)
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    assert not AccessEvent.objects.filter(action="protocol.tfserving_read", tenant__slug="demo-general").exists()
    assert ModelVersion.objects.get(version=SECOND).serial == 2


# --- TorchServe ----------------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, object]:
    """``curl`` as TorchServe's documentation shows it; (status, parsed body)."""
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_a_torchserve_client_predicts_with_curl_and_reads_the_model_descriptions(stack, live_demo, tmp_path):
    raw = key_for("demo-general", Role.CLINICIAN, "ts-client")
    auth = ["-H", f"Authorization: Bearer {raw}"]
    scan = tmp_path / "scan.png"
    scan.write_bytes(OPACITY)
    url = f"{stack.base_url}/predictions/{MODEL}"

    answers = [
        curl(*auth, url, "-T", str(scan)),
        curl(*auth, "-X", "POST", url, "--data-binary", f"@{scan}", "-H", "Content-Type: application/octet-stream"),
        curl(*auth, f"{url}/1.0.0", "-F", f"data=@{scan}"),
        curl(*auth, f"{url}/1", "-F", f"data=@{scan}"),  # the integer serial names it too
    ]
    for status, answer in answers:
        assert status == 200, answer
        assert isinstance(answer, dict) and list(answer)[0] == "round_opacity"
        assert list(answer) == sorted(answer, key=answer.get, reverse=True)
        assert sum(answer.values()) == pytest.approx(1, abs=1e-4)  # two labels: the top five are all
    assert AccessEvent.objects.filter(action="protocol.torchserve_read", tenant__slug="demo-general").count() == 4
    assert set(Study.objects.values_list("protocol", flat=True)) == {"torchserve"}

    deadline = time.monotonic() + HEARTBEAT_WAIT
    while (ping := curl(f"{stack.base_url}/ping")) != (200, {"status": "Healthy"}):  # no token
        assert ping == (500, {"status": "Unhealthy"}) and time.monotonic() < deadline, ping
        time.sleep(1)  # healthy once the worker's heartbeat names the model it loaded for these reads
    status, listed = curl(*auth, f"{stack.base_url}/models")
    assert status == 200 and listed == {"models": [{"modelName": MODEL, "modelUrl": listed["models"][0]["modelUrl"]}]}
    status, described = curl(*auth, f"{stack.base_url}/models/{MODEL}")
    assert status == 200 and isinstance(described, list)
    (entry,) = described
    assert entry["modelName"] == MODEL and entry["modelVersion"] == training.DEMO_VERSION
    assert entry["modelUrl"] == listed["models"][0]["modelUrl"]
    assert any(worker["status"] == "READY" for worker in entry["workers"])  # the worker that read the scans
    assert entry["metadata"]["labels"] == list(synthetic.LABELS)
    assert curl(*auth, f"{stack.base_url}/models/{MODEL}/all")[1][0]["modelVersion"] == training.DEMO_VERSION

    quick = ["-H", f"Authorization: Bearer {key_for('demo-general', Role.CLINICIAN, 'ts-desk', interactive=True)}"]
    status, answer = curl(*quick, url, "-T", str(scan))
    assert status == 200 and list(answer)[0] == "round_opacity"
    lanes = InferenceRequest.objects.filter(protocol="torchserve").order_by("id").values_list("priority", flat=True)
    assert list(lanes) == [InferenceRequest.Priority.BULK] * 4 + [InferenceRequest.Priority.INTERACTIVE]


def test_torchserve_refusals_are_in_its_own_shape(stack, live_demo, second_version, tmp_path):
    scan = tmp_path / "scan.png"
    scan.write_bytes(OPACITY)
    url = f"{stack.base_url}/predictions/{MODEL}"

    status, anonymous = curl(url, "-T", str(scan))
    assert status == 401 and set(anonymous) == {"code", "type", "message"} and anonymous["code"] == 401
    viewer = ["-H", f"Authorization: Bearer {key_for('demo-general', Role.VIEWER, 'ts-viewer')}"]
    status, refused = curl(*viewer, url, "-T", str(scan))
    assert status == 403 and refused["code"] == 403 and refused["type"] == "ForbiddenException"

    general = ["-H", f"Authorization: Bearer {key_for('demo-general', Role.CLINICIAN, 'ts-general')}"]
    childrens = ["-H", f"Authorization: Bearer {key_for('demo-childrens', Role.CLINICIAN, 'ts-childrens')}"]
    status, mine = curl(*childrens, f"{url}/{SECOND}", "-T", str(scan))
    assert status == 200 and list(mine)[0] == "round_opacity"
    for path in (f"/predictions/{MODEL}/{SECOND}", f"/models/{MODEL}/{SECOND}"):
        method = ["-T", str(scan)] if path.startswith("/predictions") else []
        status, theirs = curl(*general, f"{stack.base_url}{path}", *method)
        assert status == 404, theirs
        assert theirs == {
            "code": 404,
            "type": "ModelNotFoundException",
            "message": f"Model version: {SECOND} does not exist for model: {MODEL}",
        }
    status, missing = curl(*general, f"{stack.base_url}/predictions/no-such-model", "-T", str(scan))
    assert status == 404 and missing["message"] == "Model not found: no-such-model"

    for verb, path in [
        ("POST", "/models?url=x.mar"),
        ("DELETE", f"/models/{MODEL}/1.0.0"),
        ("PUT", f"/models/{MODEL}?min_worker=3"),
    ]:
        status, answer = curl(*general, "-X", verb, f"{stack.base_url}{path}")
        assert status == 403 and answer["type"] == "ForbiddenException", answer
    status, wrong_verb = curl(*general, url)
    assert status == 405 and wrong_verb["type"] == "MethodNotAllowedException"
    status, unknown = curl(*general, f"{stack.base_url}/models/{MODEL}/1.0.0/scale/more")
    assert status == 404 and unknown["code"] == 404
    status, empty = curl(*general, "-X", "POST", url, "--data-binary", "")
    assert status == 400 and empty["type"] == "BadRequestException"
    assert not AccessEvent.objects.filter(action="protocol.torchserve_read", tenant__slug="demo-general").exists()


# --- past the timeout ----------------------------------------------------------------------------


def test_past_the_timeout_both_answer_504_with_the_request_id_and_the_reads_go_on(stack, live_demo, tmp_path):
    """The worker takes no bulk work for a while: a TF Serving and a TorchServe read, sent at once,
    each answer 504 in their own shape after SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS, naming the request
    and where its result will be; once the worker is back the reads finish."""
    from concurrent.futures import ThreadPoolExecutor

    from celery import Celery

    raw = key_for("demo-general", Role.CLINICIAN, "overnight")
    scan = tmp_path / "scan.png"
    scan.write_bytes(OPACITY)
    control = Celery("tfts-test", broker=stack.redis_url, set_as_current=False).control
    assert control.cancel_consumer("bulk", reply=True, timeout=10), "the stack's worker did not answer"
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            tf_call = pool.submit(
                requests.post,
                f"{stack.base_url}/v1/models/{MODEL}:predict",
                json={"instances": [b64(OPACITY)]},
                headers=bearer(raw),
                timeout=TIMEOUT,
            )
            ts_call = pool.submit(
                curl, "-H", f"Authorization: Bearer {raw}", f"{stack.base_url}/predictions/{MODEL}", "-T", str(scan)
            )
            tf_answer, (ts_status, ts_answer) = tf_call.result(), ts_call.result()
    finally:
        assert control.add_consumer("bulk", reply=True, timeout=10), "the stack's worker did not answer"
    assert tf_answer.status_code == 504 and ts_status == 504
    assert set(tf_answer.json()) == {"error"}
    assert ts_answer["code"] == 504 and ts_answer["type"] == "RequestTimeoutException"
    for protocol, message in [("tfserving", tf_answer.json()["error"]), ("torchserve", ts_answer["message"])]:
        read = InferenceRequest.objects.get(protocol=protocol)
        assert f"Request id {read.pk}" in message and f"/api/v1/images/{read.image_id}/" in message
    deadline = time.monotonic() + TIMEOUT
    while InferenceRequest.objects.exclude(status=InferenceRequest.Status.DONE).exists():  # the reads go on
        assert time.monotonic() < deadline, list(InferenceRequest.objects.values("protocol", "status"))
        time.sleep(0.2)


def test_one_read_costs_about_what_it_costs_by_the_other_protocols(stack, live_demo):
    """Not a gate: the numbers the note reports (c1, the demo model, this machine, bulk lane)."""
    headers = bearer(key_for("demo-general", Role.CLINICIAN, "latency"))
    calls = {
        "TF Serving :predict (b64)": lambda: requests.post(
            f"{stack.base_url}/v1/models/{MODEL}:predict",
            json={"instances": [b64(OPACITY)]},
            headers=headers,
            timeout=30,
        ),
        "TorchServe /predictions (raw body)": lambda: requests.post(
            f"{stack.base_url}/predictions/{MODEL}", data=OPACITY, headers=headers, timeout=30
        ),
    }
    medians = {}
    for name, call in calls.items():
        assert call().status_code == 200  # warm
        took = []
        for _ in range(LATENCY_ROUNDS):
            started = time.perf_counter()
            assert call().status_code == 200
            took.append((time.perf_counter() - started) * 1000)
        medians[name] = statistics.median(took)
    print("\nc1 median: " + "; ".join(f"{name} {ms:.0f} ms" for name, ms in medians.items()))


def test_a_pinned_hospital_is_answered_by_its_pin_in_both(stack, live_demo, second_version, tmp_path):
    """Hospital B pinned to version 2: every unnamed read, status and description is version 2,
    and version 1 (production) is no longer one it may name."""
    from recognition.services.registry import model_pin_set

    model_pin_set(tenant=childrens_hospital(), model=second_version.model, version=second_version)
    headers = bearer(key_for("demo-childrens", Role.CLINICIAN, "pinned"))
    base = f"{stack.base_url}/v1/models/{MODEL}"
    status = requests.get(base, headers=headers, timeout=10).json()["model_version_status"]
    assert [entry["version"] for entry in status] == ["2"]
    assert requests.get(f"{base}/metadata", headers=headers, timeout=10).json()["model_spec"]["version"] == "2"
    assert requests.get(f"{base}/versions/1", headers=headers, timeout=10).status_code == 404
    read = requests.post(f"{base}:predict", json={"instances": [b64(OPACITY)]}, headers=headers, timeout=TIMEOUT)
    assert read.status_code == 200, read.text
    (request_id,) = read.headers["X-Inference-Request-Ids"].split(",")
    assert InferenceRequest.objects.get(pk=request_id).model_version == second_version

    scan = tmp_path / "scan.png"
    scan.write_bytes(OPACITY)
    auth = ["-H", f"Authorization: Bearer {headers['Authorization'].removeprefix('Bearer ')}"]
    status_code, described = curl(*auth, f"{stack.base_url}/models/{MODEL}")
    assert status_code == 200 and described[0]["modelVersion"] == SECOND
    status_code, answer = curl(*auth, f"{stack.base_url}/predictions/{MODEL}", "-T", str(scan))
    assert status_code == 200 and list(answer)[0] == "round_opacity"
    assert curl(*auth, f"{stack.base_url}/predictions/{MODEL}/{training.DEMO_VERSION}", "-T", str(scan))[0] == 404
