"""DICOMweb (/dicomweb/): STOW-RS, QIDO-RS and WADO-RS as the hospital's members and nodes see them.

Personas: a clinician and a viewer of hospital A, a clinician of hospital B, a hospital admin, a
service account of A that is a registered DICOM node and one that is not. Instances come in
through STOW-RS itself, so every row here was made by the platform's one DICOM ingest.
"""

from __future__ import annotations

import email
import email.policy
import io
import json

import pydicom
import pytest
from django.test import Client
from PIL import Image as PILImage
from pydicom.data import get_testdata_file
from rest_framework.test import APIClient

from accounts.models import AccessEvent, Role
from accounts.service_accounts import api_key_create, service_account_create
from dicomnet.models import DicomNode, Instance
from tests.conftest import member

pytestmark = pytest.mark.django_db

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
SR = get_testdata_file("test-SR.dcm")
CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_SERIES = "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
CT_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
CT_PATIENT_ID, CT_PATIENT_NAME = "1CT1", "CompressedSamples^CT1"
BOUNDARY = "DICOMwebBoundary42"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
JSON_ACCEPT = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stow_body(*parts: bytes | tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/related body: each part bytes (application/dicom) or (content type, bytes)."""
    out = b""
    for part in parts:
        content_type, data = part if isinstance(part, tuple) else ("application/dicom", part)
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart_parts(response) -> list[tuple[dict, bytes]]:
    """A WADO-RS multipart answer's parts: (headers, bytes)."""
    body = b"".join(response.streaming_content) if response.streaming else response.content
    head = f"Content-Type: {response['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    return [(dict(part.items()), part.get_payload(decode=True)) for part in message.iter_parts()]


def streamed(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def value(dataset: dict, tag: str):
    return dataset.get(tag, {}).get("Value", [None])[0]


# --- personas -----------------------------------------------------------------------------------


def client_of(membership, tenant: str | None = None) -> APIClient:
    client = APIClient()
    client.force_authenticate(membership.user)
    if tenant:
        client.credentials(HTTP_X_TENANT=tenant)
    return client


def key_client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


@pytest.fixture
def node_key(admin_a):
    """The API key of a registered DICOM node's service account (a clinician-role member)."""
    account = service_account_create(actor=admin_a, name="pacs-node", role=Role.CLINICIAN)
    DicomNode.objects.create(
        tenant=admin_a.tenant, name="PACS", ae_title="PACS", host="127.0.0.1", service_account=account
    )
    return api_key_create(actor=admin_a, service_account=account)[1]


@pytest.fixture
def integration_key(admin_a):
    """A clinician-role service account that is no DICOM node (a nightly import, say)."""
    account = service_account_create(actor=admin_a, name="nightly", role=Role.CLINICIAN)
    return api_key_create(actor=admin_a, service_account=account)[1]


def stow(client, *parts, path="/dicomweb/studies", **extra):
    extra.setdefault("HTTP_ACCEPT", JSON_ACCEPT)
    return client.generic("POST", path, stow_body(*parts), content_type=STOW_TYPE, **extra)


@pytest.fixture
def stored(clinician_a):
    """Hospital A holds the CT and the MR study, sent by STOW-RS."""
    response = stow(client_of(clinician_a), read(CT), read(MR))
    assert response.status_code == 200, response.content
    render_all()
    return response.json()


def render_all() -> None:
    """What the worker does after a DICOM image is received: its display copies."""
    from recognition.models import Image
    from recognition.services.images import images_render

    images_render(image_ids=list(Image.objects.values_list("id", flat=True)))


# --- STOW-RS ---------------------------------------------------------------------------------------


def test_stow_stores_each_part_and_answers_the_referenced_sop_sequence(clinician_a):
    response = stow(client_of(clinician_a), read(CT), read(MR))
    assert response.status_code == 200 and response["Content-Type"] == "application/dicom+json"
    body = response.json()
    referenced = body["00081199"]["Value"]
    assert [value(item, "00081155") for item in referenced] == [
        CT_SOP,
        "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457",
    ]
    assert value(referenced[0], "00081190").endswith(
        f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}"
    )
    assert "00081198" not in body  # nothing failed
    assert "00081190" not in body  # two studies: no one study to name
    assert Instance.objects.filter(tenant=clinician_a.tenant).count() == 2


def test_a_bad_part_is_a_failed_sop_and_the_others_are_kept_202(clinician_a):
    response = stow(client_of(clinician_a), b"not a dicom file" * 10, read(CT), ("image/png", b"\x89PNG"))
    assert response.status_code == 202
    body = response.json()
    assert [value(item, "00081155") for item in body["00081199"]["Value"]] == [CT_SOP]
    failed = body["00081198"]["Value"]
    assert len(failed) == 2 and all(value(item, "00081197") for item in failed)
    assert value(body, "00081190").endswith(f"/dicomweb/studies/{CT_STUDY}")


def test_all_parts_failing_is_409_and_an_oversized_part_does_not_lose_the_next(clinician_a, settings):
    settings.SIGHTLINE_MAX_UPLOAD_BYTES = len(read(CT)) + 10
    response = stow(client_of(clinician_a), read(MR) + b"\0" * len(read(CT)), b"garbage")
    assert response.status_code == 409
    reasons = [value(item, "00081197") for item in response.json()["00081198"]["Value"]]
    assert reasons == [0xA700, 0xC000]
    assert stow(client_of(clinician_a), read(MR) + b"\0" * len(read(CT)), read(CT)).status_code == 202


def test_a_study_url_refuses_an_instance_of_another_study(clinician_a):
    response = stow(client_of(clinician_a), read(CT), read(MR), path=f"/dicomweb/studies/{CT_STUDY}")
    assert response.status_code == 202
    body = response.json()
    assert [value(item, "00081197") for item in body["00081198"]["Value"]] == [0xA900]
    assert value(body, "00081190").endswith(f"/dicomweb/studies/{CT_STUDY}")


BOMB_INFLATED = 256 * 1024 * 1024  # a deflated part of about 256 KB on the wire ...
BOMB_LIMIT = 4 * 1024 * 1024  # ... against this upload limit


@pytest.fixture(scope="module")
def bomb() -> bytes:
    from tests.unit.test_dicom_bomb import deflated_bomb

    return deflated_bomb(BOMB_INFLATED)


@pytest.mark.parametrize("path", ["/dicomweb/studies", f"/dicomweb/studies/{CT_STUDY}"])
def test_a_deflated_part_inflating_past_the_limit_fails_alone_in_bounded_memory(clinician_a, settings, bomb, path):
    """Nothing in STOW inflates without the bound: not a look at the part's UIDs before the ingest
    (a study URL's check), not the ingest; the part is A700 (out of resources), the next one kept."""
    import tracemalloc

    settings.SIGHTLINE_MAX_UPLOAD_BYTES = BOMB_LIMIT
    assert len(bomb) < BOMB_LIMIT
    tracemalloc.start()
    try:
        response = stow(client_of(clinician_a), bomb, read(CT), path=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 202, response.content
    body = response.json()
    assert [value(item, "00081197") for item in body["00081198"]["Value"]] == [0xA700]
    assert [value(item, "00081155") for item in body["00081199"]["Value"]] == [CT_SOP]
    assert peak < 16 * BOMB_LIMIT, f"peak memory {peak / 2**20:.0f} MiB"  # never the 256 MB inflated
    assert Instance.objects.filter(tenant=clinician_a.tenant).count() == 1


def test_metadata_reads_a_stored_deflated_original_through_the_bounded_reader(clinician_a, settings, monkeypatch):
    from recognition import dicom

    ds = pydicom.dcmread(CT)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert stow(client_of(clinician_a), out.getvalue()).status_code == 200
    seen = []
    real = dicom.dicom_read
    monkeypatch.setattr(dicom, "dicom_read", lambda source, **kw: seen.append(kw) or real(source, **kw))
    response = client_of(clinician_a).get(f"{INSTANCE}/metadata", HTTP_ACCEPT=JSON_ACCEPT)
    assert response.status_code == 200
    header = json.loads(streamed(response))[0]
    assert value(header, "00080018") == CT_SOP and "7FE00010" not in header
    assert seen == [{"max_bytes": settings.SIGHTLINE_MAX_UPLOAD_BYTES}]


def test_sending_the_same_instance_twice_creates_nothing_twice(clinician_a):
    client = client_of(clinician_a)
    assert stow(client, read(CT)).status_code == 200
    again = stow(client, read(CT))
    assert again.status_code == 200 and value(again.json()["00081199"]["Value"][0], "00081155") == CT_SOP
    assert Instance.objects.filter(tenant=clinician_a.tenant).count() == 1


def test_stow_refuses_what_is_not_multipart_related_dicom(clinician_a):
    client = client_of(clinician_a)
    plain = client.generic("POST", "/dicomweb/studies", read(CT), content_type="application/dicom")
    assert plain.status_code == 415 and plain["Warning"].startswith("299 sightline")
    as_json = client.generic(
        "POST", "/dicomweb/studies", b"[]", content_type='multipart/related; type="application/dicom+json"; boundary=x'
    )
    assert as_json.status_code == 415
    no_boundary = client.generic(
        "POST", "/dicomweb/studies", b"", content_type='multipart/related; type="application/dicom"'
    )
    assert no_boundary.status_code == 400
    truncated = client.generic("POST", "/dicomweb/studies", stow_body(read(CT))[:-40], content_type=STOW_TYPE)
    assert truncated.status_code == 400 and "closing boundary" in truncated.json()["error"]["message"]
    assert stow(client, read(CT), HTTP_ACCEPT="application/dicom+xml").status_code == 406
    assert Instance.objects.count() == 0


def test_a_viewer_may_not_store_and_the_refusal_is_logged(viewer_a):
    response = stow(client_of(viewer_a), read(CT))
    assert response.status_code == 403
    assert Instance.objects.count() == 0
    assert AccessEvent.objects.filter(action="image.upload", outcome=AccessEvent.Outcome.DENIED).exists()


def test_a_browser_session_needs_its_csrf_token_and_a_token_client_does_not(clinician_a, node_key):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(clinician_a.user)
    assert browser.get("/").status_code in (200, 302)
    body = stow_body(read(CT))
    refused = browser.generic("POST", "/dicomweb/studies", body, content_type=STOW_TYPE)
    assert refused.status_code == 403 and Instance.objects.count() == 0
    browser.get("/upload/")  # a page sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    accepted = browser.generic("POST", "/dicomweb/studies", body, content_type=STOW_TYPE, HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 200
    assert stow(key_client(node_key), read(MR)).status_code == 200  # an API key: no CSRF question


def test_without_credentials_it_is_401():
    response = APIClient().get("/dicomweb/studies")
    assert response.status_code == 401 and "WWW-Authenticate" in response


# --- QIDO-RS -------------------------------------------------------------------------------------------


def qido(client, path, **params):
    response = client.get(path, params, HTTP_ACCEPT=JSON_ACCEPT)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/dicom+json"
    return response.json()


def test_qido_finds_studies_by_the_usual_attributes(clinician_a, stored):
    client = client_of(clinician_a)
    everything = qido(client, "/dicomweb/studies")
    assert sorted(value(s, "0020000D") for s in everything) == sorted([CT_STUDY, MR_STUDY])
    ct = next(s for s in everything if value(s, "0020000D") == CT_STUDY)
    assert value(ct, "00080020") == "20040119" and ct["00080061"]["Value"] == ["CT"]
    assert value(ct, "00201206") == 1 and value(ct, "00201208") == 1
    assert value(ct, "00081190").endswith(f"/dicomweb/studies/{CT_STUDY}")
    by = lambda **params: [value(s, "0020000D") for s in qido(client, "/dicomweb/studies", **params)]  # noqa: E731
    assert by(StudyInstanceUID=CT_STUDY) == [CT_STUDY]
    assert by(**{"0020000D": MR_STUDY}) == [MR_STUDY]  # by tag
    assert by(StudyDate="20040101-20040131") == [CT_STUDY]
    assert by(StudyDate="20040801-") == [MR_STUDY]
    assert by(StudyDate="-20031231") == []
    assert by(ModalitiesInStudy="MR") == [MR_STUDY]
    assert by(Modality="CT") == [CT_STUDY]
    assert by(PatientID=CT_PATIENT_ID) == [CT_STUDY]  # matched by its keyed pseudonym
    assert by(PatientID="1CT1-not") == []
    shown = Instance.objects.get(sop_instance_uid=CT_SOP).study.patient_pseudonym  # what the pages show
    assert by(PatientID=shown) == [CT_STUDY]
    assert len(by(limit=1)) == 1 and by(limit=1, offset=1) != by(limit=1)
    assert by(offset=2) == []


# what str.isdigit() takes and int() refuses, or int() takes and a number written in digits is not
NOT_WHOLE_NUMBERS = ["\u00b2", "\u0663", "--5", "1e3", "1.0", " 5", "5 ", "0x10", "1_000", "", "9" * 5000]


def test_numbers_in_a_query_are_digits_or_a_400_in_words(clinician_a, stored):
    client = client_of(clinician_a)
    searches = [("/dicomweb/studies", name) for name in ("limit", "offset")]
    searches += [("/dicomweb/series", "SeriesNumber"), ("/dicomweb/instances", "InstanceNumber")]
    for path, name in searches:
        for bad in NOT_WHOLE_NUMBERS:
            if bad == "" and name not in {"limit", "offset"}:
                continue  # an empty matching value is universal matching (PS3.4 C.2.2.2.3)
            response = client.get(path, {name: bad}, HTTP_ACCEPT=JSON_ACCEPT)
            assert response.status_code == 400, (name, bad[:10], response.content[:200])
            assert "whole number" in response.json()["error"]["message"], (name, bad[:10])
    huge = str(10**11)
    assert client.get("/dicomweb/series", {"SeriesNumber": huge}, HTTP_ACCEPT=JSON_ACCEPT).status_code == 400
    assert client.get("/dicomweb/instances", {"InstanceNumber": f"-{huge}"}, HTTP_ACCEPT=JSON_ACCEPT).status_code == 400
    assert client.get("/dicomweb/studies", {"offset": huge}, HTTP_ACCEPT=JSON_ACCEPT).status_code == 400
    reduced = client.get("/dicomweb/studies", {"limit": huge}, HTTP_ACCEPT=JSON_ACCEPT)
    assert reduced.status_code == 200 and "limit reduced" in reduced["Warning"]
    assert len(qido(client, "/dicomweb/instances", InstanceNumber="1,-3,+1")) == 2  # CT and MR, both number 1
    assert qido(client, "/dicomweb/series", SeriesNumber="0999") == []


def test_a_frame_number_is_digits_and_one_past_the_instance_is_a_404(clinician_a, stored):
    client = client_of(clinician_a)
    for bad in ["\u00b2", "\u0663", "--5", "1e3", "-1", "+1", "9" * 5000]:
        response = client.get(f"{INSTANCE}/frames/{bad}/rendered")
        assert response.status_code == 400, (bad[:10], response.content[:200])
        assert response.json()["error"]["code"] == "bad_frame"
    for past in ["2", str(2**31), str(10**12 - 1), "0" * 30 + "2"]:
        response = client.get(f"{INSTANCE}/frames/{past}/rendered")
        assert response.status_code == 404 and "1 frame(s)" in response.json()["error"]["message"], past
    assert client.get(f"{INSTANCE}/frames/{'0' * 30}1/rendered").status_code == 200


def test_qido_answers_carry_no_patient_name_or_id(clinician_a, stored):
    body = json.dumps(qido(client_of(clinician_a), "/dicomweb/studies", includefield="all"))
    assert CT_PATIENT_ID not in body and "CompressedSamples" not in body
    assert "00100010" not in body and "00100020" not in body


def test_includefield_adds_optional_attributes_and_all_adds_every_one(clinician_a, stored):
    client = client_of(clinician_a)
    plain = qido(client, "/dicomweb/studies", StudyInstanceUID=CT_STUDY)[0]
    assert "00081030" not in plain
    assert (
        "00081030" in qido(client, "/dicomweb/studies", StudyInstanceUID=CT_STUDY, includefield="StudyDescription")[0]
    )
    assert "00081030" in qido(client, "/dicomweb/studies", StudyInstanceUID=CT_STUDY, includefield="00081030")[0]
    assert "00081030" in qido(client, "/dicomweb/studies", StudyInstanceUID=CT_STUDY, includefield="all")[0]


def test_qido_series_and_instances_at_every_level(clinician_a, stored):
    client = client_of(clinician_a)
    series = qido(client, f"/dicomweb/studies/{CT_STUDY}/series")
    assert [value(s, "0020000E") for s in series] == [CT_SERIES] and value(series[0], "00080060") == "CT"
    assert value(series[0], "00201209") == 1
    assert len(qido(client, "/dicomweb/series")) == 2
    assert [value(s, "0020000E") for s in qido(client, "/dicomweb/series", Modality="CT")] == [CT_SERIES]
    assert [value(s, "0020000E") for s in qido(client, "/dicomweb/series", StudyInstanceUID=CT_STUDY)] == [CT_SERIES]
    for path in (
        f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances",
        f"/dicomweb/studies/{CT_STUDY}/instances",
    ):
        instances = qido(client, path)
        assert [value(i, "00080018") for i in instances] == [CT_SOP]
        assert value(instances[0], "00080016") == "1.2.840.10008.5.1.4.1.1.2"
        assert value(instances[0], "00280010") == 128 and value(instances[0], "0020000D") == CT_STUDY
    assert len(qido(client, "/dicomweb/instances")) == 2
    assert [value(i, "00080018") for i in qido(client, "/dicomweb/instances", SOPInstanceUID=CT_SOP)] == [CT_SOP]
    assert qido(client, "/dicomweb/instances", SOPClassUID="1.2.840.10008.5.1.4.1.1.4") != []
    assert [value(i, "00080018") for i in qido(client, "/dicomweb/instances", PatientID=CT_PATIENT_ID)] == [CT_SOP]


def test_qido_says_what_it_ignored_and_refuses_what_is_not_a_query(clinician_a, stored):
    client = client_of(clinician_a)
    ignored = client.get("/dicomweb/studies", {"PatientName": "Compressed*", "fuzzymatching": "true"})
    assert ignored.status_code == 200 and "PatientName" in ignored["Warning"] and "fuzzymatching" in ignored["Warning"]
    for params in (
        {"nonsense": "1"},
        {"limit": "x"},
        {"limit": "0"},
        {"StudyDate": "2004"},
        {"StudyInstanceUID": "1.a"},
    ):
        refused = client.get("/dicomweb/studies", params)
        assert refused.status_code == 400, params
        assert refused.json()["error"]["code"] in {"bad_query", "bad_uid"}
    assert client.get("/dicomweb/studies", HTTP_ACCEPT="application/dicom+xml").status_code == 406
    assert client.get("/dicomweb/studies", {"limit": "5000"})["Warning"].count("limit") == 1


def test_an_object_made_by_sightline_is_listed_and_retrieved_like_any(clinician_a, stored):
    """An SR the platform made is an Instance with origin "created", in the same study."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    ct = Instance.objects.get(sop_instance_uid=CT_SOP)
    sr = pydicom.dcmread(SR)
    key = f"tenants/{clinician_a.tenant_id}/dicom-made/{sr.SOPInstanceUID}.dcm"  # as dicomnet.objects names it
    name = default_storage.save(key, ContentFile(read(SR)))
    Instance.objects.create(
        tenant=clinician_a.tenant,
        study=ct.study,
        series=ct.series,
        sop_instance_uid=str(sr.SOPInstanceUID),
        sop_class_uid=str(sr.SOPClassUID),
        transfer_syntax_uid=str(sr.file_meta.TransferSyntaxUID),
        modality="SR",
        file=name,
        origin=Instance.Origin.CREATED,
        kind="ai_sr",
    )
    client = client_of(clinician_a)
    listed = qido(client, f"/dicomweb/studies/{CT_STUDY}/instances")
    assert {value(i, "00080018") for i in listed} == {CT_SOP, str(sr.SOPInstanceUID)}
    got = client.get(
        f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{sr.SOPInstanceUID}", HTTP_ACCEPT=WADO_ACCEPT
    )
    assert got.status_code == 200 and multipart_parts(got)[0][1] == read(SR)
    rendered = client.get(f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{sr.SOPInstanceUID}/rendered")
    assert rendered.status_code == 406  # an SR has no frame to render


# --- WADO-RS -----------------------------------------------------------------------------------------------

INSTANCE = f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances/{CT_SOP}"


def test_wado_sends_the_stored_original_as_multipart_and_logs_it(clinician_a, stored):
    client = client_of(clinician_a)
    for path in (INSTANCE, f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}", f"/dicomweb/studies/{CT_STUDY}"):
        before = AccessEvent.objects.filter(action="dicomweb.retrieve").count()
        response = client.get(path, HTTP_ACCEPT=WADO_ACCEPT)
        assert response.status_code == 200 and response.streaming
        assert response["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
        parts = multipart_parts(response)
        assert len(parts) == 1
        headers, data = parts[0]
        assert headers["Content-Type"].replace('"', "") == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        original = pydicom.dcmread(io.BytesIO(data))
        assert original.SOPInstanceUID == CT_SOP and str(original.PatientID) == CT_PATIENT_ID  # the hospital's record
        entries = AccessEvent.objects.filter(action="dicomweb.retrieve")
        assert entries.count() == before + 1
        assert entries.latest("id").actor == clinician_a.user


def test_wado_refuses_a_transfer_syntax_it_would_have_to_transcode(clinician_a, stored):
    response = client_of(clinician_a).get(
        INSTANCE, HTTP_ACCEPT='multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    )
    assert response.status_code == 406
    exact = client_of(clinician_a).get(
        INSTANCE, HTTP_ACCEPT='multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    )
    assert exact.status_code == 200
    assert client_of(clinician_a).get(INSTANCE, HTTP_ACCEPT="image/png").status_code == 406


def test_metadata_is_the_header_as_dicom_json_without_pixel_data(clinician_a, stored):
    client = client_of(clinician_a)
    for path in (f"{INSTANCE}/metadata", f"/dicomweb/studies/{CT_STUDY}/metadata"):
        response = client.get(path, HTTP_ACCEPT=JSON_ACCEPT)
        assert response.status_code == 200 and response["Content-Type"] == "application/dicom+json"
        body = json.loads(streamed(response))
        assert len(body) == 1 and value(body[0], "00080018") == CT_SOP
        assert "7FE00010" not in body[0]
        assert value(body[0], "00100010") == {"Alphabetic": CT_PATIENT_NAME}  # the original's header
    assert AccessEvent.objects.filter(action="dicomweb.metadata").count() == 2


def test_rendered_frames_as_png_or_jpeg(clinician_a, stored):
    client = client_of(clinician_a)
    png = client.get(f"{INSTANCE}/rendered")
    assert png.status_code == 200 and png["Content-Type"] == "image/png"
    assert PILImage.open(io.BytesIO(streamed(png))).size == (128, 128)
    jpeg = client.get(f"{INSTANCE}/frames/1/rendered", HTTP_ACCEPT="image/jpeg")
    assert jpeg.status_code == 200 and jpeg["Content-Type"] == "image/jpeg"
    assert streamed(jpeg)[:3] == b"\xff\xd8\xff"
    assert client.get(f"{INSTANCE}/frames/2/rendered").status_code == 404
    assert client.get(f"{INSTANCE}/frames/0/rendered").status_code == 400
    assert client.get(f"{INSTANCE}/rendered", HTTP_ACCEPT="image/gif").status_code == 406
    assert AccessEvent.objects.filter(action="dicomweb.rendered").count() == 2


# --- who sees what --------------------------------------------------------------------------------------

EVERY_UID_ROUTE = [
    f"/dicomweb/studies/{CT_STUDY}",
    f"/dicomweb/studies/{CT_STUDY}/metadata",
    f"/dicomweb/studies/{CT_STUDY}/series",
    f"/dicomweb/studies/{CT_STUDY}/instances",
    f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}",
    f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/metadata",
    f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/instances",
    INSTANCE,
    f"{INSTANCE}/metadata",
    f"{INSTANCE}/rendered",
    f"{INSTANCE}/frames/1/rendered",
]


def test_another_hospitals_uid_is_a_logged_404_on_every_route(clinician_a, clinician_b, stored):
    client = client_of(clinician_b)
    for path in EVERY_UID_ROUTE:
        theirs = client.get(path)
        missing = client.get(path.replace(CT_STUDY, CT_STUDY + "9"))
        assert theirs.status_code == missing.status_code == 404, path
        assert CT_PATIENT_ID.encode() not in theirs.content
    denied = AccessEvent.objects.filter(tenant=clinician_b.tenant, outcome=AccessEvent.Outcome.DENIED)
    assert denied.count() == 2 * len(EVERY_UID_ROUTE)
    assert qido(client, "/dicomweb/studies") == [] and qido(client, "/dicomweb/instances") == []
    # B naming A in X-Tenant is A's 404, as for the API
    assert client_of(clinician_b, tenant=clinician_a.tenant.slug).get("/dicomweb/studies").status_code == 404


def test_b_storing_the_same_study_keeps_two_records_each_hospital_seeing_its_own(clinician_a, clinician_b, stored):
    assert stow(client_of(clinician_b), read(CT)).status_code == 200
    assert len(qido(client_of(clinician_b), "/dicomweb/studies")) == 1
    assert len(qido(client_of(clinician_a), "/dicomweb/studies")) == 2


WADO_ROUTES = [  # every route that opens a stored file: the original, its header, a display copy
    (f"/dicomweb/studies/{CT_STUDY}", WADO_ACCEPT),
    (f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}", WADO_ACCEPT),
    (INSTANCE, WADO_ACCEPT),
    (f"/dicomweb/studies/{CT_STUDY}/metadata", JSON_ACCEPT),
    (f"/dicomweb/studies/{CT_STUDY}/series/{CT_SERIES}/metadata", JSON_ACCEPT),
    (f"{INSTANCE}/metadata", JSON_ACCEPT),
    (f"{INSTANCE}/rendered", "image/png"),
    (f"{INSTANCE}/frames/1/rendered", "image/jpeg"),
]


@pytest.mark.parametrize("foreign", ["theirs", "climbing", "outside"])
def test_a_stored_key_outside_the_instance_s_hospital_is_never_opened_a_logged_404(
    clinician_a, clinician_b, stored, caplog, foreign
):
    """A row pointing at another hospital's file (a bug, a restore gone wrong, a tampered row):
    recognition.storage's key check refuses it before anything is opened."""
    from recognition.models import Image

    assert stow(client_of(clinician_b), read(CT)).status_code == 200
    render_all()
    theirs = Instance.objects.get(tenant=clinician_b.tenant)
    their_image = Image.objects.get(tenant=clinician_b.tenant)
    a = clinician_a.tenant.pk
    keys = {
        "theirs": (theirs.file.name, their_image.file.name),
        "climbing": (f"tenants/{a}/dicom/../../{clinician_b.tenant.pk}/{theirs.file.name.split('/', 2)[2]}",) * 2,
        "outside": ("models/demo/1-abc.zip",) * 2,
    }[foreign]
    Instance.objects.filter(tenant=clinician_a.tenant).update(file=keys[0])
    Image.objects.filter(tenant=clinician_a.tenant).update(file=keys[1])
    their_bytes = theirs.file.open("rb").read()
    client = client_of(clinician_a)
    for path, accept in WADO_ROUTES:
        with caplog.at_level("ERROR", logger="dicomnet.dicomweb.views"):
            response = client.get(path, HTTP_ACCEPT=accept)
            body = streamed(response)
        assert response.status_code == 404, (path, body[:200])
        assert their_bytes[200:264] not in body and CT_PATIENT_ID.encode() not in body
    refused = [r for r in caplog.records if "outside its hospital's storage" in r.getMessage()]
    assert len(refused) == len(WADO_ROUTES)
    assert all(keys[0] not in r.getMessage() and CT_PATIENT_ID not in r.getMessage() for r in refused)
    denied = AccessEvent.objects.filter(tenant=clinician_a.tenant, outcome=AccessEvent.Outcome.DENIED)
    assert denied.count() == len(WADO_ROUTES)
    assert not AccessEvent.objects.filter(
        tenant=clinician_a.tenant,
        outcome=AccessEvent.Outcome.SUCCESS,
        action__in=["dicomweb.retrieve", "dicomweb.metadata", "dicomweb.rendered"],
    ).exists()


def test_originals_go_to_reading_roles_and_registered_nodes_only(viewer_a, admin_a, node_key, integration_key, stored):
    assert client_of(viewer_a).get(INSTANCE, HTTP_ACCEPT=WADO_ACCEPT).status_code == 200
    assert key_client(node_key).get(INSTANCE, HTTP_ACCEPT=WADO_ACCEPT).status_code == 200
    assert key_client(node_key).get(f"{INSTANCE}/metadata").status_code == 200
    for path in (INSTANCE, f"{INSTANCE}/metadata"):
        refused = key_client(integration_key).get(path, HTTP_ACCEPT=WADO_ACCEPT)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "originals_refused"
    # what is pseudonymous stays open to it: the search and the display copies
    assert key_client(integration_key).get("/dicomweb/studies").status_code == 200
    assert key_client(integration_key).get(f"{INSTANCE}/rendered").status_code == 200
    assert AccessEvent.objects.filter(action="dicomweb.originals", outcome=AccessEvent.Outcome.DENIED).count() == 2
    # a hospital admin's role does not read images at all
    assert client_of(admin_a).get("/dicomweb/studies").status_code == 403
    assert client_of(admin_a).get(INSTANCE).status_code == 403


def test_a_deactivated_node_loses_the_originals(node_key, stored):
    DicomNode.objects.update(is_active=False)
    assert key_client(node_key).get(INSTANCE, HTTP_ACCEPT=WADO_ACCEPT).status_code == 403


def test_an_unknown_dicomweb_path_is_a_404_in_the_same_shape(clinician_a):
    response = client_of(clinician_a).get("/dicomweb/workitems")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_dicomweb_is_not_in_the_api_contract():
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    assert schema["paths"] and not [path for path in schema["paths"] if "dicomweb" in path]


def test_a_body_over_the_request_limit_is_a_413_and_stores_nothing(clinician_a, settings):
    settings.SIGHTLINE_MAX_REQUEST_BYTES = len(read(CT)) // 2
    response = stow(client_of(clinician_a), read(CT))
    assert response.status_code == 413 and Instance.objects.count() == 0
