"""The DICOM objects Sightline makes of a finding (dicomnet/objects.py), checked by highdicom and by
DCMTK's dsrdump and dcmdump, unchanged: the AI SR (TID 1500), the clinician's review SR that
settles it, an amendment, and the heatmap as a Secondary Capture; each in the source's study,
with its Patient and Study modules, made once."""

from __future__ import annotations

import io
import logging
import subprocess
import threading
import traceback
import warnings

import highdicom as hd
import pydicom
import pytest
from django.db import connection
from pydicom.data import get_testdata_file

from accounts.models import AccessEvent
from core.errors import Unprocessable
from dicomnet.models import Instance
from dicomnet.objects import (
    AI_NOTICE,
    NotDicomSource,
    NotSignedOff,
    ai_report_for,
    heatmap_object_for,
    review_report_for,
)
from recognition.models import ModelVersion, Result, Series
from recognition.services.images import image_upload, images_upload
from recognition.services.reviews import review_save
from tests.conftest import png_bytes, upload_file
from tests.peers import dcmtk
from workers.heatmaps import heatmap_compute
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


def multi_frame(frames: int = 3) -> bytes:
    """pydicom's MR_small as a multi-frame secondary capture of ``frames`` frames (the wheel has no
    plain multi-frame image big enough to read)."""
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # word SC
    dataset.NumberOfFrames = frames
    dataset.PixelData = dataset.PixelData * frames
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_dicom(membership, name="CT_small.dcm"):
    if name == "multi-frame":
        data = multi_frame()
    else:
        with open(get_testdata_file(name), "rb") as handle:
            data = handle.read()
    images = images_upload(membership=membership, upload=upload_file(data, "scan.dcm"))
    for image in images:
        inference_run(request_id=image.inference_requests.get().pk)
        image.refresh_from_db()
    return images[0], pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def stored(instance: Instance) -> pydicom.Dataset:
    with instance.file.open("rb") as handle:
        return pydicom.dcmread(handle)


