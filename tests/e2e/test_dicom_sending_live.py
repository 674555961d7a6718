"""Findings back to the PACS through the real stack: a DICOM image uploaded over the API is read
by a real Celery worker, whose stored result queues the export; the sender (the same worker, its
housekeeping queue) makes the AI SR and, once the worker has computed the heatmap, the map, and
C-STOREs both to Orthanc; a sign-off over the API sends the verdict's SR there too, and a
destination that sends only after sign-off gets all three over STOW-RS. Orthanc holds each once."""

from __future__ import annotations

import io
import subprocess
import time

import highdicom as hd
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file

from accounts.models import AccessEvent, Role
from accounts.services import membership_grant, user_get_or_create
from dicomnet.destinations import DestinationFields, destination_create
from dicomnet.models import Delivery, Instance
from tests.conftest import PASSWORD
from tests.e2e.test_api_live import token
from tests.peers import dcmtk, orthanc_running

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

WAIT_SECONDS = 120


def wait_for(what, check, timeout=WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def statuses():
    return {
        (d.instance.kind, d.destination.name): d.status
        for d in Delivery.objects.select_related("instance", "destination")
    }


def test_a_dicom_finding_and_its_sign_off_reach_orthanc_through_a_real_worker(stack, live_demo, tmp_path):
    from accounts.models import Tenant

    general = Tenant.objects.get(slug="demo-general")
    admin = membership_grant(
        tenant=general, user=user_get_or_create(username="pacs-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    with orthanc_running(tmp_path / "pacs") as orthanc:
        destination_create(
            actor=admin,
            fields=DestinationFields(
                name="pacs-dimse", kind="dimse", host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC",
                send_on="result",
            ),
        )  # fmt: skip
        destination_create(
            actor=admin,
            fields=DestinationFields(
                name="pacs-stow", kind="stow", url=f"{orthanc.dicomweb_url}/studies", username="u", secret="p",
                send_on="signoff",
            ),
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {token(stack, 'clinician', live_demo['password'])}"}
        with open(get_testdata_file("CT_small.dcm", download=False), "rb") as handle:
            source = dcmread(io.BytesIO(handle.read()))
            handle.seek(0)
            response = requests.post(
                f"{stack.base_url}/api/v1/images/",
                headers=headers,
                files={"file": ("ct.dcm", handle.read(), "application/dicom")},
                timeout=30,
            )
        assert response.status_code in (201, 202), response.text
        image_id = response.json()["id"]

        # the read's result is exported at once to the destination that sends on every result
        sent_on_result = {("ai_sr", "pacs-dimse"): "sent", ("map", "pacs-dimse"): "sent"}
        wait_for("the AI SR and map sent over C-STORE", lambda: statuses() == sent_on_result)
        assert len(orthanc.instances()) == 2

        reviews = f"{stack.base_url}/api/v1/images/{image_id}/reviews/"
        signed = requests.post(reviews, headers=headers, json={"verdict": "agree", "sign_off": True}, timeout=30)
        assert signed.status_code == 201, signed.text
        everything = {
            (kind, name): "sent" for kind in ("ai_sr", "map", "review_sr") for name in ("pacs-dimse", "pacs-stow")
        }
        wait_for("the sign-off's SR, and the AI SR and map over STOW-RS", lambda: statuses() == everything)

        held = {i["SOPInstanceUID"]: i for i in orthanc.instances()}
        made = {i.kind: i for i in Instance.objects.filter(origin="created")}
        assert set(held) == {i.sop_instance_uid for i in made.values()}  # each object once, however sent
        ai = dcmread(io.BytesIO(orthanc.instance_file(made["ai_sr"].sop_instance_uid)))
        report = hd.sr.srread(io.BytesIO(orthanc.instance_file(made["ai_sr"].sop_instance_uid)))
        assert ai.StudyInstanceUID == source.StudyInstanceUID  # filed with the study it belongs to
        referenced = {
            item.ReferencedSOPInstanceUID
            for item in report.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence
        }
        assert referenced == {source.SOPInstanceUID}
        for kind in ("ai_sr", "review_sr"):
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(orthanc.instance_file(made[kind].sop_instance_uid))
            checked = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0 and "error" not in checked.stderr.lower(), checked.stderr
    events = AccessEvent.objects.filter(tenant=general, action="dicom.sent", outcome="success")
    assert events.count() == 6
