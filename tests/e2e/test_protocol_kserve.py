"""KServe v2 against the live stack (uvicorn, a real Celery worker, Redis), spoken by the unchanged
``tritonclient.http`` client with a hospital service account's key: health and metadata, image
reads with the binary tensor extension and with JSON, an FP32 input built from the metadata alone
that agrees with the image read of the same image, a 504 naming the request while the worker
takes no bulk work, a viewer refused and every read in the access log."""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from celery import Celery
from PIL import Image as PILImage
from tritonclient.utils import InferenceServerException

from accounts.models import AccessEvent, Role
from accounts.service_accounts import api_key_create, service_account_create
from recognition.models import InferenceRequest, Study
from tests.conftest import png_bytes
from tests.e2e.test_revocation import member

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

MODEL = "sightline-demo"
AGREEMENT = 1e-3  # an FP32 read of a properly normalised image against the image read of it
LATENCY_ROUNDS = 10


def service_key(name: str, role=Role.CLINICIAN, tenant="demo-general") -> str:
    admin = member(f"admin-{tenant}", tenant, Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name=name, role=role)
    return api_key_create(actor=admin, service_account=account)[1]


def triton(stack, raw: str) -> tuple[httpclient.InferenceServerClient, dict]:
    """The client and its headers; pass a copy to each call: tritonclient's infer writes its
    Inference-Header-Content-Length into the dict it is given, so a reused one sends a stale length."""
    client = httpclient.InferenceServerClient(url=stack.base_url.removeprefix("http://"), network_timeout=60)
    return client, {"Authorization": f"Bearer {raw}"}


def image_input(*images: bytes, binary: bool = True) -> httpclient.InferInput:
    data = np.array(list(images), dtype=object)
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if not binary:  # JSON: a BYTES element carrying an image is its base64 text
        import base64

        data = np.array([base64.b64encode(image) for image in images], dtype=object)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def fp32_from_metadata(image: bytes, metadata: dict) -> np.ndarray:
    """What a client does with the model metadata alone: resize, scale, normalise, NCHW."""
    described = metadata["parameters"]["input"]
    _, channels, height, width = described["shape"]
    with PILImage.open(io.BytesIO(image)) as opened:
        rgb = opened.convert("RGB").resize((width, height), PILImage.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32) * described["scale"]
    normalised = (pixels - np.asarray(described["mean"], np.float32)) / np.asarray(described["std"], np.float32)
    return normalised.transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def test_tritonclient_reads_images_and_tensors_from_the_platform(stack, live_demo):
    client, headers = triton(stack, service_key("pacs-bridge"))
    assert client.is_server_live() and client.is_server_ready()  # no token needed
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready(MODEL, headers=dict(headers))
    assert client.is_model_ready(MODEL, model_version="1", headers=dict(headers))
    metadata = client.get_model_metadata(MODEL, headers=dict(headers))
    labels = metadata["parameters"]["labels"]
    images = [png_bytes(opacity=True, seed=41), png_bytes(opacity=False, seed=42)]

    # binary tensor extension both ways (tritonclient's default when no outputs are named)
    binary = client.infer(MODEL, [image_input(*images)], model_version="1", headers=dict(headers))
    probabilities = binary.as_numpy("probabilities")
    assert probabilities.shape == (2, len(labels)) and probabilities.dtype == np.float32
    assert [label.decode() for label in binary.as_numpy("label")] == [labels[i] for i in probabilities.argmax(1)]
    assert np.allclose(probabilities.sum(1), 1, atol=1e-4) or metadata["parameters"]["task"] == "multi-label"

    # JSON both ways: base64 text for the image, the outputs as JSON data
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "label")]
    as_json = client.infer(MODEL, [image_input(images[0], binary=False)], outputs=outputs, headers=dict(headers))
    assert np.allclose(as_json.as_numpy("probabilities")[0], probabilities[0], atol=1e-5)
    request_ids = (
        binary.get_response()["parameters"]["request_ids"] + as_json.get_response()["parameters"]["request_ids"]
    )

    # an FP32 input built from the metadata alone gives the image read's answer
    for image, expected in zip(images, probabilities, strict=True):
        tensor = httpclient.InferInput("input", [1, *metadata["parameters"]["input"]["shape"][1:]], "FP32")
        tensor.set_data_from_numpy(fp32_from_metadata(image, metadata), binary_data=True)
        read = client.infer(MODEL, [tensor], headers=dict(headers)).as_numpy("probabilities")[0]
        assert read.argmax() == expected.argmax()
        assert np.abs(read - expected).max() < AGREEMENT, (read, expected)
    tensor_json = httpclient.InferInput("input", [1, *metadata["parameters"]["input"]["shape"][1:]], "FP32")
    tensor_json.set_data_from_numpy(fp32_from_metadata(images[0], metadata), binary_data=False)
    read = client.infer(MODEL, [tensor_json], outputs=outputs, headers=dict(headers)).as_numpy("probabilities")[0]
    assert np.abs(read - probabilities[0]).max() < AGREEMENT

    # each image read is a real, bulk-lane read of the key's hospital, kept out of the worklist
    reads = InferenceRequest.objects.filter(pk__in=request_ids).select_related("image__study")
    assert len(reads) == len(request_ids) == 3
    for read_request in reads:
        assert read_request.protocol == "kserve" and read_request.priority == InferenceRequest.Priority.BULK
        assert read_request.image.study.protocol == "kserve" and read_request.tenant.slug == "demo-general"
        assert AccessEvent.objects.filter(
            action="protocol.kserve_read", target_id=str(read_request.image_id), actor_label__contains="(key "
        ).exists()
    assert AccessEvent.objects.filter(action="protocol.tensor_read").count() == len(images) + 1