def dump(instance: Instance, tmp_path, tool="dsrdump", *args) -> str:
    path = tmp_path / f"{instance.sop_instance_uid}.dcm"
    with instance.file.open("rb") as handle:
        path.write_bytes(handle.read())
    run = subprocess.run([dcmtk(tool), *args, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr  # no errors, no warnings
    return run.stdout


def test_the_ai_sr_is_a_tid_1500_report_highdicom_and_dsrdump_read(clinician_a, demo_model, tmp_path):
    image, source = read_dicom(clinician_a)
    result = Result.objects.get()
    instance = ai_report_for(result)
    assert (instance.kind, instance.origin, instance.result, instance.source_image) == (
        "ai_sr",
        "created",
        result,
        image,
    )
    sr = hd.sr.srread(instance.file.path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPInstanceUID == instance.sop_instance_uid and sr.Modality == "SR"
    for keyword in PATIENT_AND_STUDY:  # the hospital's own identifiers, so the PACS files it with its study
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.CompletionFlag == "COMPLETE"
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type.value == result.top_label and group.finding_type.scheme_designator == "99SIGHTLINE"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.value == result.top_label
    (probability,) = group.get_measurements()
    assert probability.name.meaning == "Probability" and probability.value == pytest.approx(result.top_probability)
    assert probability.unit.value == "1"
    algorithm = {
        item.name.meaning: item.value
        for item in hd.sr.utils.find_content_items(group[0], value_type=hd.sr.ValueTypeValues.TEXT)
    }
    assert algorithm["Algorithm Name"] == "sightline-demo" and algorithm["Algorithm Version"] == demo_model.version
    (reference,) = group.source_images
    assert reference.referenced_sop_instance_uid == source.SOPInstanceUID
    assert reference.referenced_sop_class_uid == source.SOPClassUID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SIGHTLINE"
    text = dump(instance, tmp_path, "dsrdump", "+Pu", "+Pc", "+Pl")  # +Pl: long values in full
    assert "Comprehensive 3D SR" in text
    assert f'"Algorithm Version")="{demo_model.version}"' in text
    assert source.SOPInstanceUID in text  # +Pu prints the referenced SOP instance
    assert AI_NOTICE[:60] in text
    # filed in the source's study, in Sightline's own SR series
    series = Series.objects.get(pk=instance.series_id)
    assert series.study_id == image.study_id and series.modality == "SR"
    assert sr.SeriesInstanceUID == series.series_instance_uid and sr.SeriesNumber == series.number
    assert AccessEvent.objects.filter(action="dicom.object_create", target_id=str(instance.pk)).count() == 1


def test_made_once_a_second_call_returns_the_same_object_and_bytes(clinician_a, demo_model):
    read_dicom(clinician_a)
    result = Result.objects.get()
    first = ai_report_for(result)
    with first.file.open("rb") as handle:
        before = handle.read()
    again = ai_report_for(result)
    assert again.pk == first.pk and again.sop_instance_uid == first.sop_instance_uid
    with again.file.open("rb") as handle:
        assert handle.read() == before
    assert Instance.objects.filter(kind="ai_sr").count() == 1
    assert AccessEvent.objects.filter(action="dicom.object_create").count() == 1


def test_a_concurrent_maker_that_loses_the_uid_gets_the_winners_object(clinician_a, demo_model, monkeypatch):
    """The unique SOP Instance UID arbitrates: the row that lost the race is not stored, its file is
    deleted, and the caller gets the one that won."""
    import dicomnet.objects as objects

    read_dicom(clinician_a)
    result = Result.objects.get()
    winner = ai_report_for(result)
    real_made = objects._made
    calls = {"n": 0}

    def late(tenant, uid):  # the loser looked before the winner's row was there
        calls["n"] += 1
        return None if calls["n"] == 1 else real_made(tenant, uid)

    monkeypatch.setattr(objects, "_made", late)
    Instance.objects.filter(pk=winner.pk).update(kind="")  # and found no object of this result yet
    loser = ai_report_for(result)
    assert loser.pk == winner.pk
    assert Instance.objects.filter(origin=Instance.Origin.CREATED).count() == 1  # (the upload has its own)


def test_the_review_sr_settles_the_ai_sr_and_names_the_signer(clinician_a, demo_model, tmp_path):
    image, source = read_dicom(clinician_a)
    result = Result.objects.get()
    user = clinician_a.user
    user.first_name, user.last_name = "Ada", "Lovelace"
    user.save()
    draft = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", comment="looks right")
    with pytest.raises(NotSignedOff):
        review_report_for(draft)
    review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    instance = review_report_for(review)
    ai = Instance.objects.get(kind="ai_sr")  # made on the way, as the review's predecessor
    assert instance.kind == "review_sr" and instance.review == review
    sr = hd.sr.srread(instance.file.path)
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Lovelace^Ada"
    assert sr.VerifyingObserverSequence[0].VerifyingOrganization == clinician_a.tenant.name
    (predecessor,) = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == ai.sop_instance_uid
    evidence = {uid for _, _, uid, _ in _evidence(sr)}
    assert {ai.sop_instance_uid, source.SOPInstanceUID} <= evidence
    for keyword in PATIENT_AND_STUDY:
        assert sr.get(keyword) == source.get(keyword), keyword
    (group,) = sr.content.get_image_measurement_groups()
    verdict, reviewed = group.get_qualitative_evaluations()
    assert (verdict.value.value, verdict.value.scheme_designator) == ("122775", "DCM")  # agreement
    assert reviewed.value.value == result.top_label
    assert group.finding_type.value == result.top_label
    ai_group = hd.sr.srread(ai.file.path).content.get_image_measurement_groups()[0]
    assert group.tracking_uid == ai_group.tracking_uid  # the same finding, tracked across the two
    text = dump(instance, tmp_path, "dsrdump", "+Pu")
    assert "Lovelace^Ada" in text and "Verification Flag   : VERIFIED" in text
    assert source.SOPInstanceUID in text
    assert review_report_for(review).pk == instance.pk


def _evidence(sr):
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for item in series.ReferencedSOPSequence:
                yield (
                    study.StudyInstanceUID,
                    series.SeriesInstanceUID,
                    item.ReferencedSOPInstanceUID,
                    (item.ReferencedSOPClassUID),
                )


def test_an_amendment_references_the_review_sr_it_amends(clinician_a, demo_model, tmp_path):
    image, _ = read_dicom(clinician_a)
    labels = demo_model.labels
    first = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    other = next(label for label in labels if label != Result.objects.get().top_label)
    amendment = review_save(membership=clinician_a, image_id=image.pk, verdict="correct", label=other, sign_off=True)
    assert amendment.amends_id == first.pk
    instance = review_report_for(amendment)
    earlier = Instance.objects.get(kind="review_sr", review=first)  # made on the way
    sr = hd.sr.srread(instance.file.path)
    (predecessor,) = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == earlier.sop_instance_uid
    (group,) = sr.content.get_image_measurement_groups()
    verdict, _ = group.get_qualitative_evaluations()
    assert verdict.value.value == "corrected-label" and group.finding_type.value == other
    assert instance.series_id == earlier.series_id  # one series of review SRs per study
    dump(instance, tmp_path, "dsrdump")


def test_the_manifests_label_codes_are_used_when_given(clinician_a, demo_model, tmp_path):
    from core.model_package import Manifest

    codes = {"round_opacity": {"scheme": "SCT", "value": "263716002", "meaning": "Opacity"},
             "no_finding": {"scheme": "RADLEX", "value": "RID5225", "meaning": "normal"}}  # fmt: skip
    manifest = Manifest.from_dict({**demo_model.manifest, "label_codes": codes}).to_dict()
    ModelVersion.objects.filter(pk=demo_model.pk).update(manifest=manifest)
    read_dicom(clinician_a)
    result = Result.objects.get()
    sr = hd.sr.srread(ai_report_for(result).file.path)
    (group,) = sr.content.get_image_measurement_groups()
    expected = codes[result.top_label]
    assert (group.finding_type.scheme_designator, group.finding_type.value, group.finding_type.meaning) == (
        expected["scheme"], expected["value"], expected["meaning"],
    )  # fmt: skip
    assert dump(Instance.objects.get(kind="ai_sr"), tmp_path, "dsrdump", "+Pc").count(expected["value"]) >= 1


def test_a_multi_frame_source_is_referenced_by_its_frame(clinician_a, demo_model, tmp_path):
    image, source = read_dicom(clinician_a, "multi-frame")  # 3 frames: one image, one result each
    assert int(source.NumberOfFrames) > 1
    result = Result.objects.filter(image__frame_number=2).get()
    sr = hd.sr.srread(ai_report_for(result).file.path)
    (reference,) = sr.content.get_image_measurement_groups()[0].source_images
    assert reference.referenced_sop_instance_uid == source.SOPInstanceUID
    assert list(reference.referenced_frame_numbers) == [3]


def test_the_heatmap_is_a_secondary_capture_in_the_study(clinician_a, demo_model, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr("dicomnet.objects.result_heatmap_request", lambda result_id: asked.append(result_id))
    image, source = read_dicom(clinician_a, "MR_small.dcm")
    result = Result.objects.get()
    assert heatmap_object_for(result) is None and asked == [result.pk]  # asked of a worker; not made yet
    heatmap_compute(result_id=result.pk)
    result.refresh_from_db()
    instance = heatmap_object_for(result)
    assert instance is not None and instance.kind == "map" and instance.frames == 1
    assert heatmap_object_for(result).pk == instance.pk
    dataset = stored(instance)
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and dataset.Modality == "OT"
    assert dataset.PhotometricInterpretation == "RGB" and dataset.SamplesPerPixel == 3
    assert (dataset.Rows, dataset.Columns) == (image.height, image.width)
    assert dataset.pixel_array.shape == (image.height, image.width, 3)
    for keyword in PATIENT_AND_STUDY:
        assert dataset.get(keyword) == source.get(keyword), keyword
    assert dataset.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
    text = dump(instance, tmp_path, "dcmdump")
    assert "SecondaryCaptureImageStorage" in text and "AI assistance, not a diagnosis" in text


def test_an_image_that_did_not_come_as_dicom_has_no_dicom_objects(clinician_a, demo_model):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=3)))
    inference_run(request_id=image.inference_requests.get().pk)
    with pytest.raises(NotDicomSource):
        ai_report_for(Result.objects.get())
    assert not Instance.objects.filter(origin=Instance.Origin.CREATED).exists()  # the upload's own row aside


def test_objects_of_two_results_share_the_studys_series(clinician_a, demo_model):
    read_dicom(clinician_a, "multi-frame")
    made = [ai_report_for(result) for result in Result.objects.order_by("id")[:3]]
    assert len({instance.series_id for instance in made}) == 1
    assert len({instance.sop_instance_uid for instance in made}) == 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_makers_store_one_object(clinician_a, demo_model):
    if connection.vendor == "sqlite":
        pytest.skip("one writer at a time on SQLite: the race is PostgreSQL's (the unique constraint holds on both)")
    read_dicom(clinician_a)
    result = Result.objects.get()
    made, errors = [], []

    def make():
        try:
            made.append(ai_report_for(result).pk)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(made)) == 1
    assert Instance.objects.filter(kind="ai_sr").count() == 1


