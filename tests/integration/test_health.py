"""Liveness, readiness and metrics."""

import os
import socket
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from recognition import health
from recognition.models import InferenceRequest
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from tests.e2e.conftest import free_port
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

HEARTBEAT_DB = "redis://127.0.0.1:6379/15"  # a database of their own: other processes' workers beat in 0


def test_liveness_needs_nothing(client):
    assert client.get("/health/live/").json() == {"status": "ok"}


def test_readiness_names_what_is_missing(client, settings, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = client.get("/health/ready/")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks == {"database": {"ok": True}, "broker": {"ok": False, "error": "ConnectionError"}}


def test_a_web_pod_is_ready_without_any_worker(client, demo_model):
    """The readiness probe of web pods: a cluster whose GPU workers are still starting keeps its web."""
    response = client.get("/health/ready/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": {"ok": True}, "broker": {"ok": True}}}


def test_worker_presence_is_its_own_check(client, settings, demo_model):
    settings.REDIS_URL = HEARTBEAT_DB
    response = client.get("/health/workers/")
    assert response.status_code == 503  # no worker process in this test
    assert response.json()["checks"]["worker"] == {"ok": False, "workers": 0, "model": str(demo_model)}
    health.heartbeat([demo_model.weights_sha256], "cpu")
    try:
        response = client.get("/health/workers/")
        assert response.status_code == 200
        assert response.json()["checks"]["worker"] == {"ok": True, "workers": 1, "model": str(demo_model)}
    finally:
        _forget_heartbeats()


def test_worker_presence_names_what_is_missing(client, settings):
    checks = client.get("/health/workers/").json()["checks"]
    assert checks["worker"] == {"ok": False, "error": "no production model is registered"}
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/health/workers/")
    assert response.status_code == 503
    assert response.json()["checks"]["worker"]["error"] == "no production model is registered"


def test_the_protocols_readiness_still_asks_for_a_worker(settings, demo_model):
    """TF-Serving's AVAILABLE promises a read can run: ``readiness()`` keeps the worker in it."""
    ok, checks = health.readiness()
    assert not ok and set(checks) == {"database", "broker", "worker"}
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    assert health.readiness()[1]["worker"] == {"ok": False, "error": "broker unreachable"}


def _forget_heartbeats():
    """Removes this process's heartbeat only (another test run may share the Redis)."""
    health._redis().delete(f"{health.HEARTBEAT_PREFIX}{socket.gethostname()}:{os.getpid()}")


def test_metrics_count_live_workers_by_lane(client, settings, demo_model):
    settings.REDIS_URL = HEARTBEAT_DB
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    health.heartbeat([demo_model.weights_sha256], "cpu")
    try:
        text = client.get("/metrics").content.decode()
    finally:
        _forget_heartbeats()
    assert 'sightline_workers{lane="interactive"} 1.0' in text
    assert 'sightline_workers{lane="bulk"} 0.0' in text


def test_metrics_report_failed_pacs_sends_and_a_failed_chain_check(client, settings):
    from accounts.audit import chain_append
    from accounts.models import AccessEvent

    text = client.get("/metrics").content.decode()
    assert 'sightline_deliveries{status="failed"} 0.0' in text
    assert "sightline_audit_tampered_last_timestamp_seconds 0.0" in text
    assert "sightline_audit_verify_interval_seconds 3600.0" in text
    # the event audit_verify_and_alert records for a chain that fails (tests/integration/test_audit_chain.py)
    chain_append(
        AccessEvent(
            action=health.AUDIT_TAMPERED,
            outcome=AccessEvent.Outcome.FAILED,
            actor_label="verify_audit_log",
            target_type="audit_chain",
            target_id="tenant:1#3",
        )
    )
    text = client.get("/metrics").content.decode()
    (line,) = [x for x in text.splitlines() if x.startswith("sightline_audit_tampered_last_timestamp_seconds ")]
    assert abs(float(line.split()[1]) - timezone.now().timestamp()) < 60


