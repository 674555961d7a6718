"""GET /api/v1/studies/{id}/fhir/: the study as a FHIR R4 Bundle that fhir.resources' R4B models
validate, the patient by pseudonym only, scoped to the hospital and in the access log."""

from __future__ import annotations

import io

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.data import get_testdata_file

from accounts.models import AccessEvent
from dicomnet.objects import ai_report_for
from recognition.models import ModelVersion, Result
from recognition.services.images import images_upload
from recognition.services.reviews import review_save
from tests.conftest import api_client_for, upload_file
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def read_ct(membership):
    with open(get_testdata_file("CT_small.dcm"), "rb") as handle:
        data = handle.read()
    (image,) = images_upload(membership=membership, upload=upload_file(data, "ct.dcm"))
    inference_run(request_id=image.inference_requests.get().pk)
    image.refresh_from_db()
    return image, pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def bundle_of(membership, study_id):
    response = api_client_for(membership).get(f"/api/v1/studies/{study_id}/fhir/")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/fhir+json"
    return response, response.json()


def resources(body, kind):
    return [entry["resource"] for entry in body["entry"] if entry["resource"]["resourceType"] == kind]


def test_the_bundle_validates_as_r4_and_holds_the_report_its_observations_and_the_study(clinician_a, demo_model):
    image, source = read_ct(clinician_a)
    result = Result.objects.get()
    ai_report_for(result)  # an object the platform made is an instance of the study too
    _, body = bundle_of(clinician_a, image.study_id)
    bundle = Bundle.model_validate(body)
    assert bundle.type == "collection"
    names = {entry["fullUrl"] for entry in body["entry"]}
    (report,) = resources(body, "DiagnosticReport")
    assert report["status"] == "preliminary"
    (ai,) = resources(body, "Observation")
    assert {ref["reference"] for ref in report["result"]} == {f"urn:uuid:{ai['id']}"} <= names
    assert ai["valueCodeableConcept"]["coding"][0]["code"] == result.top_label
    assert ai["component"][0]["valueQuantity"]["value"] == pytest.approx(result.top_probability)
    assert demo_model.version in ai["method"]["text"]
    (device,) = resources(body, "Device")
    assert ai["device"]["reference"] == f"urn:uuid:{device['id']}"
    assert device["version"] == [{"value": demo_model.version}]
    (study,) = resources(body, "ImagingStudy")
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"} in study["identifier"]
    uids = {series["uid"] for series in study["series"]}
    assert source.SeriesInstanceUID in uids
    made = next(series for series in study["series"] if series["modality"]["code"] == "SR")
    assert made["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.88.34"
    for reference in (report["subject"], ai["subject"], study["subject"], *report["imagingStudy"]):
        assert reference["reference"] in names  # every reference resolves inside the bundle


def test_the_patient_is_named_by_pseudonym_only(clinician_a, demo_model):
    image, source = read_ct(clinician_a)
    response, body = bundle_of(clinician_a, image.study_id)
    (patient,) = resources(body, "Patient")
    assert patient["identifier"] == [
        {"system": "urn:sightline:patient-pseudonym", "value": image.study.patient_pseudonym}
    ]
    assert patient["meta"]["security"][0]["code"] == "PSEUDED"
    for identifier in (str(source.PatientID), str(source.PatientName)):
        assert identifier.encode() not in response.content


def test_a_signed_verdict_is_an_observation_and_the_report_becomes_final(clinician_a, demo_model):
    image, _ = read_ct(clinician_a)
    result = Result.objects.get()
    other = next(label for label in demo_model.labels if label != result.top_label)
    review_save(membership=clinician_a, image_id=image.pk, verdict="correct", label=other, sign_off=True)
    _, body = bundle_of(clinician_a, image.study_id)
    Bundle.model_validate(body)
    (report,) = resources(body, "DiagnosticReport")
    assert report["status"] == "final"
    ai, verdict = resources(body, "Observation")
    assert verdict["status"] == "final" and verdict["performer"] == [{"display": "clinician"}]
    assert verdict["valueCodeableConcept"]["coding"][0]["code"] == "corrected-label"
    assert verdict["component"][0]["valueCodeableConcept"]["coding"][0]["code"] == other
    assert verdict["derivedFrom"] == [{"reference": f"urn:uuid:{ai['id']}"}]
    amendment = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    _, body = bundle_of(clinician_a, image.study_id)
    Bundle.model_validate(body)
    _, verdict = resources(body, "Observation")
    assert verdict["status"] == "amended" and verdict["id"] != ""
    assert amendment.amends_id is not None


def test_label_codes_from_the_manifest_become_codings(clinician_a, demo_model):
    codes = {
        label: {"scheme": "SCT", "value": f"1000{n}", "meaning": label} for n, label in enumerate(demo_model.labels)
    }
    ModelVersion.objects.filter(pk=demo_model.pk).update(manifest={**demo_model.manifest, "label_codes": codes})
    image, _ = read_ct(clinician_a)
    _, body = bundle_of(clinician_a, image.study_id)
    (ai,) = resources(body, "Observation")
    coding = ai["valueCodeableConcept"]["coding"][0]
    assert (
        coding["system"] == "http://snomed.info/sct"
        and coding["code"] == codes[Result.objects.get().top_label]["value"]
    )


def test_another_hospitals_study_is_a_404_and_the_attempt_is_logged(clinician_a, clinician_b, demo_model):
    image, _ = read_ct(clinician_a)
    response = api_client_for(clinician_b).get(f"/api/v1/studies/{image.study_id}/fhir/")
    assert response.status_code == 404 and response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"
    assert AccessEvent.objects.filter(
        tenant=clinician_b.tenant, action="study.view", outcome="denied", target_id=str(image.study_id)
    ).exists()


def test_a_viewer_may_read_it_an_auditor_may_not(clinician_a, viewer_a, demo_model):
    from accounts.models import Role
    from tests.conftest import member

    image, _ = read_ct(clinician_a)
    bundle_of(viewer_a, image.study_id)
    auditor = member(clinician_a.tenant, "auditor", Role.AUDITOR)
    assert api_client_for(auditor).get(f"/api/v1/studies/{image.study_id}/fhir/").status_code == 403


def test_every_export_is_in_the_access_log(clinician_a, demo_model):
    image, _ = read_ct(clinician_a)
    bundle_of(clinician_a, image.study_id)
    bundle_of(clinician_a, image.study_id)
    assert (
        AccessEvent.objects.filter(
            tenant=clinician_a.tenant, action="study.fhir", target_id=str(image.study_id), actor=clinician_a.user
        ).count()
        == 2
    )


def test_it_answers_fhir_json_whatever_the_client_accepts(clinician_a, demo_model):
    image, _ = read_ct(clinician_a)
    client = api_client_for(clinician_a)
    for accept in ("application/fhir+json", "application/json", "*/*"):
        response = client.get(f"/api/v1/studies/{image.study_id}/fhir/", HTTP_ACCEPT=accept)
        assert response.status_code == 200 and response["Content-Type"] == "application/fhir+json", accept
    missing = client.get("/api/v1/studies/987654/fhir/", HTTP_ACCEPT="application/fhir+json")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"


def test_a_study_of_png_uploads_has_a_valid_bundle_without_uids(clinician_a, demo_model):
    from recognition.services.images import image_upload
    from tests.conftest import png_bytes

    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=5)))
    inference_run(request_id=image.inference_requests.get().pk)
    _, body = bundle_of(clinician_a, image.study_id)
    Bundle.model_validate(body)
    (study,) = resources(body, "ImagingStudy")
    assert "series" not in study and study["numberOfInstances"] == 1


def test_the_bundle_costs_the_same_queries_for_one_image_or_many(
    clinician_a, demo_model, django_assert_max_num_queries
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.integration.test_dicom_objects import multi_frame

    one, _ = read_ct(clinician_a)
    images = images_upload(membership=clinician_a, upload=upload_file(multi_frame(3), "mf.dcm"))
    for image in images:
        inference_run(request_id=image.inference_requests.get().pk)
        review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    client = api_client_for(clinician_a)
    with CaptureQueriesContext(connection) as single:
        client.get(f"/api/v1/studies/{one.study_id}/fhir/")
    with django_assert_max_num_queries(len(single)):
        response = client.get(f"/api/v1/studies/{images[0].study_id}/fhir/")
    assert len(resources(response.json(), "Observation")) == 6  # three findings, three verdicts
