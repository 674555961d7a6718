"""A zip upload interrupted half-way — the web process killed (kill -9), or the client gone — leaves
no trace: no upload row, no items, nothing stored under the hospital's archives, the job still open;
and the job takes a complete archive afterwards as if nothing had happened.

The web server here is a private one (the session's `stack` must survive the kill), with its own
Redis and worker, and its own temporary directory, where Django spools a request body to disk."""

from __future__ import annotations

import io
import os
import signal
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from django.conf import settings

from accounts.models import Tenant
from config.webserver import web_server_argv
from recognition.models import BatchItem, BatchJob, BatchUpload
from tests.conftest import png_bytes
from tests.e2e.conftest import VENV_BIN, free_port, wait_for_line, wait_for_port, worker_argv
from tests.e2e.test_batches_live import _private_stack, _start_redis, bearer, wait_until, zip_of

# a private stack; what it proves rests on row locking: CI runs this drill in its PostgreSQL pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_drill]

BIG_ZIP_MB = 40
BOUNDARY = "sightline-interrupted-upload-7f3a"
SPOOLED_BEFORE_INTERRUPT = 8 * 2**20  # the body Django must have written to disk before the interruption


def _big_zip() -> bytes:
    """A real zip of about BIG_ZIP_MB MiB: a few images, then stored (uncompressed) filler entries."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for number in range(4):
            archive.writestr(f"big/{number:03d}.png", png_bytes(seed=number, size=256))
        for number in range(BIG_ZIP_MB):
            archive.writestr(f"big/filler-{number:03d}.bin", os.urandom(2**20))
    return buffer.getvalue()


def _start_web(processes, env: dict, name: str) -> tuple:
    port = free_port()
    web, log = processes.start(name, web_server_argv(bin_dir=VENV_BIN, port=port), env)
    wait_for_port(port, web, log)
    return web, f"http://127.0.0.1:{port}"


def _spooled_bytes(pid: int, tmp_dir: Path) -> int:
    """The largest file in tmp_dir the process holds open (Django's spool of the request body;
    unnamed, so it is found through the process's descriptors, not the directory)."""
    largest = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(tmp_dir) + "/"):
                largest = max(largest, os.stat(fd).st_size)
        except OSError:  # closed meanwhile
            continue
    return largest


def _files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()} if root.exists() else set()


def _send_part_of_upload(base_url: str, headers: dict, job_id: int, archive: bytes) -> socket.socket:
    """A multipart POST of `archive` over a raw socket: the headers (with the full Content-Length)
    and about 60% of the body; the rest is never sent. Returns the open socket."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="archive"; filename="big.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    host, port = base_url.removeprefix("http://").split(":")
    request_head = (
        f"POST /api/v1/batches/{job_id}/items/ HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(head) + len(archive) + len(tail)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    client = socket.create_connection((host, int(port)), timeout=30)
    client.sendall(request_head + head + archive[: len(archive) * 6 // 10])
    return client


def _no_answer_yet(client: socket.socket) -> bool:
    """Nothing to read and the connection open: the server is still waiting for the body."""
    client.setblocking(False)
    try:
        client.recv(1)  # a response's first byte, or b"" for a closed connection
    except BlockingIOError:
        return True
    finally:
        client.setblocking(True)
    return False


def _assert_untouched(api: str, headers: dict, job_id: int, tenant_id: int, stored_before: set[str]) -> None:
    """The job as it was before the interrupted upload: open, empty, nothing pending, nothing stored."""
    status = requests.get(f"{api}/{job_id}/", headers=headers, timeout=10)
    assert status.status_code == 200, status.text
    status = status.json()
    assert status["status"] == BatchJob.Status.OPEN and status["state"] == "open", status
    assert status["started_at"] is None
    assert status["uploads_pending"] == 0 and status["total"] == 0, status
    assert set(status["counts"].values()) == {0}, status["counts"]
    assert BatchUpload.objects.filter(job_id=job_id).count() == 0
    assert BatchItem.objects.filter(job_id=job_id).count() == 0
    assert BatchJob.objects.get(pk=job_id).status == BatchJob.Status.OPEN
    # nothing of the partial archive (or of an image made from it) under the hospital's prefix
    left = _files_under(Path(settings.MEDIA_ROOT) / "tenants" / str(tenant_id)) - stored_before
    assert not left, f"the interrupted upload left files in storage: {sorted(left)}"


def _assert_takes_a_complete_zip(api: str, headers: dict, job_id: int, tenant_id: int, stored_before) -> None:
    """The same job afterwards: a complete small zip unpacks to exactly its entries, and the job runs."""
    small = zip_of(5)  # five images and a README: six entries, one of them a failed item
    response = requests.post(
        f"{api}/{job_id}/items/", files={"archive": ("small.zip", small, "application/zip")},
        headers=headers, timeout=60,
    )  # fmt: skip
    assert response.status_code == 202, response.text

    def status():
        return requests.get(f"{api}/{job_id}/", headers=headers, timeout=10).json()

    assert wait_until(lambda: status()["uploads_pending"] == 0, 180, 0.5), status()
    unpacked = status()
    assert unpacked["total"] == 6 and unpacked["counts"]["pending"] == 5 and unpacked["counts"]["failed"] == 1
    (upload,) = BatchUpload.objects.filter(job_id=job_id)
    assert (upload.status, upload.entries) == (BatchUpload.Status.COMPLETE, 6)
    assert BatchItem.objects.filter(job_id=job_id).count() == 6
    started = requests.post(f"{api}/{job_id}/start/", headers=headers, timeout=10)
    assert started.status_code == 200, started.text
    assert wait_until(lambda: status()["state"] == "finished", 180, 0.5), status()
    assert status()["counts"]["done"] == 5
    # the complete archive is deleted once unpacked; nothing under archives/ is new
    new = _files_under(Path(settings.MEDIA_ROOT) / "tenants" / str(tenant_id)) - stored_before
    assert not [name for name in new if name.startswith("archives/")], sorted(new)


@pytest.fixture
def private(live_demo, tmp_path):
    """Redis, a worker and a place for the web processes, all this test's own."""
    processes, redis_port, env = _private_stack(tmp_path)
    (tmp_path / "web-tmp").mkdir()
    try:
        _start_redis(processes, redis_port, env)
        worker, worker_log = processes.start("worker", worker_argv("uploads"), env)  # ready while we upload
        yield SimpleNamespace(
            processes=processes,
            web_env={**env, "TMPDIR": str(tmp_path / "web-tmp")},  # where Django spools request bodies
            tmp=tmp_path / "web-tmp",
            worker_ready=lambda: wait_for_line(" ready.", worker, worker_log),
        )
    finally:
        processes.stop_all()


