"""The platform behind the real nginx (platform/nginx, rendered by render.sh): HTTPS with HTTP/2,
wss:// for the live feed, bodies streamed to the replica, static files from nginx, the client's
address (not the proxy's) in the access log and the lockout, security headers once, nginx's own
errors in the platform's shape, and no query string (nor an invitation link's token) in nginx's logs.

The web replica, the worker and Redis are real (the suite's ``stack`` gives the worker and Redis;
the replica here is started with the flags it has behind a proxy)."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from tests.conftest import png_bytes
from tests.e2e.conftest import Processes, free_port
from tests.e2e.nginx_fixtures import (
    CLIENT_ADDRESS,
    OTHER_CLIENT_ADDRESS,
    PROXY_ADDRESS,
    RENDER,
    Nginx,
    Tls,
    collect_static,
    https_client,
    nginx_start,
    proxied_web_start,
    read_response,
    tls_files,
    tls_socket,
)

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

LIMIT = 8 * 1024 * 1024  # SIGHTLINE_MAX_REQUEST_BYTES of nginx and the replica here
LOGIN_FAILURE_LIMIT = 3
SECURITY_HEADERS = (
    "strict-transport-security",
    "content-security-policy",
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
)
SECRET_QUERY = "token=not-for-logs-7f3a&PatientID=PAT-NOT-FOR-LOGS-4411"


@dataclass
class Edge:
    front: Nginx  # in front of the replica
    slow: Nginx  # the same replica, a 2 s upstream timeout (the 504)
    down: Nginx  # a replica that is down (the 502)
    tls: Tls
    web_pid: int
    web_port: int
    web_log: Path
    http_port: int  # the front's plain-HTTP port: redirects only
    static: dict[str, str]  # collectstatic's manifest


@pytest.fixture(scope="module")
def edge(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("nginx")
    processes = Processes(root)
    tls = tls_files(root / "tls")
    static = collect_static(root / "static")
    env = {
        **stack.env,
        "SIGHTLINE_MAX_REQUEST_BYTES": str(LIMIT),
        "SIGHTLINE_LOGIN_FAILURE_LIMIT": str(LOGIN_FAILURE_LIMIT),
    }
    http_port = free_port()
    common = {"tls": tls, "static_root": root / "static", "max_request_bytes": LIMIT}
    try:
        web, web_port = proxied_web_start(processes, env)
        replica = f"127.0.0.1:{web_port}"
        yield Edge(
            front=nginx_start(
                processes, prefix=root / "front", upstreams=[replica], http_listen=f"127.0.0.1:{http_port}", **common
            ),
            slow=nginx_start(processes, prefix=root / "slow", upstreams=[replica], upstream_timeout="2s", **common),
            down=nginx_start(processes, prefix=root / "down", upstreams=[f"127.0.0.1:{free_port()}"], **common),
            tls=tls,
            web_pid=web.pid,
            web_port=web_port,
            web_log=root / "web-proxied.log",
            http_port=http_port,
            static=static,
        )
    finally:
        processes.stop_all()


def sign_in(client: httpx.Client, password: str, username: str = "clinician") -> httpx.Response:
    return client.post("/api/v1/auth/token/", json={"username": username, "password": password})


def access_events(request_id: str):
    from accounts.models import AccessEvent

    return AccessEvent.objects.filter(request_id=request_id)


def access_event(request_id: str):
    return access_events(request_id).get()


def test_an_upload_comes_back_live_over_https_and_wss(edge, live_demo):
    with https_client(edge.front, edge.tls) as client:
        signed_in = sign_in(client, live_demo["password"])
        assert signed_in.status_code == 200, signed_in.text
        assert signed_in.http_version == "HTTP/2"
        access = signed_in.json()["access"]
        with connect(
            f"{edge.front.ws_url}/ws/events/?token={access}",
            ssl=edge.tls.client_context(),
            source_address=(CLIENT_ADDRESS, 0),
            open_timeout=10,
        ) as feed:
            assert json.loads(feed.recv(timeout=10)) == {"type": "hello"}
            feed.send(json.dumps({"type": "subscribe", "tenant": "demo-general"}))
            assert json.loads(feed.recv(timeout=10)) == {"type": "subscribed", "tenant": "demo-general"}
            uploaded = client.post(
                "/api/v1/images/",
                headers={"Authorization": f"Bearer {access}"},
                files={"file": ("scan.png", png_bytes(opacity=True, seed=61), "image/png")},
                data={"accession_number": "NGINX-1", "modality": "DX"},
            )
            assert uploaded.status_code == 201, uploaded.text
            assert uploaded.http_version == "HTTP/2"
            image_id = uploaded.json()["id"]
            deadline = time.monotonic() + 60
            while True:
                message = json.loads(feed.recv(timeout=max(0.1, deadline - time.monotonic())))
                if message.get("type") == "result.ready" and message["image"] == image_id:
                    break
    assert message["status"] == "done" and message["top_label"] == "round_opacity"

    # one request id for nginx's line, Django's answer and the access-log entry; the client's address
    request_id = uploaded.headers["x-request-id"]
    entry = edge.front.entry(request_id=request_id)
    assert entry["method"] == "POST" and entry["uri"] == "/api/v1/images/" and entry["status"] == 201
    assert entry["remote_addr"] == CLIENT_ADDRESS and entry["upstream"] == f"127.0.0.1:{edge.web_port}"
    event = access_event(request_id)
    assert event.ip_address == CLIENT_ADDRESS
    # the WebSocket went through as an HTTP/1.1 upgrade; its token is in no log line of nginx
    handshake = edge.front.entry(uri="/ws/events/")
    assert handshake["status"] == 101 and handshake["protocol"] == "HTTP/1.1"
    assert access not in edge.front.log_text()


def noise_archive(images: int) -> bytes:
    """A zip of PNGs that do not compress: about 1 MB each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for number in range(images):
            picture = Image.frombytes("L", (1024, 1024), os.urandom(1024 * 1024))
            png = io.BytesIO()
            picture.save(png, format="PNG", compress_level=0)
            archive.writestr(f"night/{number:03d}.png", png.getvalue())
    return buffer.getvalue()