def _gauge(text: str, name: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_report_when_the_chain_check_last_succeeded(client):
    """beat's verify task records audit.verified when every chain verifies; the newest is the
    gauge an alert watches (a check that stopped running would otherwise stay silent)."""
    from accounts.audit import audit_verify_and_alert

    assert _gauge(client.get("/metrics").content.decode(), "sightline_audit_verified_last_timestamp_seconds") == 0
    assert audit_verify_and_alert() is True
    first = _gauge(client.get("/metrics").content.decode(), "sightline_audit_verified_last_timestamp_seconds")
    assert abs(first - timezone.now().timestamp()) < 60
    assert audit_verify_and_alert() is True  # the platform chain, with the first event in it, verifies
    assert _gauge(client.get("/metrics").content.decode(), "sightline_audit_verified_last_timestamp_seconds") >= first


def test_metrics_report_requests_batches_latency_and_results(client, settings, clinician_a, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # queue depth is simply absent then
    images = [image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=i))) for i in range(3)]
    image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=9)))  # still queued
    inference_run(request_id=images[0].inference_requests.get().pk)
    text = client.get("/metrics").content.decode()
    assert 'sightline_inference_requests{status="queued"} 0.0' in text  # the fourth joined the batch
    assert 'sightline_inference_requests{status="running"} 0.0' in text
    assert 'sightline_inference_finished{status="done"} 4.0' in text
    assert 'sightline_batch_size_bucket{lane="interactive",le="2"} 0.0' in text
    assert 'sightline_batch_size_bucket{lane="interactive",le="4"} 4.0' in text
    assert 'sightline_inference_latency_ms_gcount{lane="interactive"} 4.0' in text
    assert 'sightline_inference_latency_ms_gcount{lane="bulk"} 0.0' in text
    assert 'sightline_results_recent{model="sightline-demo",version="1.0.0"} 4.0' in text
    assert "PSEUDO" not in text and "tenant" not in text  # totals only, nothing per hospital or patient


def test_metrics_leave_out_what_finished_before_their_window(client, settings, clinician_a, demo_model):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    inference_run(request_id=image.inference_requests.get().pk)
    InferenceRequest.objects.update(finished_at=timezone.now() - timedelta(seconds=301))
    text = client.get("/metrics").content.decode()
    assert 'sightline_inference_finished{status="done"} 0.0' in text
    assert "sightline_results_recent{" not in text


def _plans(captured) -> list[str]:
    """The database's plan for each query a scrape ran, as text."""
    plans = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET enable_seqscan = off")  # tiny test tables: ask whether an index serves it
        for query in captured:
            sql = query["sql"]
            prefix = "EXPLAIN QUERY PLAN " if connection.vendor == "sqlite" else "EXPLAIN "
            cursor.execute(prefix + sql)
            plans.append(" | ".join(str(row[-1]) for row in cursor.fetchall()))
        if connection.vendor == "postgresql":
            cursor.execute("RESET enable_seqscan")
    return plans


SCRAPED_TABLES = ("recognition_inferencerequest", "dicomnet_delivery", "accounts_accessevent")


def test_a_scrape_costs_six_indexed_queries_however_much_history_there_is(
    client, settings, clinician_a, demo_model, django_assert_num_queries
):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    inference_run(request_id=image.inference_requests.get().pk)
    done = InferenceRequest.objects.get()
    old = timezone.now() - timedelta(days=30)
    InferenceRequest.objects.bulk_create(
        [
            InferenceRequest(
                tenant=done.tenant,
                image=done.image,
                model_version=done.model_version,
                status=InferenceRequest.Status.DONE,
                batch_size=1,
                inference_ms=10,
                wait_ms=5,
                created=old,
                started_at=old,
                finished_at=old,
            )
            for _ in range(500)
        ]
    )
    with CaptureQueriesContext(connection) as captured, django_assert_num_queries(6):
        text = client.get("/metrics").content.decode()
    assert 'sightline_inference_finished{status="done"} 1.0' in text  # the month-old ones are not read
    queries = captured.captured_queries
    for query, plan in zip(queries, _plans(queries), strict=True):
        reads = [step for step in plan.split(" | ") if any(table in step for table in SCRAPED_TABLES)]
        assert reads, plan
        # SQLite: SEARCH is an index range, SCAN reads every row; PostgreSQL: no sequential scan
        assert not any(step.startswith("SCAN") or "Seq Scan" in step for step in reads), plan
        if "finished_at" in query["sql"]:  # the windowed aggregates read the window's index only
            assert "inference_finished" in plan and "inference_running" not in plan, plan


def test_metrics_can_require_a_token(client, settings):
    settings.SIGHTLINE_METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200