def _open_job(base_url: str) -> tuple[dict, str, int, int, set[str]]:
    headers = bearer(SimpleNamespace(base_url=base_url), "clinician")
    api = f"{base_url}/api/v1/batches"
    job = requests.post(api + "/", json={"name": "interrupted"}, headers=headers, timeout=10)
    assert job.status_code == 201, job.text
    tenant_id = Tenant.objects.get(slug="demo-general").pk
    stored_before = _files_under(Path(settings.MEDIA_ROOT) / "tenants" / str(tenant_id))
    return headers, api, job.json()["id"], tenant_id, stored_before


def _interrupt_when_spooled(web, private, client: socket.socket) -> None:
    """Wait until the web process is part-way through the body (spooled to disk, no answer yet)."""
    in_flight = wait_until(lambda: _spooled_bytes(web.pid, private.tmp) >= SPOOLED_BEFORE_INTERRUPT, 60, 0.05)
    assert in_flight, "the web process never spooled the upload's body"
    assert _no_answer_yet(client), "the server answered before the body was complete"


def test_web_process_killed_mid_zip_upload_leaves_the_job_untouched(private):
    web, base_url = _start_web(private.processes, private.web_env, "web")
    headers, api, job_id, tenant_id, stored_before = _open_job(base_url)

    client = _send_part_of_upload(base_url, headers, job_id, _big_zip())
    try:
        _interrupt_when_spooled(web, private, client)
        os.killpg(web.pid, signal.SIGKILL)
        web.wait()
    finally:
        client.close()
    assert not list(private.tmp.iterdir()), "the killed web process left its spooled body behind"

    _, base_url = _start_web(private.processes, private.web_env, "web-restarted")
    api = f"{base_url}/api/v1/batches"
    _assert_untouched(api, headers, job_id, tenant_id, stored_before)
    private.worker_ready()
    _assert_takes_a_complete_zip(api, headers, job_id, tenant_id, stored_before)


def test_client_gone_mid_zip_upload_leaves_the_job_untouched_and_the_server_serving(private):
    web, base_url = _start_web(private.processes, private.web_env, "web")
    headers, api, job_id, tenant_id, stored_before = _open_job(base_url)

    client = _send_part_of_upload(base_url, headers, job_id, _big_zip())
    try:
        _interrupt_when_spooled(web, private, client)
    finally:
        client.close()  # the client goes away with 40% of the body unsent
    # the server lets go of the spooled body (and removes it), and stays up
    assert wait_until(lambda: _spooled_bytes(web.pid, private.tmp) == 0, 30, 0.1), "the spool stayed open"
    assert web.poll() is None
    assert not list(private.tmp.iterdir())

    _assert_untouched(api, headers, job_id, tenant_id, stored_before)
    private.worker_ready()
    _assert_takes_a_complete_zip(api, headers, job_id, tenant_id, stored_before)
    assert web.poll() is None