def spooled_bytes(pid: int) -> int:
    """The largest unlinked temporary file the process holds open: where Django spools a body
    that is still arriving."""
    largest = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).endswith("(deleted)"):
                info = os.stat(fd)
                if stat.S_ISREG(info.st_mode):
                    largest = max(largest, info.st_size)
        except OSError:
            continue  # closed meanwhile
    return largest


def files_under(pids: list[int], folder: Path) -> list[str]:
    held = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(folder)):
                held.append(target)
    return held


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
def test_a_large_archive_streams_through_nginx_without_being_kept_there(edge, live_demo, protocol):
    with https_client(edge.front, edge.tls) as client:
        headers = {"Authorization": f"Bearer {sign_in(client, live_demo['password']).json()['access']}"}
        job = client.post("/api/v1/batches/", json={"name": "streamed"}, headers=headers).json()
    archive = noise_archive(6)
    boundary = "sightline-nginx-stream"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; filename="night.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + archive
        + f"\r\n--{boundary}--\r\n".encode()
    )
    assert 4 * 2**20 < len(body) < LIMIT
    path, content_type = f"/api/v1/batches/{job['id']}/items/", f"multipart/form-data; boundary={boundary}"
    client_body_temp = edge.front.prefix / "temp" / "client_body"
    half = len(body) // 2 + 2**20

    def the_replica_has_it_while_the_client_waits() -> None:
        deadline = time.monotonic() + 20
        while spooled_bytes(edge.web_pid) < half // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        # (buffered in nginx, the replica would have none of it until the client had sent it all)
        assert spooled_bytes(edge.web_pid) >= half // 2, "the body did not reach the replica while arriving"
        assert files_under(edge.front.worker_pids(), client_body_temp) == []
        assert list(client_body_temp.iterdir()) == []

    def pieces(start: int, end: int):
        for offset in range(start, end, 2**16):
            yield body[offset : min(offset + 2**16, end)]

    if protocol == "HTTP/1.1":
        # chunked, no Content-Length: nginx streams such a body only to an HTTP/1.1 upstream (to an
        # HTTP/1.0 one it would buffer it whole), so this also shows what nginx speaks to the replica
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{edge.front.port}\r\n"
            f"Authorization: {headers['Authorization']}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        with tls_socket(edge.front, edge.tls) as connection:
            connection.sendall(head)
            for piece in pieces(0, half):
                connection.sendall(chunk(piece))
            the_replica_has_it_while_the_client_waits()
            for piece in pieces(half, len(body)):
                connection.sendall(chunk(piece))
            connection.sendall(b"0\r\n\r\n")
            status, answer_headers, answer = read_response(connection)
        request_id = answer_headers["x-request-id"]
    else:  # a browser's upload: HTTP/2 DATA frames, no length declared

        def paused_body():
            yield from pieces(0, half)
            the_replica_has_it_while_the_client_waits()
            yield from pieces(half, len(body))

        with https_client(edge.front, edge.tls) as client:
            response = client.post(path, headers={**headers, "Content-Type": content_type}, content=paused_body())
        assert response.http_version == "HTTP/2"
        status, answer, request_id = response.status_code, response.content, response.headers["x-request-id"]
    assert status == 202, answer
    entry = edge.front.entry(request_id=request_id, uri=path)
    assert entry["status"] == 202 and entry["request_length"] >= len(body)
    with https_client(edge.front, edge.tls) as client:  # the worker unpacks it: wait, so the test ends quiet
        deadline = time.monotonic() + 60
        while client.get(f"/api/v1/batches/{job['id']}/", headers=headers).json()["uploads_pending"]:
            assert time.monotonic() < deadline, "the archive was never unpacked"
            time.sleep(0.2)
        status = client.get(f"/api/v1/batches/{job['id']}/", headers=headers).json()
        assert status["total"] == 6, status


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize(("path", "kind"), [("/api/v1/images/", "application/json"), ("/accounts/login/", "text/html")])
def test_a_body_over_the_limit_is_refused_by_nginx_before_it_is_sent(edge, path, kind):
    with tls_socket(edge.front, edge.tls) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{edge.front.port}\r\nContent-Type: application/zip\r\n"
            f"Content-Length: {LIMIT + 1}\r\n\r\n".encode()
        )
        status, headers, answer = read_response(connection)
    assert status == 413 and headers["content-type"] == kind
    if kind == "application/json":
        error = json.loads(answer)["error"]
        assert error["code"] == "too_large" and set(error) == {"code", "message", "detail"}
        assert "8 MB" in error["message"]
    else:
        assert b"<html" in answer


