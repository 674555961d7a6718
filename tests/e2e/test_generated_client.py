"""A Python client generated from the OpenAPI document (openapi-python-client) does one upload →
result round trip against the live stack, a real worker reading the image."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import png_bytes

pytestmark = pytest.mark.e2e

RESULT_SECONDS = 60


def generate_client(base_url: str, into: Path):
    document = requests.get(
        f"{base_url}/api/v1/schema/", headers={"Accept": "application/vnd.oai.openapi+json"}, timeout=30
    )
    document.raise_for_status()
    (into / "openapi.json").write_bytes(document.content)
    subprocess.run(
        [str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path", "openapi.json",
         "--meta", "none", "--output-path", "sightline_client"],
        cwd=into, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    sys.path.insert(0, str(into))
    try:
        importlib.invalidate_caches()
        return importlib.import_module("sightline_client")
    finally:
        sys.path.remove(str(into))


def test_a_generated_client_uploads_an_image_and_reads_its_finding(stack, live_demo, tmp_path):
    client_package = generate_client(stack.base_url, tmp_path)
    from sightline_client.api.auth import auth_token_create
    from sightline_client.api.images import images_create, images_list, images_retrieve
    from sightline_client.models import AuditedTokenObtainPairRequest, ImageUploadInputRequest
    from sightline_client.types import File

    anonymous = client_package.Client(base_url=stack.base_url, raise_on_unexpected_status=True)
    tokens = auth_token_create.sync(
        client=anonymous,
        body=AuditedTokenObtainPairRequest(username="clinician", password=live_demo["password"]),
    )
    api = client_package.AuthenticatedClient(
        base_url=stack.base_url, token=tokens.access, raise_on_unexpected_status=True
    )

    upload = ImageUploadInputRequest(
        file=File(payload=png_bytes(opacity=True), file_name="chest.png", mime_type="image/png"),
        patient_id="P-client",
    )
    created = images_create.sync_detailed(client=api, body=upload)
    assert created.status_code == 201, created.content
    image_id = created.parsed.id
    assert created.parsed.study.patient_id != ""

    deadline = time.monotonic() + RESULT_SECONDS
    while True:
        detail = images_retrieve.sync(client=api, image_id=image_id)
        if detail.results:
            break
        assert time.monotonic() < deadline, f"no result within {RESULT_SECONDS} s: {detail.status}"
        time.sleep(0.5)
    finding = detail.results[0]
    assert finding.top_label in finding.probabilities
    assert finding.demo is True and finding.model == "sightline-demo"

    page = images_list.sync(client=api)  # the page envelope, typed
    assert [image.id for image in page.results] == [image_id] and page.next_ is None

    # an error answer is parsed into the one error shape too
    missing = images_retrieve.sync_detailed(client=api, image_id=image_id + 10_000)
    assert missing.status_code == 404 and missing.parsed.error.code == "not_found"
