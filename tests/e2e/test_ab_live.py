"""An A/B split end to end: uploads through the API, the stack's real Celery worker reads each
image with its arm and then, from the bulk queue, with the other arm (shadow reads, 100% here);
the hospital's socket hears one ``result.ready`` per image, the API shows the read clinicians
were meant to see, and the agreement page compares the two versions on the shadow pairs."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests
from django.test import Client

from accounts.models import Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from recognition.models import InferenceRequest, ModelVersion, Result
from recognition.services.registry import traffic_split_set
from recognition.services.shadow import traffic_split_shadow_set
from tests.conftest import PASSWORD, png_bytes
from tests.e2e.test_api_live import open_feed, token
from tests.integration.test_registry import run, variant

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

IMAGES = 4
READ_TIMEOUT_S = 90


def test_shadow_reads_run_on_the_bulk_lane_and_reach_no_clinician(stack, live_demo, demo_package, tmp_path):
    a = ModelVersion.objects.get(version="1.0.0")
    swapped = variant(demo_package, tmp_path, version="1.1.0", labels=list(reversed(a.labels)))
    run("register_model", str(swapped), "--validate-here")
    b = ModelVersion.objects.get(version="1.1.0")
    general = Tenant.objects.get(slug="demo-general")
    traffic_split_set(tenant=general, model=a.model, version=b, percent=50)
    traffic_split_shadow_set(tenant=general, model=a.model, shadow_percent=100)

    access = token(stack, "clinician", live_demo["password"])
    headers = {"Authorization": f"Bearer {access}"}
    with open_feed(stack, access, "demo-general") as socket:
        ids = []
        for seed in range(IMAGES):
            response = requests.post(
                f"{stack.base_url}/api/v1/images/",
                headers=headers,
                files={"file": ("scan.png", png_bytes(opacity=seed % 2 == 0, seed=40 + seed), "image/png")},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        deadline = time.monotonic() + READ_TIMEOUT_S
        while InferenceRequest.objects.filter(image_id__in=ids, status="done").count() < 2 * IMAGES:
            assert time.monotonic() < deadline, list(InferenceRequest.objects.values("image_id", "shadow", "status"))
            time.sleep(0.2)
        pushed = []
        while True:
            try:
                pushed.append(json.loads(socket.recv(timeout=2)))
            except TimeoutError:
                break

    shadows = InferenceRequest.objects.filter(image_id__in=ids, shadow=True)
    assert shadows.count() == IMAGES and {s.priority for s in shadows} == {InferenceRequest.Priority.BULK}
    ready = [m for m in pushed if m["type"] == "result.ready"]
    assert sorted(m["image"] for m in ready) == sorted(ids)  # one each: the shadow reads pushed nothing
    for image_id in ids:
        shown = Result.objects.get(image_id=image_id, request__shadow=False)
        shadow = Result.objects.get(image_id=image_id, request__shadow=True)
        assert shadow.model_version_id != shown.model_version_id and shadow.top_label != shown.top_label
        detail = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
        assert [r["top_label"] for r in detail["results"]] == [shown.top_label]
        assert next(m for m in ready if m["image"] == image_id)["top_label"] == shown.top_label
        signed = requests.post(
            f"{stack.base_url}/api/v1/images/{image_id}/reviews/",
            headers=headers,
            json={"verdict": "agree", "sign_off": True},
            timeout=10,
        )
        assert signed.status_code == 201, signed.text

    admin = membership_grant(
        tenant=general, user=user_get_or_create(username="hospital-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    browser = Client()
    browser.force_login(admin.user)
    page = browser.get("/agreement/").content.decode()
    assert "A/B: sightline-demo 1.0.0 against 1.1.0" in page
    assert re.search(r'class="list ab-shadow".*?<td>4</td>\s*<td>0</td>\s*<td>0%</td>', page, re.S)  # none agree