def test_static_files_come_from_nginx_with_long_caching_and_nothing_else_is_stored(edge, live_demo):
    hashed = edge.static["css/site.css"]
    assert hashed != "css/site.css"
    with https_client(edge.front, edge.tls) as client:
        static = client.get(f"/static/{hashed}")
        plain = client.get("/static/css/site.css")
        page = client.get("/accounts/login/")
    assert static.status_code == 200 and static.headers["content-type"].startswith("text/css")
    assert static.headers.get_list("cache-control") == ["public, max-age=31536000, immutable"]
    assert edge.front.entry(request_id=static.headers["x-request-id"])["upstream"] == ""  # nginx answered itself
    assert plain.headers.get_list("cache-control") == ["no-cache"]
    assert page.status_code == 200 and len(page.headers.get_list("cache-control")) == 1
    assert "no-store" in page.headers["cache-control"]  # Django's, passed on as it is


def test_plain_http_only_redirects_to_https_and_proxies_nothing(edge):
    with httpx.Client(base_url=f"http://127.0.0.1:{edge.http_port}", timeout=10) as client:
        page = client.get("/accounts/login/?next=/worklist/")
        upload = client.post("/api/v1/images/", content=b"not sent on")
    assert page.status_code == 301
    assert page.headers["location"] == f"https://127.0.0.1:{edge.front.port}/accounts/login/?next=/worklist/"
    assert upload.status_code == 308  # the method and body must be sent again, to https
    assert edge.front.entry(uri="/api/v1/images/", status=308)["upstream"] == ""


