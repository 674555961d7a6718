"""End to end through the API: JWT, multipart upload, a real worker, a result over the WebSocket."""

import json
import time
from contextlib import contextmanager

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import png_bytes

pytestmark = pytest.mark.e2e


def token(stack, username, password):
    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": username, "password": password}, timeout=10
    )
    response.raise_for_status()
    return response.json()["access"]


@contextmanager
def open_feed(stack, access, tenant):
    """A socket subscribed to one hospital's feed."""
    with connect(f"{stack.ws_url}/ws/events/?token={access}", open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
        socket.send(json.dumps({"type": "subscribe", "tenant": tenant}))
        assert json.loads(socket.recv(timeout=10)) == {"type": "subscribed", "tenant": tenant}
        yield socket


def receive_until(socket, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
        if predicate(message):
            return message


def test_an_api_upload_comes_back_live_over_the_websocket(stack, live_demo):
    access = token(stack, "clinician", live_demo["password"])
    headers = {"Authorization": f"Bearer {access}"}
    with open_feed(stack, access, "demo-general") as socket:
        started = time.monotonic()
        response = requests.post(
            f"{stack.base_url}/api/v1/images/",
            headers=headers,
            files={"file": ("scan.png", png_bytes(opacity=True, seed=21), "image/png")},
            data={"accession_number": "E2E-1", "modality": "DX"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        image_id = response.json()["id"]
        message = receive_until(socket, lambda m: m.get("type") == "result.ready" and m["image"] == image_id)
        elapsed = time.monotonic() - started
    print(f"\nAPI upload → result.ready over the WebSocket: {elapsed * 1000:.0f} ms")
    assert message["status"] == "done"
    assert message["top_label"] == "round_opacity"
    assert 0.5 < message["probability"] <= 1.0
    assert set(message) == {"type", "image", "status", "top_label", "probability"}  # ids and summaries only

    detail = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
    assert detail["status"] == "done"  # the database agrees with the notification
    assert detail["results"][0]["top_label"] == message["top_label"]

    outsider = {"Authorization": f"Bearer {token(stack, 'clinician-b', live_demo['password'])}"}
    response = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=outsider, timeout=10)
    assert response.status_code == 404

    # the web server logged the handshake, but not the token it carried in its query string
    web_log = (stack.logs / "web.log").read_text(errors="replace")
    assert "WebSocket /ws/events/" in web_log
    assert access not in web_log


def test_another_hospitals_results_never_reach_the_socket(stack, live_demo):
    mine = token(stack, "clinician", live_demo["password"])
    theirs = token(stack, "clinician-b", live_demo["password"])
    with open_feed(stack, theirs, "demo-childrens") as outsider, open_feed(stack, mine, "demo-general") as member:
        outsider.send(json.dumps({"type": "subscribe", "tenant": "demo-general"}))
        refused = json.loads(outsider.recv(timeout=10))
        assert refused["type"] == "error" and refused["code"] == "not_found"  # like a hospital that does not exist
        response = requests.post(
            f"{stack.base_url}/api/v1/images/",
            headers={"Authorization": f"Bearer {mine}"},
            files={"file": ("scan.png", png_bytes(opacity=False, seed=22), "image/png")},
            timeout=30,
        )
        image_id = response.json()["id"]
        receive_until(member, lambda m: m.get("image") == image_id)
        outsider.send(json.dumps({"type": "ping"}))
        # the outsider's next message is the pong: nothing about the other hospital came first
        assert json.loads(outsider.recv(timeout=10)) == {"type": "pong"}


def test_sockets_without_valid_credentials_are_refused(stack, live_demo):
    for url in (f"{stack.ws_url}/ws/events/", f"{stack.ws_url}/ws/events/?token=not-a-jwt"):
        with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=10, origin="http://127.0.0.1"):
            pass
        assert refused.value.response.status_code == 403


def test_worker_presence_turns_ok_once_a_worker_serves_the_production_model(stack, live_demo):
    access = token(stack, "clinician", live_demo["password"])
    requests.post(
        f"{stack.base_url}/api/v1/images/",
        headers={"Authorization": f"Bearer {access}"},
        files={"file": ("scan.png", png_bytes(seed=23), "image/png")},
        timeout=30,
    )
    deadline = time.monotonic() + 40  # the worker's heartbeat runs every 15 s
    while True:
        response = requests.get(f"{stack.base_url}/health/workers/", timeout=10)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert response.status_code == 200, response.json()
    checks = response.json()["checks"]
    assert checks["worker"]["ok"] and checks["worker"]["workers"] >= 1
