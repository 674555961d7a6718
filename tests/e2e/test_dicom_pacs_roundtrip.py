"""Issue 15's round trip, all of it real: Orthanc (the hospital's PACS) C-STOREs a CT study to the
platform's SCP (``manage.py dicom_scp``, a process beside the e2e stack); the study reaches the
clinician's worklist in headless Chromium and gets its AI finding from the real Celery worker; the
clinician opens it, agrees and signs off in the browser; the sign-off sends the AI SR, the review SR
and the heatmap (a Secondary Capture) back to Orthanc over C-STORE and over STOW-RS, and Orthanc
files all three in the original study. Run in a pytest process of its own (``-m browser``)."""

from __future__ import annotations

import io
import re
import subprocess

import highdicom as hd
import pytest
from playwright.sync_api import expect
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage

from accounts.models import AccessEvent
from dicomnet.destinations import DestinationFields, destination_create
from dicomnet.models import Delivery, Instance
from dicomnet.nodes import dicom_node_create
from recognition.models import Result, Study
from tests.e2e import dicom_fixtures
from tests.e2e.dicom_fixtures import ADDRESS, HOSPITAL_AE
from tests.e2e.test_dicom_sending_live import statuses, wait_for
from tests.e2e.test_workspace_browser import LABELS, READ_SECONDS, row, shown, sign_in
from tests.peers import ORTHANC_AE_TITLE, dcmtk, orthanc_running
from tests.unit.test_dicom import ct_dataset, to_bytes

dicom_scp = dicom_fixtures.dicom_scp  # the fixtures this module uses
dicom_hospital = dicom_fixtures.dicom_hospital

# Orthanc, DCMTK and the SCP on the stack's database: once, in CI's SQLite pass; a browser: -m browser
pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.heavy_any_db]

ACCESSION = "RT-PACS-1"
KINDS = ("ai_sr", "map", "review_sr")
DESTINATIONS = ("pacs-dimse", "pacs-stow")


def dsrdump(path) -> str:
    """DCMTK's reading of an SR: it must parse it without a complaint."""
    checked = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    return checked.stdout


