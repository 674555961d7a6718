"""A worker killed with SIGKILL in the middle of its work: after a restart every request ends in
exactly one terminal state, none lost, none doubled."""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings

from recognition.models import InferenceRequest, Result
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from tests.e2e.conftest import (
    Processes,
    database_url,
    free_port,
    redis_server_binary,
    wait_for_line,
    wait_for_port,
    worker_argv,
)

# exactly-once after a kill rests on row locking: CI runs this drill in its PostgreSQL pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_drill]

IMAGES = 240


def start_worker(processes: Processes, env: dict, name: str):
    worker, log = processes.start(name, worker_argv(name), env)
    wait_for_line(" ready.", worker, log)
    return worker


def wait_until(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def stuck(worker, log) -> str:
    """Why a worker made no progress: its pool processes' stacks (SIGUSR2, faulthandler: see
    workers/celery.py), what the database's sessions wait on, and the tail of its log."""
    from django.db import connection

    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGUSR2)
    time.sleep(2)
    sessions = ""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, state, wait_event_type, wait_event, left(query, 160) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            sessions = "\n".join(map(str, cursor.fetchall()))
    statuses = list(InferenceRequest.objects.values_list("status", "claimed_by").distinct())
    return f"requests: {statuses}\nsessions:\n{sessions}\nlog:\n{log.read_text(errors='replace')[-6000:]}"


def test_a_killed_worker_loses_and_doubles_nothing(live_demo, demo_package, tmp_path):
    from accounts.models import Membership

    clinician = Membership.objects.get(user__username="clinician")
    # the requests wait in the database; the worker's start-up finds them (no messages needed)
    with mock.patch("recognition.services.inference.inference_enqueue"):
        for number in range(IMAGES):
            image_upload(membership=clinician, upload=upload_file(png_bytes(size=384, seed=number)))
    assert InferenceRequest.objects.filter(status="queued").count() == IMAGES

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
    try:
        server, log = processes.start(
            "redis", [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""], env
        )
        wait_for_port(redis_port, server, log)
        first = start_worker(processes, env, "doomed")
        if not wait_until(lambda: InferenceRequest.objects.filter(status="done").exists(), timeout=60):
            raise AssertionError(f"no request done in 60 s\n{stuck(first, tmp_path / 'doomed.log')}")
        os.killpg(first.pid, signal.SIGKILL)  # the main process and its pool child, mid-batch
        first.wait()
        unfinished = InferenceRequest.objects.exclude(status__in=["done", "failed"]).count()
        running = InferenceRequest.objects.filter(status="running").count()
        print(f"\nkilled with {unfinished} of {IMAGES} unfinished, {running} of them claimed by the dead worker")
        assert unfinished > 0, "the worker finished before it could be killed: raise IMAGES"

        start_worker(processes, env, "survivor")
        assert wait_until(
            lambda: not InferenceRequest.objects.exclude(status__in=["done", "failed"]).exists(),
            timeout=120,
            interval=0.5,
        ), list(InferenceRequest.objects.values_list("status", "attempts", "claimed_by")[:20])
    finally:
        processes.stop_all()

    done = InferenceRequest.objects.filter(status="done")
    assert InferenceRequest.objects.count() == IMAGES  # none lost
    assert done.count() + InferenceRequest.objects.filter(status="failed").count() == IMAGES
    assert Result.objects.count() == done.count()  # one result per done request, none doubled
    assert set(Result.objects.values_list("request_id", flat=True)) == set(done.values_list("id", flat=True))
    assert InferenceRequest.objects.filter(status="failed").count() == 0  # nothing here deserved to fail
    assert max(InferenceRequest.objects.values_list("attempts", flat=True)) <= settings.SIGHTLINE_MAX_ATTEMPTS