def test_production_settings_refuse_to_start_without_a_metrics_token(settings):
    import subprocess
    import sys

    from tests.conftest import production_env

    def start(**extra):
        env = production_env(**{"SIGHTLINE_METRICS_TOKEN": None, **extra})
        code = (
            "import django; django.setup(); from django.conf import settings; print(settings.SIGHTLINE_METRICS_TOKEN)"
        )
        return subprocess.run(
            [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
        )

    for missing in ({}, {"SIGHTLINE_METRICS_TOKEN": ""}, {"SIGHTLINE_METRICS_TOKEN": "short"}):
        result = start(**missing)
        assert result.returncode != 0
        assert "ImproperlyConfigured: SIGHTLINE_METRICS_TOKEN must be set" in result.stderr
    token = "m" * 40
    result = start(SIGHTLINE_METRICS_TOKEN=token)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == token


def test_metrics_count_a_real_failed_pacs_delivery(client, settings, hospital_a, clinician_a):
    """A Delivery the real sender gave up on (a PACS nobody listens for, one attempt allowed)
    shows in ``sightline_deliveries{status="failed"}``; a retrying one in its own series."""
    from accounts.models import Role
    from dicomnet import sending
    from dicomnet.models import Delivery
    from dicomnet.tasks import delivery_send
    from tests.conftest import member
    from tests.integration.test_dicom_sending import _sr_bytes, dicom_image, dimse, made
    from tests.peers import free_port as peer_free_port

    settings.SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS = 1
    settings.SIGHTLINE_DICOM_TIMEOUT = 5
    admin = member(hospital_a, "admin-a", Role.TENANT_ADMIN)
    image = dicom_image(clinician_a)
    sr = made(image, "ai_sr", _sr_bytes())
    (delivery_id,) = sending.deliveries_queue([(sr, dimse(admin, peer_free_port()))])
    assert delivery_send(delivery_id) == "failed"
    delivery = Delivery.objects.get(pk=delivery_id)
    assert delivery.status == Delivery.Status.FAILED and "could not reach" in delivery.error

    text = client.get("/metrics").content.decode()
    assert 'sightline_deliveries{status="failed"} 1.0' in text
    assert 'sightline_deliveries{status="retrying"} 0.0' in text

    settings.SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS = 3
    second = made(image, "ai_sr", _sr_bytes())
    (retrying_id,) = sending.deliveries_queue([(second, dimse(admin, peer_free_port(), name="pacs-2"))])
    assert delivery_send(retrying_id) == "retrying"
    text = client.get("/metrics").content.decode()
    assert 'sightline_deliveries{status="failed"} 1.0' in text
    assert 'sightline_deliveries{status="retrying"} 1.0' in text


def test_the_newest_pacs_failure_is_reported_even_when_the_failed_count_nets_out(client, clinician_a, demo_model):
    """A resend takes an old failure out of ``failed`` as a new one fails: the failed count is the
    same, the newest failure's time is not (the alert reads that)."""
    from dicomnet.models import Delivery, Destination, Instance

    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    tenant = clinician_a.tenant
    pacs = Destination.objects.create(tenant=tenant, name="pacs", kind="dimse", host="h", port=104)
    made = [
        Instance.objects.create(
            tenant=tenant, study=image.study, series=image.series, sop_instance_uid=f"2.25.{n}", origin="created"
        )
        for n in (1, 2)
    ]
    name = "sightline_delivery_failed_last_timestamp_seconds"
    assert _gauge(client.get("/metrics").content.decode(), name) == 0
    old = timezone.now() - timedelta(hours=2)
    first = Delivery.objects.create(
        tenant=tenant, instance=made[0], destination=pacs, status=Delivery.Status.FAILED, updated=old
    )
    text = client.get("/metrics").content.decode()
    assert 'sightline_deliveries{status="failed"} 1.0' in text
    assert abs(_gauge(text, name) - old.timestamp()) < 1
    Delivery.objects.filter(pk=first.pk).update(status=Delivery.Status.RETRYING, updated=timezone.now())  # resent
    Delivery.objects.create(tenant=tenant, instance=made[1], destination=pacs, status=Delivery.Status.FAILED)
    text = client.get("/metrics").content.decode()
    assert 'sightline_deliveries{status="failed"} 1.0' in text  # the count nets out
    assert abs(_gauge(text, name) - timezone.now().timestamp()) < 60
