"""The request-body cap against the real uvicorn: a chunked body (no Content-Length to check)
that grows past the limit is refused with the 413 while it arrives, and nothing of it is kept;
a declared length over the limit is refused before a byte of the body is sent."""

from __future__ import annotations

import json
import os
import select
import socket
import time

import pytest
import requests
from django.conf import settings

from config.webserver import web_server_argv
from tests.conftest import png_bytes
from tests.e2e.conftest import VENV_BIN, Processes, database_url, free_port, wait_for_port

# the body cap is enforced before any database is reached: CI runs this in one pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

LIMIT = 1024 * 1024  # the web process's SIGHTLINE_MAX_REQUEST_BYTES here: 1 MiB
CHUNK = 64 * 1024
BOUNDARY = "sightline-chunked"


@pytest.fixture
def web(transactional_db, demo_package, tmp_path):
    """A web process of its own, capped at 1 MiB (the shared stack's cap is 512 MiB)."""
    from accounts.models import Role, Tenant
    from accounts.services import membership_grant, user_get_or_create
    from tests.conftest import PASSWORD
    from workers.registration import model_version_register

    model_version_register(package_path=demo_package)

    hospital = Tenant.objects.create(name="Demo General", slug="demo-general")
    membership_grant(
        tenant=hospital, user=user_get_or_create(username="clinician", password=PASSWORD), role="clinician"
    )
    assert Role.CLINICIAN == "clinician"
    processes, port = Processes(tmp_path), free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there: no request here needs it
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "SIGHTLINE_MAX_REQUEST_BYTES": str(LIMIT),
        "PYTHONUNBUFFERED": "1",
    }
    try:
        server, log = processes.start("web", web_server_argv(bin_dir=VENV_BIN, port=port), env)
        wait_for_port(port, server, log)
        response = requests.post(
            f"http://127.0.0.1:{port}/api/v1/auth/token/",
            json={"username": "clinician", "password": PASSWORD},
            timeout=10,
        )
        response.raise_for_status()
        yield port, response.json()["access"], log
    finally:
        processes.stop_all()


def read_response(connection: socket.socket, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    connection.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = connection.recv(65536)
        assert piece, f"the server closed the connection without an answer: {data!r}"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        piece = connection.recv(65536)
        assert piece, "the server closed the connection in the middle of its answer"
        body += piece
    return int(status_line.split()[1]), headers, body


def request_head(access: str, extra: str) -> bytes:
    return (
        "POST /api/v1/images/ HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: Bearer {access}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"{extra}\r\n"
    ).encode()


def test_a_chunked_body_past_the_limit_is_refused_as_it_arrives_and_nothing_is_kept(web):
    from recognition.models import Image, Study

    port, access, log = web
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request_head(access, "Transfer-Encoding: chunked\r\n"))
        connection.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sent += len(part)
        # keep sending until the server answers; it must do so once the body passes the limit,
        # without the last chunk ever being sent
        while not select.select([connection], [], [], 0)[0]:
            assert sent <= LIMIT + 8 * CHUNK, "the server took a chunked body well past its limit"
            try:
                connection.sendall(b"%x\r\n%s\r\n" % (CHUNK, b"\0" * CHUNK))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += CHUNK
            if sent > LIMIT:
                select.select([connection], [], [], 10)  # the answer is on its way: give it time
        status, headers, body = read_response(connection)
    assert status == 413, body
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    assert json.loads(body)["error"]["code"] == "too_large"
    assert LIMIT < sent <= LIMIT + 8 * CHUNK
    assert not Image.objects.exists() and not Study.objects.exists()
    time.sleep(0.5)  # let the web process finish abandoning the request before its log is read
    assert "Traceback" not in log.read_text(errors="replace")


def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_sent(web):
    port, access, _ = web
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request_head(access, f"Content-Length: {LIMIT + 1}\r\n"))
        status, _, body = read_response(connection)  # answered with no byte of the body sent
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"


def chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_within_the_limit_is_read_whole_by_the_application(web):
    """Django's and DRF's parsers read no body without a Content-Length: the cap gives a chunked
    body the length it turned out to have, so JSON and multipart bodies arrive whole."""
    from tests.conftest import PASSWORD

    port, access, _ = web
    payload = json.dumps({"username": "clinician", "password": PASSWORD}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            b"POST /api/v1/auth/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(payload, size=10)
        )
        status, _, body = read_response(connection)
    assert status == 200 and json.loads(body)["access"], body

    form = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="small.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_bytes(seed=3)
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(request_head(access, "Transfer-Encoding: chunked\r\n") + chunked(form, size=4096))
        status, _, body = read_response(connection, timeout=60)
    assert status == 201, body  # the file arrived: an image, not "no file"