def referenced_uids(sequence) -> set[str]:
    return {
        item.ReferencedSOPInstanceUID
        for study in sequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def test_a_study_from_orthanc_is_read_signed_off_in_the_browser_and_its_objects_are_back_in_orthanc(
    stack, live_demo, dicom_scp, dicom_hospital, browser_context, tmp_path
):
    admin = dicom_hospital["admin"]
    orthanc_node = dicom_node_create(actor=admin, name="Orthanc PACS", ae_title=ORTHANC_AE_TITLE, host=ADDRESS)
    source = ct_dataset(AccessionNumber=ACCESSION, StudyDate="20261201", SeriesNumber=3, InstanceNumber=1)

    with orthanc_running(tmp_path / "pacs", modalities={"SIGHTLINE": [HOSPITAL_AE, ADDRESS, dicom_scp.port]}) as pacs:
        # the PACS is both where the study comes from and where the findings go, both ways
        destination_create(
            actor=admin,
            fields=DestinationFields(
                name="pacs-dimse", kind="dimse", host=ADDRESS, port=pacs.dicom_port, ae_title=ORTHANC_AE_TITLE,
                send_on="signoff",
            ),
        )  # fmt: skip
        destination_create(
            actor=admin,
            fields=DestinationFields(
                name="pacs-stow", kind="stow", url=f"{pacs.dicomweb_url}/studies", send_on="signoff"
            ),
        )
        orthanc_study = pacs.upload(to_bytes(source))["ParentStudy"]

        # the clinician's worklist is open, and empty, before the study is sent
        page = sign_in(browser_context, stack, "clinician", live_demo["password"])
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
        expect(page.locator("#worklist tbody tr[data-study]")).to_have_count(0)

        answer = pacs.store_to("SIGHTLINE", [orthanc_study])
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        received = Instance.objects.for_tenant(dicom_hospital["tenant"]).get(origin="received")
        assert received.sop_instance_uid == source.SOPInstanceUID and received.received_from == orthanc_node
        study = Study.objects.for_tenant(dicom_hospital["tenant"]).get(accession_number=ACCESSION)

        # the worklist says a study came in; shown, it gets its AI finding without a reload
        expect(page.locator("#worklist-new")).to_be_visible(timeout=READ_SECONDS * 1000)
        page.reload()
        study_row = row(page, study.pk)
        expect(study_row).to_have_count(1)
        expect(study_row.locator("[data-role=status]")).to_have_text(shown("done"), timeout=READ_SECONDS * 1000)
        expect(study_row.locator("[data-role=finding]")).to_contain_text(re.compile("|".join(LABELS)))
        expect(study_row.locator("[data-role=review]")).to_have_text(shown("unreviewed"))
        assert Delivery.objects.count() == 0  # both destinations send only after the sign-off
        assert len(pacs.get("/instances")) == 1

        # opened from its row, agreed with and signed off
        study_row.locator("a").click()
        expect(page).to_have_url(re.compile(rf"{re.escape(stack.base_url)}/images/\d+/$"))
        expect(page.locator("figure#viewer")).to_have_attribute("data-ready", "1")
        form = page.locator(".review-form")
        form.get_by_label("Agree", exact=True).check()
        form.locator("button[name=action][value=sign_off]").click()
        expect(page.locator(".messages")).to_contain_text("Review signed off")

        # the AI SR, its map and the sign-off's SR, each to both destinations
        everything = {(kind, name): "sent" for kind in KINDS for name in DESTINATIONS}
        wait_for("the three objects sent to both destinations", lambda: statuses() == everything, READ_SECONDS)
        page.reload()
        panel = page.locator("#deliveries")
        expect(panel.locator("h2")).to_have_text("Sent to PACS")
        expect(panel.locator("tr[data-delivery]")).to_have_count(len(everything))
        for kind in KINDS:
            expect(panel.locator(f'tr[data-kind="{kind}"]')).to_have_count(len(DESTINATIONS))
        for status in panel.locator("tr[data-delivery] [data-role=status] .badge").all():
            expect(status).to_have_text(shown("sent"))

        # Orthanc holds them, once each, in the original's study
        made = {i.kind: i for i in Instance.objects.for_tenant(dicom_hospital["tenant"]).filter(origin="created")}
        assert set(made) == set(KINDS)

        def held_by_orthanc():
            held = {i["SOPInstanceUID"]: i for i in pacs.instances()}
            return held if len(held) == 4 else None

        held = wait_for("Orthanc to hold the original and the three objects", held_by_orthanc, READ_SECONDS)
        assert set(held) == {source.SOPInstanceUID} | {i.sop_instance_uid for i in made.values()}
        assert {i["StudyInstanceUID"] for i in held.values()} == {source.StudyInstanceUID}
        assert pacs.get("/studies") == [orthanc_study]
        files = {kind: pacs.instance_file(made[kind].sop_instance_uid) for kind in KINDS}
        ai, verdict, heatmap = (dcmread(io.BytesIO(files[kind])) for kind in ("ai_sr", "review_sr", "map"))
        assert heatmap.SOPClassUID == SecondaryCaptureImageStorage
        assert heatmap.SamplesPerPixel == 3

        # the SRs: highdicom and DCMTK read them; what they say and what they refer to
        result = Result.objects.select_related("model_version__model").get(image__study=study)
        version = result.model_version
        ai_report = hd.sr.srread(io.BytesIO(files["ai_sr"]))
        verdict_report = hd.sr.srread(io.BytesIO(files["review_sr"]))
        assert isinstance(ai_report, hd.sr.Comprehensive3DSR) and isinstance(verdict_report, hd.sr.Comprehensive3DSR)
        assert (ai.VerificationFlag, verdict.VerificationFlag) == ("UNVERIFIED", "VERIFIED")
        assert version.version in str(ai.SoftwareVersions) and version.model.name in str(ai.SoftwareVersions)
        assert referenced_uids(ai.CurrentRequestedProcedureEvidenceSequence) == {source.SOPInstanceUID}
        assert referenced_uids(verdict.PredecessorDocumentsSequence) == {ai.SOPInstanceUID}
        for kind in ("ai_sr", "review_sr"):
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(files[kind])
            dumped = dsrdump(path)
            if kind == "ai_sr":
                assert version.version in dumped and result.top_label in dumped

    # the access log: the study received as the Orthanc node, each object's sending a disclosure
    received_events = AccessEvent.objects.filter(tenant=dicom_hospital["tenant"], action="dicom.instance_received")
    assert [(e.actor, e.outcome) for e in received_events] == [(orthanc_node.service_account.user, "success")]
    sent = AccessEvent.objects.filter(tenant=dicom_hospital["tenant"], action="dicom.sent", outcome="success")
    assert sent.count() == len(everything)
