"""Bulk jobs on the real stack: a zip job's progress over the WebSocket and its CSV; and the faults —
a worker killed mid-job, Redis restarted mid-job — each ending with every item in exactly one
terminal state and one result per done item."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import time
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import requests
from django.conf import settings
from websockets.sync.client import connect

from recognition.models import BatchItem, BatchJob, InferenceRequest, Result
from tests.conftest import PASSWORD, png_bytes, upload_file
from tests.e2e.conftest import (
    Processes,
    database_url,
    free_port,
    redis_server_binary,
    wait_for_line,
    wait_for_port,
    worker_argv,
)

pytestmark = pytest.mark.e2e


def bearer(stack, username: str) -> dict:
    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": username, "password": PASSWORD}, timeout=10
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access']}"}


def zip_of(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(count):
            archive.writestr(f"night/{number:03d}.png", png_bytes(seed=number, size=128))
        archive.writestr("night/README.txt", b"not an image")
    return buffer.getvalue()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_a_zip_job_reports_progress_live_and_ends_with_one_row_per_item(stack, live_demo):
    headers = bearer(stack, "clinician")
    api = f"{stack.base_url}/api/v1/batches"
    job = requests.post(api + "/", json={"name": "night films"}, headers=headers, timeout=10).json()
    response = requests.post(
        f"{api}/{job['id']}/items/", files={"archive": ("night.zip", zip_of(24), "application/zip")},
        headers=headers, timeout=30,
    )  # fmt: skip
    assert response.status_code == 202, response.text
    assert wait_until(
        lambda: requests.get(f"{api}/{job['id']}/", headers=headers, timeout=10).json()["uploads_pending"] == 0, 60
    )
    access = headers["Authorization"].split()[1]
    with connect(f"{stack.ws_url}/ws/events/?token={access}", open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
        socket.send(json.dumps({"type": "subscribe", "tenant": "demo-general"}))
        assert json.loads(socket.recv(timeout=10))["type"] == "subscribed"
        started = requests.post(f"{api}/{job['id']}/start/", headers=headers, timeout=10).json()
        assert started["counts"]["queued"] == 24 and started["counts"]["failed"] == 1
        progress, deadline = 0, time.monotonic() + 120
        while True:
            message = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("type") == "job.progress" and message["job"] == job["id"]:
                progress += 1
                status = requests.get(f"{api}/{job['id']}/", headers=headers, timeout=10).json()
                if status["state"] == "finished":
                    break
    assert progress >= 2  # the start, and at least one batch of outcomes
    assert status["counts"]["done"] == 24 and status["images_per_s"] > 0
    results = requests.get(f"{api}/{job['id']}/results/", headers=headers, timeout=30)
    rows = list(csv.DictReader(io.StringIO(results.text)))
    assert len(rows) == 25 and sum(row["status"] == "done" for row in rows) == 24
    assert [row for row in rows if row["status"] == "failed"][0]["error"]
    done = BatchItem.objects.filter(job_id=job["id"], status="done")
    assert Result.objects.filter(request__batch_items__in=done).count() == 24


def _private_stack(tmp_path):
    processes = Processes(tmp_path)
    redis_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "SIGHTLINE_MAX_BATCH_SIZE": "4",
        "PYTHONUNBUFFERED": "1",
    }
    return processes, redis_port, env


def _start_redis(processes, port, env):
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server, log = processes.start("redis", argv, env)
    wait_for_port(port, server, log)
    return server


def _start_worker(processes, env, name):
    worker, log = processes.start(name, worker_argv(name), env)
    wait_for_line(" ready.", worker, log)
    return worker


def _started_job(count: int) -> BatchJob:
    """A started job whose requests wait in the database (no broker messages: the worker's start-up
    and the reconciliation find them)."""
    from accounts.models import Membership
    from recognition.services.jobs import batch_items_add_files, batch_job_create, batch_job_start

    clinician = Membership.objects.get(user__username="clinician")
    job, _ = batch_job_create(membership=clinician, name="fault drill")
    files = [upload_file(png_bytes(size=256, seed=n), name=f"{n}.png") for n in range(count)]
    batch_items_add_files(membership=clinician, job_id=job.pk, files=files)
    with mock.patch("recognition.services.jobs.lifecycle._wake"):
        batch_job_start(membership=clinician, job_id=job.pk)
    return job


def _assert_exactly_once(job: BatchJob, count: int) -> None:
    items = BatchItem.objects.filter(job=job)
    assert items.count() == count
    assert set(items.values_list("status", flat=True)) == {"done"}, list(items.values_list("status", flat=True))
    requests_ = InferenceRequest.objects.filter(batch_items__job=job)
    assert requests_.count() == count and set(requests_.values_list("status", flat=True)) == {"done"}
    assert Result.objects.filter(request__in=requests_).count() == count  # one result each, none doubled
    assert max(requests_.values_list("attempts", flat=True)) <= settings.SIGHTLINE_MAX_ATTEMPTS


def _start_beat(processes, env, tmp_path) -> None:
    """Beat with the reconciliation every 2 s, as production runs it every minute."""
    env["SIGHTLINE_RECONCILE_SECONDS"] = "2"
    celery = str(Path(worker_argv("x")[0]))
    processes.start("beat", [celery, "-A", "workers.celery", "beat", "-l", "info", "-s", str(tmp_path / "beat")], env)


@pytest.mark.heavy_drill  # CI runs this drill in its PostgreSQL pass (row locking)
def test_a_worker_killed_mid_job_loses_and_doubles_nothing(live_demo, tmp_path):
    job, count = _started_job(120), 120
    processes, redis_port, env = _private_stack(tmp_path)
    try:
        _start_redis(processes, redis_port, env)
        _start_beat(processes, env, tmp_path)
        first = _start_worker(processes, env, "doomed")
        assert wait_until(lambda: BatchItem.objects.filter(job=job, status="done").exists(), 60, 0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert BatchItem.objects.filter(job=job).exclude(status="done").exists(), "finished before the kill"
        _start_worker(processes, env, "survivor")
        assert wait_until(lambda: not BatchItem.objects.filter(job=job).exclude(status="done").exists(), 180, 0.5)
    finally:
        processes.stop_all()
    _assert_exactly_once(job, count)


@pytest.mark.heavy_drill  # CI runs this drill in its PostgreSQL pass (row locking)
def test_redis_restarted_mid_job_loses_and_doubles_nothing(live_demo, tmp_path):
    """Redis keeps nothing on disk here: the restart loses every message. The database still knows
    what waits; beat's reconciliation (every 2 s here) wakes it once the broker is back."""
    job, count = _started_job(80), 80
    processes, redis_port, env = _private_stack(tmp_path)
    try:
        redis_server = _start_redis(processes, redis_port, env)
        _start_worker(processes, env, "steady")
        _start_beat(processes, env, tmp_path)
        assert wait_until(lambda: BatchItem.objects.filter(job=job, status="done").exists(), 60, 0.02)
        redis_server.send_signal(signal.SIGKILL)
        redis_server.wait()
        assert BatchItem.objects.filter(job=job).exclude(status="done").exists(), "finished before the restart"
        time.sleep(1)
        _start_redis(processes, redis_port, env)
        finished = wait_until(lambda: not BatchItem.objects.filter(job=job).exclude(status="done").exists(), 180, 0.5)
        assert finished, list(BatchItem.objects.filter(job=job).values_list("status", flat=True))
    finally:
        processes.stop_all()
    _assert_exactly_once(job, count)
