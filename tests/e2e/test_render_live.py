"""End to end: a DICOM the request does not decode is received (202), a real worker renders it,
queues its read, and the finding arrives over the WebSocket; a damaged frame fails alone."""

import time

import pytest
import requests

from tests.e2e.test_api_live import open_feed, receive_until, token
from tests.integration.test_decode import damaged_second_frame

pytestmark = pytest.mark.e2e


def test_a_compressed_dicom_is_rendered_by_the_worker_and_read_live(stack, live_demo):
    access = token(stack, "clinician", live_demo["password"])
    headers = {"Authorization": f"Bearer {access}"}
    with open_feed(stack, access, "demo-general") as socket:
        started = time.monotonic()
        response = requests.post(
            f"{stack.base_url}/api/v1/images/",
            headers=headers,
            files={"file": ("ct.dcm", damaged_second_frame(), "application/dicom")},
            timeout=30,
        )
        answered = time.monotonic() - started
        assert response.status_code == 202, response.text
        frames = response.json()["images"]
        assert [frame["state"] for frame in frames] == ["received"] * 3
        seen = {}
        while len(seen) < 3:
            message = receive_until(socket, lambda m: m.get("type") == "result.ready", timeout=90)
            seen[message["image"]] = message["status"]
    print(f"\nreceived in {answered * 1000:.0f} ms; rendered and read in {time.monotonic() - started:.1f} s")
    ids = [frame["id"] for frame in frames]
    assert [seen[i] for i in ids] == ["done", "failed", "done"]
    details = [requests.get(f"{stack.base_url}/api/v1/images/{i}/", headers=headers, timeout=10).json() for i in ids]
    assert [d["state"] for d in details] == ["rendered", "failed", "rendered"]
    assert "could not be decoded" in details[1]["unprocessable_reason"]
    assert details[0]["results"] and details[2]["results"] and not details[1]["results"]