def security_headers_once(response: httpx.Response) -> None:
    for name in SECURITY_HEADERS:
        assert len(response.headers.get_list(name)) == 1, (name, response.status_code, response.url)


def test_the_security_headers_appear_exactly_once_on_every_kind_of_answer(edge, live_demo):
    with https_client(edge.front, edge.tls) as client:
        access = sign_in(client, live_demo["password"]).json()["access"]
        page = client.get("/accounts/login/")
        api = client.get("/api/v1/images/", headers={"Authorization": f"Bearer {access}"})
        static = client.get(f"/static/{edge.static['js/site.js']}")
    with https_client(edge.down, edge.tls) as client:
        nginx_error = client.get("/api/v1/images/")
    assert (page.status_code, api.status_code, static.status_code, nginx_error.status_code) == (200, 200, 200, 502)
    for response in (page, api, static, nginx_error):
        security_headers_once(response)
        assert len(response.headers.get_list("x-request-id")) == 1
    # Django's policy on its own answers, nginx's stricter one on what nginx answers itself
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert nginx_error.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_client_address_counts_not_the_proxys_and_a_forged_header_is_ignored(edge, live_demo):
    from axes.models import AccessAttempt

    forged = {"X-Forwarded-For": "10.66.0.1", "X-Real-IP": "10.66.0.1", "Forwarded": "for=10.66.0.1"}
    with https_client(edge.front, edge.tls) as client:
        failures = [client.post("/api/v1/auth/token/", json={"username": "clinician", "password": "wrong"},
                                headers=forged) for _ in range(LOGIN_FAILURE_LIMIT)]  # fmt: skip
        locked = sign_in(client, live_demo["password"])
    # the failure that reaches the limit locks (username, client address) at once
    assert [failure.status_code for failure in failures] == [401] * (LOGIN_FAILURE_LIMIT - 1) + [429]
    for failure in failures:
        assert set(access_events(failure.headers["x-request-id"]).values_list("ip_address", flat=True)) == {
            CLIENT_ADDRESS
        }
    assert locked.status_code == 429
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {CLIENT_ADDRESS}
    # another client through the same proxy is not locked out: the proxy's address counts for nobody
    with https_client(edge.front, edge.tls, local_address=OTHER_CLIENT_ADDRESS) as other:
        assert sign_in(other, live_demo["password"]).status_code == 200

    # straight to the replica from an address that is not the proxy: the forged header is not trusted
    direct = httpx.post(
        f"http://127.0.0.1:{edge.web_port}/api/v1/auth/token/",
        json={"username": "clinician-b", "password": "wrong"},
        headers={**forged, "X-Forwarded-Proto": "https"},
        timeout=10,
    )
    assert direct.status_code == 401
    assert access_event(direct.headers["x-request-id"]).ip_address == "127.0.0.1"
    assert PROXY_ADDRESS not in {str(ip) for ip in AccessAttempt.objects.values_list("ip_address", flat=True)}


