"""Liveness, readiness and metrics."""

import pytest

from recognition.services.images import image_upload
from recognition.services.inference import inference_run
from tests.conftest import png_bytes, upload_file
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.django_db


def test_liveness_needs_nothing(client):
    assert client.get("/health/live/").json() == {"status": "ok"}


def test_readiness_names_what_is_missing(client, settings, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = client.get("/health/ready/")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == {"ok": True}
    assert checks["broker"]["ok"] is False
    assert checks["worker"] == {"ok": False, "error": "broker unreachable"}


def test_readiness_without_a_model_says_so(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    checks = client.get("/health/ready/").json()["checks"]
    assert checks["worker"]["error"] == "no production model is registered"


def test_metrics_report_requests_batches_latency_and_results(client, settings, clinician_a, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # queue depth is simply absent then
    images = [image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=i))) for i in range(3)]
    inference_run(request_id=images[0].inference_requests.get().pk)
    text = client.get("/metrics").content.decode()
    assert 'sightline_inference_requests{status="done"} 3.0' in text
    assert 'sightline_batch_size_bucket{le="2"} 0.0' in text
    assert 'sightline_batch_size_bucket{le="4"} 3.0' in text
    assert "sightline_inference_latency_ms_count 3.0" in text
    assert 'sightline_results_total{model="sightline-demo",version="1.0.0"} 3.0' in text
    assert "PSEUDO" not in text and "tenant" not in text  # totals only, nothing per hospital or patient


def test_metrics_can_require_a_token(client, settings):
    settings.SIGHTLINE_METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200