def test_a_viewer_cannot_infer_and_another_hospital_named_is_a_404(stack, live_demo):
    client, headers = triton(stack, service_key("wallboard", role=Role.VIEWER))
    assert client.get_model_metadata(MODEL, headers=dict(headers))["name"] == MODEL  # metadata: any member
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [image_input(png_bytes())], headers=dict(headers))
    assert refused.value.status() == "403"
    _, other = triton(stack, service_key("importer", tenant="demo-childrens"))
    with pytest.raises(InferenceServerException) as elsewhere:
        client.get_model_metadata(MODEL, headers={**other, "X-Tenant": "demo-general"})
    assert elsewhere.value.status() == "404"
    with pytest.raises(InferenceServerException) as anonymous:
        client.get_model_metadata(MODEL)
    assert anonymous.value.status() == "401"
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata(MODEL, model_version="99", headers=dict(headers))
    assert unknown.value.status() == "404"
    assert not Study.objects.exclude(protocol="").exists()


def test_past_the_timeout_it_answers_504_with_the_request_id_and_the_read_goes_on(stack, live_demo):
    raw = service_key("overnight")
    client, headers = triton(stack, raw)
    control = Celery("kserve-test", broker=stack.redis_url, set_as_current=False).control
    assert control.cancel_consumer("bulk", reply=True, timeout=10), "the stack's worker did not answer"
    try:
        with pytest.raises(InferenceServerException) as waited:
            client.infer(MODEL, [image_input(png_bytes(seed=43))], headers=dict(headers), timeout=300_000)  # µs
    finally:
        assert control.add_consumer("bulk", reply=True, timeout=10), "the stack's worker did not answer"
    assert waited.value.status() == "504"
    read = InferenceRequest.objects.get(protocol="kserve")
    assert (
        f"Request id {read.pk}" in waited.value.message()
        and f"/api/v1/images/{read.image_id}/" in waited.value.message()
    )
    deadline = time.monotonic() + 60
    while True:  # the read goes on, and its result is on the image's API page
        page = requests.get(f"{stack.base_url}/api/v1/images/{read.image_id}/", headers=headers, timeout=10).json()
        if page["status"] == "done":
            break
        assert time.monotonic() < deadline, page
        time.sleep(0.2)
    assert page["results"]


