"""dicomnet.ingest.instance_receive: the one ingest of a DICOM instance (C-STORE and STOW-RS)."""

import io
import zlib

import pydicom
import pytest
from django.core.files.storage import default_storage
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from accounts.models import AccessEvent
from dicomnet import ingest
from dicomnet.ingest import instance_receive
from dicomnet.models import Instance
from recognition.models import Image, InferenceRequest, Series, Study

pytestmark = pytest.mark.django_db(transaction=True)


def sample(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def as_bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def ct(**changes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    return as_bytes(ds)


def stored_files(tenant) -> set[str]:
    try:
        _, files = default_storage.listdir(f"tenants/{tenant.pk}/dicom")
    except FileNotFoundError:
        return set()
    return set(files)


def test_an_image_instance_becomes_study_series_image_and_instance_with_its_read_queued(clinician_a, demo_model):
    data = sample("CT_small.dcm")

    received = instance_receive(membership=clinician_a, data=data)

    assert received.status == "stored" and received.dimse_status == 0x0000 and received.http_status == 200
    instance = received.instance
    source = pydicom.dcmread(io.BytesIO(data))
    assert instance.sop_instance_uid == source.SOPInstanceUID
    assert instance.sop_class_uid == source.SOPClassUID
    assert instance.transfer_syntax_uid == source.file_meta.TransferSyntaxUID
    assert (instance.frames, instance.rows, instance.columns, instance.modality) == (1, 128, 128, "CT")
    assert instance.byte_size == len(data) and instance.origin == "received"
    (image,) = received.images
    assert image.original.name == instance.file.name
    assert instance.study_id == image.study_id and instance.series_id == image.series_id
    assert instance.study.study_instance_uid == source.StudyInstanceUID
    assert InferenceRequest.objects.filter(image=image).exists()
    # the patient is a pseudonym on the rows; the file keeps the hospital's identifiers
    assert source.PatientID not in instance.study.patient_pseudonym
    actions = set(AccessEvent.objects.filter(tenant=clinician_a.tenant).values_list("action", flat=True))
    assert {"image.upload", "dicom.instance_received"} <= actions


def test_a_second_copy_creates_nothing(clinician_a, demo_model):
    data = sample("MR_small.dcm")
    first = instance_receive(membership=clinician_a, data=data)
    files = stored_files(clinician_a.tenant)

    again = instance_receive(membership=clinician_a, data=data)

    assert again.status == "duplicate" and again.dimse_status == 0x0000 and again.http_status == 200
    assert again.instance == first.instance and [i.pk for i in again.images] == [i.pk for i in first.images]
    assert Instance.objects.count() == 1 and Image.objects.count() == 1 and Study.objects.count() == 1
    assert stored_files(clinician_a.tenant) == files
    entry = AccessEvent.objects.get(action="dicom.instance_duplicate")
    assert entry.actor == clinician_a.user and entry.target_id == str(first.instance.pk)


def test_an_instance_stored_concurrently_is_a_duplicate_with_no_half_rows(clinician_a, demo_model, monkeypatch):
    data = sample("CT_small.dcm")
    first = instance_receive(membership=clinician_a, data=data)
    # the other association's row is not there yet when this one looks, then wins the constraint
    looks = iter([None])
    real = ingest._existing
    monkeypatch.setattr(ingest, "_existing", lambda tenant, uid: next(looks, None) or real(tenant, uid))
    files = stored_files(clinician_a.tenant)

    again = instance_receive(membership=clinician_a, data=data)

    assert again.status == "duplicate" and again.instance == first.instance
    assert Image.objects.count() == 1 and Instance.objects.count() == 1
    assert stored_files(clinician_a.tenant) == files  # the losing try's file was removed


def test_a_structured_report_is_kept_and_listed_not_read(clinician_a, demo_model):
    data = sample("test-SR.dcm")
    source = pydicom.dcmread(io.BytesIO(data))

    received = instance_receive(membership=clinician_a, data=data)

    assert received.status == "stored" and received.images == []
    instance = received.instance
    assert instance.frames == 0 and instance.sop_class_uid == source.SOPClassUID
    assert instance.study.study_instance_uid == source.StudyInstanceUID
    assert instance.series.series_instance_uid == source.SeriesInstanceUID
    with instance.file.open("rb") as stored:
        kept = stored.read()
    assert kept[:128] == bytes(128) and kept[128:] == data[128:]
    assert not InferenceRequest.objects.exists() and not Image.objects.exists()
    assert AccessEvent.objects.filter(
        tenant=clinician_a.tenant, action="dicom.instance_received", target_id=str(instance.pk)
    ).exists()


def test_an_sr_of_a_study_already_held_joins_it(clinician_a, demo_model):
    image = instance_receive(membership=clinician_a, data=sample("CT_small.dcm")).instance
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    sr.StudyInstanceUID, sr.PatientID = (
        image.study.study_instance_uid,
        pydicom.dcmread(get_testdata_file("CT_small.dcm")).PatientID,
    )

    received = instance_receive(membership=clinician_a, data=as_bytes(sr))

    assert received.instance.study_id == image.study_id and Study.objects.count() == 1
    assert Series.objects.filter(study=image.study).count() == 2


def test_a_deflated_instance_is_inflated_within_the_limit(clinician_a, demo_model, settings):
    data = sample("image_dfl.dcm")
    received = instance_receive(membership=clinician_a, data=data)
    assert received.status == "stored", received.reason
    assert received.instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def deflated(ds: pydicom.Dataset) -> bytes:
    """A Part 10 file in the Deflated Explicit VR Little Endian syntax, written by hand."""
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=False)
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(compressor.compress(raw.getvalue()) + compressor.flush())
    return out.getvalue()


def test_a_deflate_bomb_is_refused_out_of_resources(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_UPLOAD_BYTES = 2 * 1024 * 1024
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)  # 32 MB of zeros: a few kB deflated
    data = deflated(ds)
    assert len(data) < 1024 * 1024

    received = instance_receive(membership=clinician_a, data=data)

    assert received.status == "refused" and received.dimse_status == 0xA700 and received.http_status == 413
    assert "larger than" in received.reason
    assert not Instance.objects.exists() and not Study.objects.exists()


def test_a_damaged_file_is_refused_cannot_understand(clinician_a, demo_model):
    received = instance_receive(membership=clinician_a, data=bytes(128) + b"DICM" + b"\x02\x00garbage")
    assert received.status == "refused" and received.dimse_status == 0xC000 and received.http_status == 422
    assert not Instance.objects.exists()
    not_dicom = instance_receive(membership=clinician_a, data=b"hello")
    assert not_dicom.status == "refused" and not_dicom.http_status == 422


def test_a_dataset_sent_as_another_sop_class_is_refused(clinician_a, demo_model):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, but the dataset says CT
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    received = instance_receive(membership=clinician_a, data=out.getvalue())
    assert received.status == "refused" and received.dimse_status == 0xA900


def test_a_viewer_may_not_store(viewer_a, demo_model):
    received = instance_receive(membership=viewer_a, data=sample("CT_small.dcm"))
    assert received.status == "refused" and received.dimse_status == 0x0124 and received.http_status == 403
    assert not Instance.objects.exists()


def test_hospitals_hold_the_same_instance_apart(clinician_a, clinician_b, demo_model):
    data = sample("CT_small.dcm")
    a = instance_receive(membership=clinician_a, data=data)
    b = instance_receive(membership=clinician_b, data=data)

    assert a.status == b.status == "stored"
    assert a.instance.tenant_id != b.instance.tenant_id and a.instance.study_id != b.instance.study_id
    assert a.instance.study.patient_pseudonym != b.instance.study.patient_pseudonym
    assert Instance.objects.for_tenant(clinician_b.tenant).get() == b.instance


def test_a_bare_dataset_with_its_transfer_syntax_is_received(clinician_a, demo_model):
    data = sample("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    body = data[data.index(b"DICM") + 4 :]
    meta_len = int.from_bytes(body[8:12], "little") + 12  # (0002,0000) group length element
    received = instance_receive(
        membership=clinician_a, data=body[meta_len:], transfer_syntax=ds.file_meta.TransferSyntaxUID
    )
    assert received.status == "stored", received.reason


def test_a_series_of_generated_instances_is_one_series(clinician_a, demo_model):
    series_uid = generate_uid()
    for number in range(3):
        instance_receive(
            membership=clinician_a,
            data=ct(SOPInstanceUID=generate_uid(), SeriesInstanceUID=series_uid, InstanceNumber=number + 1),
        )
    assert Instance.objects.count() == 3 and Series.objects.filter(series_instance_uid=series_uid).count() == 1


def test_an_image_no_decoder_reads_is_kept_unprocessable_and_listed(clinician_a, demo_model):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: nothing here decodes it
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)

    received = instance_receive(membership=clinician_a, data=out.getvalue())

    assert received.status == "stored" and received.http_status == 202 and received.dimse_status == 0x0000
    assert "cannot decode" in received.reason
    (image,) = received.images
    assert image.state == Image.State.FAILED and image.original.name == received.instance.file.name
    assert received.instance.transfer_syntax_uid == "1.2.840.10008.1.2.4.100"
    again = instance_receive(membership=clinician_a, data=out.getvalue())
    assert again.status == "duplicate" and [i.pk for i in again.images] == [image.pk]


def _node(tenant, **changes):
    from accounts.models import Role
    from dicomnet.nodes import dicom_node_create
    from tests.conftest import member

    admin = member(tenant, "admin-a", Role.TENANT_ADMIN)
    return admin, dicom_node_create(actor=admin, name="CT", ae_title="CT2", host="127.0.0.1", **changes)


def test_a_nodes_instances_are_read_on_the_bulk_lane_unless_it_is_marked_interactive(hospital_a, demo_model):
    from dicomnet.nodes import dicom_node_interactive_set
    from recognition.services import images

    admin, node = _node(hospital_a)
    assert not node.service_account.interactive
    received = instance_receive(membership=node.service_account.membership, data=sample("CT_small.dcm"), node=node)
    (image,) = received.images
    assert InferenceRequest.objects.get(image=image).priority == InferenceRequest.Priority.BULK
    assert images._deferred_read_priority(image) == InferenceRequest.Priority.BULK  # a read queued after rendering

    dicom_node_interactive_set(actor=admin, node=node, interactive=True)
    assert AccessEvent.objects.filter(action="dicom.node_interactive", target_id=str(node.pk)).exists()
    node.refresh_from_db()
    received = instance_receive(membership=node.service_account.membership, data=sample("MR_small.dcm"), node=node)
    (image,) = received.images
    assert InferenceRequest.objects.get(image=image).priority == InferenceRequest.Priority.INTERACTIVE
    assert images._deferred_read_priority(image) == InferenceRequest.Priority.INTERACTIVE


def test_a_person_storing_an_instance_is_read_interactively(clinician_a, demo_model):
    (image,) = instance_receive(membership=clinician_a, data=sample("CT_small.dcm")).images
    assert InferenceRequest.objects.get(image=image).priority == InferenceRequest.Priority.INTERACTIVE


def test_an_instance_of_another_study_under_a_known_accession_number_is_refused(clinician_a, demo_model):
    first = instance_receive(membership=clinician_a, data=ct(AccessionNumber="ACC-1", StudyInstanceUID="1.2.3.1"))
    assert first.status == "stored"
    files = stored_files(clinician_a.tenant)

    other = instance_receive(
        membership=clinician_a,
        data=ct(AccessionNumber="ACC-1", StudyInstanceUID="1.2.3.2", SOPInstanceUID="1.2.3.2.1"),
    )

    assert other.status == "refused" and other.code == "accession_study_mismatch"
    assert other.dimse_status == 0xC000 and other.http_status == 409 and "another study" in other.reason
    assert Study.objects.count() == 1 and Instance.objects.count() == 1 and Image.objects.count() == 1
    assert Study.objects.get().study_instance_uid == "1.2.3.1"
    assert stored_files(clinician_a.tenant) == files
    # the same study's next instance is filed with it
    same = instance_receive(
        membership=clinician_a,
        data=ct(AccessionNumber="ACC-1", StudyInstanceUID="1.2.3.1", SOPInstanceUID="1.2.3.1.2"),
    )
    assert same.status == "stored" and same.instance.study == first.instance.study


def test_an_uploaded_dicom_has_its_instance_and_is_one_copy_with_every_way_in(clinician_a, demo_model):
    from tests.conftest import api_client_for

    data = ct(SOPInstanceUID="1.2.3.9.1")
    client = api_client_for(clinician_a)
    response = client.post("/api/v1/images/", {"file": io.BytesIO(data)}, format="multipart")
    assert response.status_code == 201, response.content
    instance = Instance.objects.get()  # DICOMweb lists it like a received one
    image = Image.objects.get()
    assert instance.sop_instance_uid == "1.2.3.9.1" and instance.file.name == image.original.name
    assert instance.study == image.study and instance.series == image.series and instance.received_from is None
    assert (
        instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and instance.frames == 1 and instance.transfer_syntax_uid
    )

    again = instance_receive(membership=clinician_a, data=data)  # the same instance by C-STORE / STOW-RS
    assert again.status == "duplicate" and again.instance == instance and again.images == [image]
    second = client.post("/api/v1/images/", {"file": io.BytesIO(data)}, format="multipart")
    assert second.status_code == 409 and second.json()["error"]["code"] == "duplicate_instance"
    assert Image.objects.count() == 1 and Instance.objects.count() == 1


def test_an_upload_racing_another_copy_of_its_instance_is_a_409_not_a_500(clinician_a, demo_model, monkeypatch):
    from recognition.services import images
    from tests.conftest import api_client_for

    data = ct(SOPInstanceUID="1.2.3.9.2")
    assert instance_receive(membership=clinician_a, data=data).status == "stored"
    files = stored_files(clinician_a.tenant)
    real, calls = images._instance_unheld, []

    def late(tenant, uid):  # the other copy's row is not there yet when this upload first looks
        calls.append(uid)
        if len(calls) > 1:
            real(tenant, uid)

    monkeypatch.setattr(images, "_instance_unheld", late)
    response = api_client_for(clinician_a).post("/api/v1/images/", {"file": io.BytesIO(data)}, format="multipart")
    assert response.status_code == 409 and response.json()["error"]["code"] == "duplicate_instance"
    assert Image.objects.count() == 1 and Instance.objects.count() == 1
    assert stored_files(clinician_a.tenant) == files
    assert len(calls) == 2  # it looked, lost the constraint, and looked again
