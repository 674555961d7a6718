"""A job's results leave the real ASGI server (uvicorn) a piece at a time: exporting 100,000 rows
raises the web process's peak memory by less than 50 MB over exporting 1,000.

Each row carries a 500-character error in words, nearly every character two bytes in UTF-8 (Cyrillic), so the CSV of
the big job is about 100 MB and its JSON (non-ASCII escaped) about three times that: an export that
Django buffered whole (a synchronous iterator under ASGI) could not pass.

The web server is a private one with nothing else beside it (no worker, no Redis), so its peak
(VmHWM in /proc/<pid>/status) is the export's alone."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from django.conf import settings

from accounts.models import Membership
from config.webserver import web_server_argv
from recognition.models import BatchItem
from recognition.services.jobs import batch_job_create
from tests.e2e.conftest import VENV_BIN, Processes, database_url, free_port, wait_for_port
from tests.e2e.test_batches_live import bearer

# peak memory of the streaming path, whatever the database: CI runs this in one pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

SMALL_JOB, BIG_JOB = 1_000, 100_000
PEAK_GROWTH_LIMIT = 50 * 2**20
ERROR_IN_WORDS = ("Снимок не читается: заголовок файла повреждён, передача прервана. " * 8)[:500]
INSERT_BATCH = 5_000


@pytest.fixture
def web(tmp_path, live_demo):
    processes = Processes(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: an export needs no broker
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "PYTHONUNBUFFERED": "1",
    }
    try:
        process, log = processes.start("web", web_server_argv(bin_dir=VENV_BIN, port=port), env)
        wait_for_port(port, process, log)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        processes.stop_all()


def _job_of(rows: int, name: str) -> int:
    clinician = Membership.objects.get(user__username="clinician")
    job, _ = batch_job_create(membership=clinician, name=name)
    for start in range(0, rows, INSERT_BATCH):
        BatchItem.objects.bulk_create(
            BatchItem(tenant=job.tenant, job=job, position=n, status=BatchItem.Status.FAILED, error=ERROR_IN_WORDS)
            for n in range(start, min(rows, start + INSERT_BATCH))
        )
    return job.pk


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


def _download(url: str, headers: dict) -> tuple[int, bytes, bytes]:
    """The body's size, its first and its last bytes, read as it arrives (never held whole here)."""
    size, head, tail = 0, b"", b""
    with requests.get(url, headers=headers, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text[:500]
        for piece in response.iter_content(chunk_size=2**20):
            if not head:
                head = piece[:200]
            tail = (tail + piece)[-200:]
            size += len(piece)
    return size, head, tail


def test_exporting_100000_rows_costs_the_web_process_no_more_peak_memory_than_1000(web):
    process, base_url = web
    small, big = _job_of(SMALL_JOB, "small export"), _job_of(BIG_JOB, "big export")
    headers = bearer(SimpleNamespace(base_url=base_url), "clinician")
    api = f"{base_url}/api/v1/batches"

    for result_format in ("csv", "json"):
        small_size, _, _ = _download(f"{api}/{small}/results/?format={result_format}", headers)
        before = _peak_rss(process.pid)
        size, head, tail = _download(f"{api}/{big}/results/?format={result_format}", headers)
        grown = _peak_rss(process.pid) - before
        assert size > 90 * small_size  # all 100,000 rows came
        if result_format == "csv":
            assert head.startswith(b"item,position,image,status") and tail.endswith(b"\r\n")
        else:
            assert head.startswith(f'{{"job": {big}, "results": [{{"item": '.encode()) and tail.endswith(b"}]}")
        assert grown < PEAK_GROWTH_LIMIT, f"{result_format}: peak RSS grew {grown / 2**20:.1f} MiB"
