"""A Redis outage on the real stack (web, worker, beat, Redis, each a process of its own): while
Redis is really stopped an upload is still accepted (the database keeps the read that waits);
once Redis is back the read is done, a WebSocket client gets ``result.ready`` and the open
image list shows it without a reload (the browser test, ``-m browser``).

The web process closes its sockets with 1012 ("try again") when Redis goes (their groups lived
in Redis, which keeps nothing), so the client does what the pages' feed.js does: reconnect with
a backoff and subscribe again.

``RedisDrill`` (tests/e2e/drills.py) is the stack and its Redis switch, for later drills."""

from __future__ import annotations

import json
import time

import pytest
import requests
from websockets.exceptions import ConnectionClosed

from recognition.models import Image, InferenceRequest
from tests.conftest import PASSWORD, png_bytes
from tests.e2e.drills import RedisDrill, subscribed_socket

# a private stack with Redis killed, the same on either database (its browser half runs with the
# browser suite, in CI's SQLite pass): CI runs it in one pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]


@pytest.fixture
def drill(live_demo, tmp_path):
    stack = RedisDrill(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


def bearer(drill: RedisDrill) -> dict:
    response = requests.post(
        f"{drill.base_url}/api/v1/auth/token/", json={"username": "clinician", "password": PASSWORD}, timeout=10
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access']}"}


def test_an_upload_while_redis_is_down_is_accepted_and_its_result_reaches_a_websocket_client(drill):
    drill.start(beat=False)  # beat comes once the client is back: the read cannot finish unheard
    headers = bearer(drill)
    access = headers["Authorization"].split()[1]
    with subscribed_socket(drill, access, "demo-general") as socket:
        drill.redis_stop()
        with pytest.raises(ConnectionClosed) as closed:  # its groups went with Redis: it can hear nothing more
            socket.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012  # "try again", in a close frame
    assert "events socket closed for the client to reconnect" in drill.log("web")
    assert "Exception in ASGI application" not in drill.log("web")
    started = time.monotonic()
    response = requests.post(
        f"{drill.base_url}/api/v1/images/",
        files={"file": ("outage.png", png_bytes(seed=42), "image/png")},
        headers=headers,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert time.monotonic() - started < 30  # accepted, not hung on the broker
    image_id = response.json()["id"]
    assert InferenceRequest.objects.get(image_id=image_id).status == "queued"  # waits in the database
    assert "workers.tasks.infer" in drill.log("web") and "stays in the database" in drill.log("web")

    drill.redis_start()
    with subscribed_socket(drill, access, "demo-general") as socket:  # feed.js's reconnection
        drill.beat_start()  # the reconciliation sends the read that waited
        deadline = time.monotonic() + 90
        while True:
            try:
                message = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            except (TimeoutError, ConnectionClosed) as exc:
                pytest.fail(f"no result.ready ({exc!r}):\n{drill.log('web')[-3000:]}\n{drill.log('worker')[-3000:]}")
            if message.get("type") == "result.ready" and message["image"] == image_id:
                break
    assert message["status"] == "done" and message["top_label"]
    detail = requests.get(f"{drill.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
    assert detail["status"] == "done"
    assert Image.objects.get(pk=image_id).inference_requests.get().status == "done"


@pytest.mark.browser
def test_the_open_image_list_shows_a_read_finished_after_the_outage_without_a_reload(drill, browser_context):
    from playwright.sync_api import expect

    from tests.e2e.test_browser import sign_in

    drill.start(beat=False)
    page = browser_context.new_page()
    sign_in(page, drill, "clinician", PASSWORD)
    live = page.locator("#live")
    expect(live).to_have_attribute("data-state", "live", timeout=30_000)
    page.evaluate("window.__sameDocument = true")

    drill.redis_stop()
    expect(live).to_have_attribute("data-state", "offline", timeout=30_000)  # the page says it is offline
    response = requests.post(
        f"{drill.base_url}/api/v1/images/",
        files={"file": ("outage.png", png_bytes(seed=43), "image/png")},
        headers=bearer(drill),
        timeout=60,
    )
    assert response.status_code == 201, response.text
    image_id = response.json()["id"]

    drill.redis_start()
    expect(live).to_have_attribute("data-state", "live", timeout=60_000)  # reconnected on its own
    status = page.locator(f'#images tbody tr[data-image="{image_id}"] [data-role=status]')
    expect(status).to_have_text("queued", timeout=30_000)  # caught up from the API on reconnecting
    drill.beat_start()  # the reconciliation sends the read; its result.ready reaches the page
    expect(status).to_have_text("done", timeout=90_000)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
