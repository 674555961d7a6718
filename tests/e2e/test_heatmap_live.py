"""Grad-CAM on request through the real stack: a read stores no heatmap; asking for it answers
202 at once, a real worker makes it, ``heatmap.ready`` arrives on a real WebSocket of the image's
hospital only, and the next GET answers the PNG."""

import io
import json

import pytest
import requests
from PIL import Image

from tests.conftest import png_bytes
from tests.e2e.test_api_live import open_feed, receive_until, token

pytestmark = pytest.mark.e2e


def test_a_heatmap_asked_for_is_made_by_the_worker_and_pushed_to_its_hospital(stack, live_demo):
    access = token(stack, "clinician", live_demo["password"])
    outsider = token(stack, "clinician-b", live_demo["password"])
    headers = {"Authorization": f"Bearer {access}"}
    with open_feed(stack, access, "demo-general") as socket, open_feed(stack, outsider, "demo-childrens") as other:
        response = requests.post(
            f"{stack.base_url}/api/v1/images/",
            headers=headers,
            files={"file": ("scan.png", png_bytes(opacity=True, seed=61), "image/png")},
            timeout=30,
        )
        assert response.status_code in (201, 202), response.text
        image_id = response.json()["id"]
        receive_until(socket, lambda m: m.get("type") == "result.ready" and m["image"] == image_id)
        detail = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
        (result,) = detail["results"]
        assert result["has_heatmap"] is False and result["heatmap_status"] == "none"  # the read made none

        url = f"{stack.base_url}/api/v1/images/{image_id}/heatmap/"
        asked = requests.get(url, headers=headers, timeout=10)
        assert asked.status_code == 202 and asked.json()["status"] == "computing"
        assert int(asked.headers["Retry-After"]) > 0
        ready = receive_until(socket, lambda m: m.get("type") == "heatmap.ready" and m["image"] == image_id)
        assert ready["status"] == "ready" and set(ready) == {"type", "image", "result", "status"}

        served = requests.get(url, headers=headers, timeout=10)
        assert served.status_code == 200 and served.headers["Content-Type"] == "image/png"
        overlay = Image.open(io.BytesIO(served.content))
        assert overlay.size == (detail["width"], detail["height"])
        detail = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
        assert detail["results"][0]["heatmap_status"] == "ready"

        outsider_headers = {"Authorization": f"Bearer {outsider}"}
        assert requests.get(url, headers=outsider_headers, timeout=10).status_code == 404
        with pytest.raises(TimeoutError):  # the other hospital heard nothing of it
            while True:
                message = json.loads(other.recv(timeout=1))
                assert message.get("image") != image_id, message