@pytest.mark.django_db(transaction=True)  # the request reaches the worker after commit: commits are real here
def test_heatmap_ensure_asks_a_worker_and_waits_for_it(clinician_a, demo_model, monkeypatch):
    from celery import current_app

    from dicomnet.objects import heatmap_ensure

    def worker(self, name, args, **options):  # the worker, at once, in this process
        assert name == "workers.tasks.heatmap_compute"
        heatmap_compute(result_id=args[0])

    monkeypatch.setattr(type(current_app._get_current_object()), "send_task", worker)
    read_dicom(clinician_a)
    result = Result.objects.get()
    assert heatmap_ensure(result, timeout=5) == "ready"
    assert heatmap_object_for(result) is not None


@pytest.mark.heavy_any_db  # starts Orthanc
def test_a_real_pacs_stores_the_three_objects_with_their_study(clinician_a, demo_model, tmp_path):
    """DCMTK's storescu sends each made object to Orthanc, unchanged: it takes the SOP classes and
    files them under the source's study (sending from the platform is helper "send"'s). ``-R``: storescu
    proposes only the files' SOP classes; its default list has no Comprehensive 3D SR."""
    from tests.peers import orthanc_running

    image, source = read_dicom(clinician_a)
    result = Result.objects.get()
    heatmap_compute(result_id=result.pk)
    review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    made = [ai_report_for(result), review_report_for(review), heatmap_object_for(result)]
    files = []
    for instance in made:
        assert instance is not None
        path = tmp_path / f"{instance.kind}.dcm"
        with instance.file.open("rb") as handle:
            path.write_bytes(handle.read())
        files.append(str(path))
    with orthanc_running(tmp_path / "orthanc") as pacs:
        run = subprocess.run(
            [
                dcmtk("storescu"),
                "-R",
                "-aec",
                pacs.ae_title,
                "-aet",
                "SIGHTLINE",
                "127.0.0.1",
                str(pacs.dicom_port),
                *files,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        held = {tags["SOPInstanceUID"]: tags for tags in pacs.instances()}
    for instance in made:
        tags = held[instance.sop_instance_uid]
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID and tags["PatientID"] == source.PatientID


def test_a_source_that_left_out_type_2_attributes_still_gets_a_valid_sr(clinician_a, demo_model, tmp_path):
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del dataset.PatientID, dataset.PatientBirthDate, dataset.ReferringPhysicianName
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    (image,) = images_upload(membership=clinician_a, upload=upload_file(buffer.getvalue(), "scan.dcm"))
    inference_run(request_id=image.inference_requests.get().pk)
    instance = ai_report_for(Result.objects.get())
    sr = hd.sr.srread(instance.file.path)
    assert sr.PatientID == "" and sr.PatientName == dataset.PatientName  # present, empty: unknown
    dump(instance, tmp_path, "dsrdump")


# -- a source whose values are not conformant: no value reaches a log line, a warning or an exception --------------

BAD_VALUES = {
    "PatientBirthDate": "1970-01-31",  # a DA is YYYYMMDD: highdicom's DA() would raise, quoting it
    "StudyDate": "2020/01/02",
    "StudyTime": "25:61:77xx",
    "PatientSex": "Male",  # CS allows no lower case; highdicom takes M, F or O only
    "PatientAge": "42 years",  # a type 3 attribute: left out
}
ONE_PART_NAME = "Quixotebrandname"  # valid PN, but highdicom warns with a one-part name in its words


def _bad_source(clinician_a):
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in BAD_VALUES.items():
        setattr(dataset, keyword, value)
    dataset.PatientName = ONE_PART_NAME
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.save_as(buffer, enforce_file_format=True)
    (image,) = images_upload(membership=clinician_a, upload=upload_file(buffer.getvalue(), "scan.dcm"))
    inference_run(request_id=image.inference_requests.get().pk)
    image.refresh_from_db()
    return image


def _every_logger_at_debug(caplog):
    caplog.set_level(logging.DEBUG)
    for name in [*logging.root.manager.loggerDict, "pydicom", "highdicom", "dicomnet.objects"]:
        caplog.set_level(logging.DEBUG, logger=name)


def _leaked(text: str) -> list[str]:
    return [value for value in [*BAD_VALUES.values(), ONE_PART_NAME] if value in text]


def test_non_conformant_source_values_are_blanked_and_never_logged(clinician_a, demo_model, caplog, recwarn):
    image = _bad_source(clinician_a)
    result = Result.objects.get()
    heatmap_compute(result_id=result.pk)
    review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    caplog.clear()
    recwarn.clear()
    _every_logger_at_debug(caplog)
    made = [ai_report_for(result), review_report_for(review), heatmap_object_for(Result.objects.get())]
    logged = "\n".join(f"{record.name} {record.getMessage()}" for record in caplog.records)
    assert _leaked(logged) == [], logged
    assert _leaked("\n".join(str(warning.message) for warning in recwarn)) == []
    assert any(record.name == "dicomnet.objects" for record in caplog.records)  # the capture did capture
    for instance in made:
        assert instance is not None
        dataset = stored(instance)
        # the Type 2 ones present and empty (unknown), the type 3 one left out; the rest as the hospital sent it
        for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex"):
            assert keyword in dataset and not dataset[keyword].value, (instance.kind, keyword)
        assert "PatientAge" not in dataset
        assert str(dataset.PatientName) == ONE_PART_NAME and dataset.PatientID == "1CT1"


def test_a_library_error_quoting_a_value_is_refused_in_fixed_words(clinician_a, demo_model, monkeypatch, caplog):
    """Whatever highdicom raises (its words quote the source's values) becomes a refusal in words
    with no chained exception: a Celery traceback of it holds no value."""
    image = _bad_source(clinician_a)
    result = Result.objects.get()

    def refusing(*args, **kwargs):
        raise ValueError(f"Unable to convert '{ONE_PART_NAME}' to 'DA' object")

    monkeypatch.setattr(hd.sr, "Comprehensive3DSR", refusing)
    monkeypatch.setattr(hd.sc.SCImage, "from_ref_dataset", refusing)
    heatmap_compute(result_id=result.pk)
    review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    caplog.clear()
    _every_logger_at_debug(caplog)
    for make, target in ((ai_report_for, result), (review_report_for, review), (heatmap_object_for, result)):
        with pytest.raises(Unprocessable) as caught:
            make(Result.objects.get() if target is result else target)
        error = caught.value
        assert error.__cause__ is None and error.__suppress_context__
        shown = "".join(traceback.format_exception(error))
        assert _leaked(shown) == [] and "cannot" in error.message, shown
    logged = "\n".join(f"{record.name} {record.getMessage()}" for record in caplog.records)
    assert _leaked(logged) == [], logged
    assert not Instance.objects.filter(origin=Instance.Origin.CREATED).exists()  # the upload's own row aside


@pytest.mark.parametrize("foreign", ["other", "climbing"])
def test_a_stored_original_outside_the_hospitals_storage_is_refused_never_read(
    clinician_a, clinician_b, demo_model, monkeypatch, foreign
):
    """The image's original key is vouched for by recognition.storage.storage_key_for_tenant against
    the image's hospital before it is opened: another hospital's file is refused, not read."""
    from django.core.files.storage import default_storage

    image, _ = read_dicom(clinician_a)
    other, _ = read_dicom(clinician_b, "MR_small.dcm")
    theirs = other.original.name
    assert not theirs.startswith(f"tenants/{image.tenant_id}/")
    key = theirs if foreign == "other" else f"tenants/{image.tenant_id}/dicom/../../{other.tenant_id}/dicom/x.dcm"
    type(image).objects.filter(pk=image.pk).update(original=key)
    opened = []
    real_open = default_storage.open

    def recording_open(name, *args, **kwargs):
        opened.append(name)
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(default_storage, "open", recording_open)
    result = Result.objects.get(image=image)
    with pytest.raises(Unprocessable) as caught:
        ai_report_for(result)
    assert caught.value.code == "foreign_storage_key" and "hospital's storage" in caught.value.message
    assert opened == []  # nothing read: not theirs, nor anything else
    assert not Instance.objects.filter(origin=Instance.Origin.CREATED).exists()  # the upload's own row aside


def test_a_storage_outage_reading_the_original_is_not_a_refusal(clinician_a, demo_model, monkeypatch):
    """Transient (the task tries again), not Unprocessable (which a sender takes as final)."""
    from django.core.files.storage import default_storage

    read_dicom(clinician_a)

    def down(name, *args, **kwargs):
        raise ConnectionError("storage unreachable")

    monkeypatch.setattr(default_storage, "open", down)
    with pytest.raises(ConnectionError):
        ai_report_for(Result.objects.get())
