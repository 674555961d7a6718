"""The C-STORE SCP as a process of its own (``manage.py dicom_scp``) beside the e2e stack (web,
worker, Redis), with real, unchanged peers: DCMTK's echoscu and storescu, and Orthanc playing the
hospital's PACS (C-STORE from its REST API)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from accounts.models import AccessEvent
from dicomnet.models import Instance
from recognition.models import Image, InferenceRequest, Series, Study
from tests.e2e import dicom_fixtures
from tests.e2e.dicom_fixtures import ADDRESS, HOSPITAL_AE, NODE_AE, REJECTIONS_PER_WINDOW, clear_rejections
from tests.peers import dcmtk, orthanc_running

dicom_scp = dicom_fixtures.dicom_scp  # the fixtures this module uses
dicom_hospital = dicom_fixtures.dicom_hospital

# Orthanc and DCMTK, and a process on the stack's database: once, in CI's SQLite pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm")


def echoscu(scp, *, calling: str = NODE_AE, called: str = HOSPITAL_AE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, ADDRESS, str(scp.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def storescu(scp, files: list[Path], *, calling: str = NODE_AE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", HOSPITAL_AE, ADDRESS, str(scp.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def generated_series(directory: Path, count: int = 5) -> list[Path]:
    """A CT series of ``count`` instances: CT_small's pixels, new UIDs, one study."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for number in range(1, count + 1):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 7
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.AccessionNumber = "ACC-GEN-1"
        path = directory / f"ct-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def rows() -> tuple[int, int, int, int]:
    return (Study.objects.count(), Series.objects.count(), Image.objects.count(), Instance.objects.count())


def wait_for_reads(deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not InferenceRequest.objects.filter(status__in=("queued", "running")).exists():
            return
        time.sleep(0.5)
    raise AssertionError("the worker did not read the received images in time")


def test_echoscu_from_a_registered_node_is_answered(dicom_scp, dicom_hospital):
    answer = echoscu(dicom_scp)
    assert answer.returncode == 0, answer.stdout + answer.stderr


def test_an_unknown_calling_or_called_ae_title_is_rejected(dicom_scp, dicom_hospital):
    calling = echoscu(dicom_scp, calling="INTRUDER")
    assert calling.returncode != 0 and "Calling AE Title Not Recognized" in calling.stdout + calling.stderr
    called = echoscu(dicom_scp, called="NOT_A_HOSPITAL")
    assert called.returncode != 0 and "Called AE Title Not Recognized" in called.stdout + called.stderr
    entries = AccessEvent.objects.filter(action="dicom.association_rejected").order_by("pk")
    assert [(e.tenant_id, e.actor_label) for e in entries] == [
        (dicom_hospital["tenant"].pk, "dicom:INTRUDER"),
        (None, f"dicom:{NODE_AE}"),  # no hospital named: the platform's chain
    ]
    assert all(e.outcome == "denied" and e.ip_address == ADDRESS for e in entries)
    assert "INTRUDER" in dicom_scp.log_text()


def test_storescu_sends_samples_and_a_series_which_reach_the_worklist_and_are_read(
    dicom_scp, dicom_hospital, live_demo, stack, tmp_path
):
    files = [Path(get_testdata_file(name)) for name in SAMPLES] + generated_series(tmp_path / "series")

    sent = storescu(dicom_scp, files)

    assert sent.returncode == 0, sent.stdout + sent.stderr
    tenant = dicom_hospital["tenant"]
    instances = Instance.objects.for_tenant(tenant)
    assert instances.count() == 8
    assert set(instances.values_list("received_from", flat=True)) == {dicom_hospital["node"].pk}
    sr = instances.get(frames=0)
    assert sr.sop_class_uid == pydicom.dcmread(get_testdata_file("test-SR.dcm")).SOPClassUID
    # CT_small, MR_small, the SR's and the generated one: four studies; the series is one series
    assert Study.objects.for_tenant(tenant).count() == 4
    generated = Study.objects.for_tenant(tenant).get(accession_number="ACC-GEN-1")
    assert generated.series.count() == 1 and generated.images.count() == 5
    assert Image.objects.for_tenant(tenant).count() == 7  # the SR is kept and listed, not read
    assert InferenceRequest.objects.filter(image__tenant=tenant).count() == 7
    # a node not marked interactive: its reads wait on the bulk lane, behind the clinicians' uploads
    assert set(InferenceRequest.objects.filter(image__tenant=tenant).values_list("priority", flat=True)) == {
        InferenceRequest.Priority.BULK
    }
    wait_for_reads()
    assert InferenceRequest.objects.filter(image__tenant=tenant, status="done").count() == 7

    access = requests.post(
        f"{stack.base_url}/api/v1/auth/token/",
        json={"username": "clinician", "password": live_demo["password"]},
        timeout=10,
    )
    assert access.status_code == 200, access.text
    headers = {"Authorization": f"Bearer {access.json()['access']}"}
    worklist = requests.get(f"{stack.base_url}/api/v1/studies/", headers=headers, timeout=10).json()
    listed = worklist["results"] if isinstance(worklist, dict) else worklist
    assert generated.pk in {study["id"] for study in listed}

    before = rows()
    again = storescu(dicom_scp, files)  # the PACS sends it all again
    assert again.returncode == 0, again.stdout + again.stderr
    assert rows() == before


def test_repeated_rejections_from_one_address_are_throttled(dicom_scp, dicom_hospital, stack):
    for _ in range(REJECTIONS_PER_WINDOW):
        assert echoscu(dicom_scp, calling="PROBE").returncode != 0
    throttled = echoscu(dicom_scp)  # even the registered node, from that address, waits out the window
    assert throttled.returncode != 0 and "Transient" in throttled.stdout + throttled.stderr
    assert AccessEvent.objects.filter(action="dicom.association_throttled").count() == 1
    assert AccessEvent.objects.filter(action="dicom.association_rejected").count() == REJECTIONS_PER_WINDOW
    clear_rejections(stack)
    assert echoscu(dicom_scp).returncode == 0


def test_orthanc_sends_a_study_to_the_scp(dicom_scp, dicom_hospital, tmp_path):
    from dicomnet.nodes import dicom_node_create

    orthanc_node = dicom_node_create(
        actor=dicom_hospital["admin"], name="Orthanc PACS", ae_title="ORTHANC", host=ADDRESS
    )
    files = generated_series(tmp_path / "series", count=4)
    with orthanc_running(
        tmp_path / "orthanc", modalities={"SIGHTLINE": [HOSPITAL_AE, ADDRESS, dicom_scp.port]}
    ) as pacs:
        studies = {pacs.upload(path.read_bytes())["ParentStudy"] for path in files}
        assert len(studies) == 1
        answer = pacs.store_to("SIGHTLINE", sorted(studies))
        assert answer.get("FailedInstancesCount", 0) == 0, answer

    instances = Instance.objects.for_tenant(dicom_hospital["tenant"])
    assert instances.count() == 4 and set(instances.values_list("received_from", flat=True)) == {orthanc_node.pk}
    sent = {pydicom.dcmread(path).SOPInstanceUID for path in files}
    assert set(instances.values_list("sop_instance_uid", flat=True)) == sent
    assert Study.objects.for_tenant(dicom_hospital["tenant"]).count() == 1