def test_nginx_answers_502_and_504_in_the_platforms_shape_on_api_paths_and_a_page_elsewhere(edge, live_demo):
    with https_client(edge.down, edge.tls) as client:
        api = client.get(f"/api/v1/images/?{SECRET_QUERY}")
        dicomweb = client.get(f"/dicomweb/studies?{SECRET_QUERY}")
        kserve = client.post(f"/v2/models/demo/infer?{SECRET_QUERY}", json={"inputs": []})
        page = client.get(f"/accounts/login/?{SECRET_QUERY}")
    for response in (api, dicomweb, kserve):
        assert response.status_code == 502 and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"code", "message", "detail"}
        assert error["code"] == "bad_gateway" and "retry" in error["message"] and error["detail"]["retry"] is True
    assert page.status_code == 502 and page.headers["content-type"] == "text/html" and "retry" in page.text

    os.kill(edge.web_pid, signal.SIGSTOP)  # a replica that accepts and never answers
    try:
        with https_client(edge.slow, edge.tls) as client:
            timed_out = client.get(f"/dicomweb/studies?{SECRET_QUERY}")
            timed_out_page = client.get(f"/accounts/login/?{SECRET_QUERY}")
    finally:
        os.kill(edge.web_pid, signal.SIGCONT)
    assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "gateway_timeout"
    assert "retry" in timed_out.json()["error"]["message"]
    assert timed_out_page.status_code == 504 and timed_out_page.headers["content-type"] == "text/html"

    # the access log names each path without its query; neither log of any nginx has the query
    edge.down.entry(uri="/accounts/login/", status=502), edge.slow.entry(uri="/accounts/login/", status=504)
    assert [line["uri"] for line in edge.down.access_log()][-4:] == [
        "/api/v1/images/", "/dicomweb/studies", "/v2/models/demo/infer", "/accounts/login/",
    ]  # fmt: skip
    assert [line["status"] for line in edge.slow.access_log()][-2:] == [504, 504]
    for nginx in (edge.front, edge.slow, edge.down):
        text = nginx.log_text()
        assert "not-for-logs" not in text and "NOT-FOR-LOGS" not in text and "PatientID" not in text


def test_an_invitation_links_token_is_in_neither_nginxs_log_nor_the_web_replicas(edge, live_demo):
    # the link is the credential (whoever holds it joins the hospital): a live one and a used-up one
    from accounts.models import Role, Tenant
    from accounts.services import invitation_create, membership_grant, user_get_or_create

    general = Tenant.objects.get(slug="demo-general")
    admin = membership_grant(
        tenant=general,
        user=user_get_or_create(username="inviter", password=live_demo["password"]),
        role=Role.TENANT_ADMIN,
    )
    _, live = invitation_create(actor=admin, email="new-reader@example.org", role=Role.VIEWER)
    unknown = "not-for-logs-invitation-9c2e"
    with https_client(edge.front, edge.tls) as client:
        page = client.get(f"/invitations/{live}/?{SECRET_QUERY}")
        gone = client.get(f"/invitations/{unknown}/")
    assert (page.status_code, gone.status_code) == (200, 410)
    assert edge.front.entry(request_id=page.headers["x-request-id"])["uri"] == "/invitations/[redacted]/"
    assert edge.front.entry(request_id=gone.headers["x-request-id"])["uri"] == "/invitations/[redacted]/"
    deadline = time.monotonic() + 5  # the replica's own line follows its answer
    while gone.headers["x-request-id"] not in edge.web_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    for text in (edge.front.log_text(), edge.web_log.read_text(errors="replace")):
        assert live not in text and unknown not in text and "not-for-logs" not in text
    assert "/invitations/[redacted]/" in edge.web_log.read_text()


@pytest.mark.parametrize("value", ["8388608; include /etc/passwd", "1m", "8388608\nlisten 80"])
def test_render_refuses_a_value_nginx_would_read_as_more_config(tmp_path, value):
    tls = tls_files(tmp_path / "tls")
    env = {
        "PATH": os.environ["PATH"],
        "SIGHTLINE_NGINX_LISTEN": f"127.0.0.1:{free_port()}",
        "SIGHTLINE_NGINX_UPSTREAMS": "127.0.0.1:1",
        "SIGHTLINE_NGINX_CERT": str(tls.cert_pem),
        "SIGHTLINE_NGINX_KEY": str(tls.key_pem),
        "SIGHTLINE_STATIC_ROOT": str(tmp_path),
        "SIGHTLINE_MAX_REQUEST_BYTES": value,
    }
    rendered = subprocess.run(["sh", str(RENDER), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert rendered.returncode == 2 and "SIGHTLINE_MAX_REQUEST_BYTES" in rendered.stderr
    assert not (tmp_path / "out" / "nginx.conf").exists()
