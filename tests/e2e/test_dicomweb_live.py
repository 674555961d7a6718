"""DICOMweb against the real web server (uvicorn, the Celery worker rendering what arrives), with
a plain HTTP client: STOW then QIDO then WADO, another hospital's 404s, an access-log entry for
each retrieval, and no query value in the web process's log. Then Orthanc's DICOMweb client, a
tool nobody here wrote, stores into Sightline and retrieves from it as the hospital's PACS node.
"""

from __future__ import annotations

import email
import email.policy
import io
import time

import httpx
import pydicom
import pytest

from accounts.models import AccessEvent, Role, Tenant
from tests.integration.test_dicomweb import (
    CT,
    CT_PATIENT_ID,
    CT_SERIES,
    CT_SOP,
    CT_STUDY,
    JSON_ACCEPT,
    MR,
    MR_STUDY,
    STOW_TYPE,
    WADO_ACCEPT,
    read,
    stow_body,
    value,
)
from tests.peers import orthanc_running

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

INSTANCE = f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}"
ACCESSION_SECRET = "ACC-NEVER-IN-A-LOG-8812"
RENDER_WAIT_SECONDS = 60


def signed_in(stack, username: str, password: str) -> httpx.Client:
    answer = httpx.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": username, "password": password}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {answer.json()['access']}"}, timeout=30
    )


def parts_of(answer: httpx.Response) -> list[bytes]:
    head = f"Content-Type: {answer.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + answer.content, policy=email.policy.HTTP)
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def test_stow_then_qido_then_wado_over_http_each_retrieval_logged(stack, live_demo):
    a = signed_in(stack, "clinician", live_demo["password"])
    b = signed_in(stack, "clinician-b", live_demo["password"])

    stored = a.post(
        "/dicomweb/studies",
        content=stow_body(read(CT), read(MR), b"not dicom"),
        headers={"Content-Type": STOW_TYPE, "Accept": JSON_ACCEPT},
    )
    assert stored.status_code == 202, stored.text
    assert len(stored.json()["00081199"]["Value"]) == 2 and len(stored.json()["00081198"]["Value"]) == 1

    found = a.get("/dicomweb/studies", params={"PatientID": CT_PATIENT_ID}, headers={"Accept": JSON_ACCEPT})
    assert found.status_code == 200 and [value(s, "0020000D") for s in found.json()] == [CT_STUDY]
    assert a.get("/dicomweb/studies", params={"AccessionNumber": ACCESSION_SECRET}).json() == []
    assert a.get("/dicomweb/studies", params={"AccessionNumber": ACCESSION_SECRET, "StudyDate": "x"}).status_code == 400
    instances = a.get(f"/dicomweb/studies/{CT_STUDY}/instances").json()
    assert [value(i, "00080018") for i in instances] == [CT_SOP]

    with a.stream("GET", f"/dicomweb/studies/{CT_STUDY}", headers={"Accept": WADO_ACCEPT}) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        answer.read()
    (original,) = parts_of(answer)
    assert pydicom.dcmread(io.BytesIO(original)).SOPInstanceUID == CT_SOP
    metadata = a.get(f"{INSTANCE}/metadata", headers={"Accept": JSON_ACCEPT})
    assert metadata.status_code == 200 and value(metadata.json()[0], "00080018") == CT_SOP
    deadline = time.monotonic() + RENDER_WAIT_SECONDS  # the worker renders what arrived
    while (rendered := a.get(f"{INSTANCE}/rendered", headers={"Accept": "image/png"})).status_code == 404:
        assert time.monotonic() < deadline, "the worker never rendered the received CT"
        time.sleep(0.5)
    assert rendered.status_code == 200 and rendered.content[:8] == b"\x89PNG\r\n\x1a\n"

    for path in (f"/dicomweb/studies/{CT_STUDY}", f"{INSTANCE}/metadata", f"{INSTANCE}/rendered"):
        assert b.get(path).status_code == 404, path
    assert b.get("/dicomweb/studies").json() == []

    done = AccessEvent.objects.filter(actor__username="clinician", outcome=AccessEvent.Outcome.SUCCESS)
    assert done.filter(action="dicomweb.retrieve", target_type="study").count() == 1
    assert done.filter(action="dicomweb.metadata", target_type="instance").count() == 1
    assert done.filter(action="dicomweb.rendered", target_type="image").count() == 1
    denied = AccessEvent.objects.filter(actor__username="clinician-b", outcome=AccessEvent.Outcome.DENIED)
    assert {event.action for event in denied} == {"dicomweb.retrieve", "dicomweb.metadata", "dicomweb.rendered"}

    web_log = (stack.logs / "web.log").read_text(errors="replace")
    assert ACCESSION_SECRET not in web_log and f"PatientID={CT_PATIENT_ID}" not in web_log


def test_orthancs_dicomweb_client_stores_into_and_retrieves_from_sightline(stack, live_demo, tmp_path):
    """Orthanc plays the hospital's PACS, a registered node: STOW-RS of a study it holds into
    Sightline, a QIDO-RS search, and a WADO-RS retrieve of the study back after deleting it."""
    from accounts.service_accounts import api_key_create, service_account_create
    from accounts.services import membership_grant, user_get_or_create
    from dicomnet.models import DicomNode
    from tests.conftest import PASSWORD

    admin = membership_grant(
        tenant=Tenant.objects.get(slug="demo-general"),
        user=user_get_or_create(username="admin-general", password=PASSWORD),
        role=Role.TENANT_ADMIN,
    )
    account = service_account_create(actor=admin, name="orthanc-pacs", role=Role.CLINICIAN)
    DicomNode.objects.create(
        tenant=admin.tenant, name="Orthanc", ae_title="ORTHANC", host="127.0.0.1", service_account=account
    )
    key = api_key_create(actor=admin, service_account=account)[1]

    with orthanc_running(tmp_path / "orthanc") as orthanc:
        pacs = httpx.Client(base_url=orthanc.url, timeout=120)
        server = {"Url": f"{stack.base_url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {key}"}}
        assert pacs.put("/dicom-web/servers/sightline", json=server).status_code == 200
        uploaded = pacs.post("/instances", content=read(MR)).json()
        study_id = uploaded["ParentStudy"]

        sent = pacs.post("/dicom-web/servers/sightline/stow", json={"Resources": [study_id]})
        assert sent.status_code == 200, sent.text
        found = pacs.post("/dicom-web/servers/sightline/qido", json={"Uri": "/studies", "Arguments": {}})
        assert found.status_code == 200, found.text
        assert MR_STUDY in found.text

        assert pacs.delete(f"/studies/{study_id}").status_code == 200
        assert pacs.get("/instances").json() == []
        got = pacs.post("/dicom-web/servers/sightline/retrieve", json={"Resources": [{"Study": MR_STUDY}]})
        assert got.status_code == 200, got.text
        assert len(pacs.get("/instances").json()) == 1  # back in the PACS, from Sightline
    node_events = AccessEvent.objects.filter(actor=account.user)
    assert node_events.filter(action="dicomweb.retrieve", outcome=AccessEvent.Outcome.SUCCESS).exists()
    assert node_events.filter(action="dicom.instance_received").exists()