def test_one_infer_costs_about_what_an_upload_and_its_wait_cost(stack, live_demo):
    """Not a gate: the numbers the note reports (c1, the demo model, this machine)."""
    from accounts.models import ServiceAccount

    raw = service_key("latency")
    client, headers = triton(stack, raw)
    image = png_bytes(seed=44)
    client.infer(MODEL, [image_input(image)], headers=dict(headers))  # warm

    def infer_ms() -> float:
        timings = []
        for _ in range(LATENCY_ROUNDS):
            started = time.perf_counter()
            client.infer(MODEL, [image_input(image)], headers=dict(headers))
            timings.append((time.perf_counter() - started) * 1000)
        return statistics.median(timings)

    bulk_ms = infer_ms()
    ServiceAccount.objects.filter(name="latency").update(interactive=True)
    interactive_ms = infer_ms()
    upload_ms = []
    for _ in range(LATENCY_ROUNDS):
        started = time.perf_counter()
        created = requests.post(
            f"{stack.base_url}/api/v1/images/", headers=headers, files={"file": ("scan.png", image)}, timeout=30
        ).json()
        while requests.get(f"{stack.base_url}/api/v1/images/{created['id']}/", headers=headers, timeout=10).json()[
            "status"
        ] not in ("done", "failed"):
            time.sleep(0.01)
        upload_ms.append((time.perf_counter() - started) * 1000)
    print(
        f"\nc1 median: tritonclient infer {bulk_ms:.0f} ms (bulk lane), {interactive_ms:.0f} ms (interactive "
        f"key); API upload + polling until done {statistics.median(upload_ms):.0f} ms (interactive lane)"
    )


WAITING_READS = 40
EXTRA_THREADS_SLACK = 4  # lent for one step beyond the pool, still ending


def web_threads(stack) -> int:
    """The stack's uvicorn process's thread count, from /proc (Linux, as the stack runs)."""
    from pathlib import Path

    port = stack.base_url.rsplit(":", 1)[1]
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            argv = (process / "cmdline").read_bytes().split(b"\0")
            if any(part.endswith(b"uvicorn") for part in argv) and port.encode() in argv:
                status = (process / "status").read_text()
                return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    raise AssertionError("the stack's web process was not found")


def test_waiting_reads_hold_no_thread_each(stack, live_demo):
    """Reads waiting for a worker that takes no bulk work are coroutines in the web process: its
    threads do not grow with them (at most the pool of SIGHTLINE_WEB_THREADS lent per step)."""
    import base64
    import json
    from concurrent.futures import ThreadPoolExecutor

    from django.conf import settings

    raw = service_key("many-waiters")
    headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
    url = f"{stack.base_url}/v2/models/{MODEL}/infer"

    def read(seed: int, timeout_us: int) -> int:
        image = base64.b64encode(png_bytes(seed=seed)).decode()
        body = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}],
            "parameters": {"timeout": timeout_us},
        }
        return requests.post(url, data=json.dumps(body), headers=headers, timeout=60).status_code

    assert read(100, 20_000_000) == 200  # warm: the web process has served a protocol read
    before = web_threads(stack)
    control = Celery("kserve-threads", broker=stack.redis_url, set_as_current=False).control
    assert control.cancel_consumer("bulk", reply=True, timeout=10), "the stack's worker did not answer"
    try:
        with ThreadPoolExecutor(WAITING_READS) as clients:
            answers = [clients.submit(read, 200 + i, 15_000_000) for i in range(WAITING_READS)]
            deadline = time.monotonic() + 30
            queued = InferenceRequest.objects.filter(protocol="kserve", status=InferenceRequest.Status.QUEUED)
            while queued.count() < WAITING_READS:
                assert time.monotonic() < deadline, queued.count()
                time.sleep(0.1)
            time.sleep(0.5)
            during = web_threads(stack)
            assert control.add_consumer("bulk", reply=True, timeout=10)
            statuses = [answer.result() for answer in answers]
    finally:
        control.add_consumer("bulk", reply=True, timeout=10)
    assert statuses == [200] * WAITING_READS
    print(f"\nweb threads: {before} before, {during} with {WAITING_READS} reads waiting")
    # a thread per waiting read would be WAITING_READS more; the burst's sync steps wake at most
    # the lender's pool (SIGHTLINE_WEB_THREADS) and a few short-lived extras
    assert during - before < min(WAITING_READS, settings.SIGHTLINE_WEB_THREADS + EXTRA_THREADS_SLACK), (before, during)
