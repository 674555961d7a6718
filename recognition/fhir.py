"""A study's AI findings and clinicians' verdicts as FHIR R4: one Bundle (type ``collection``) with
a DiagnosticReport, its Observations (each image's AI finding, with the model and its version as
the Device and method; the clinician's verdict once signed off), the ImagingStudy (UIDs, series,
modalities, the instances the platform holds as DICOM) and the Patient, by pseudonym only.

Resources are named ``urn:uuid:`` (RFC 4122 v5 from the hospital, kind and row), as a bundle that
is not a server's own names its entries, and refer to each other by those names. Validated by the
tests with ``fhir.resources.R4B``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db.models import Prefetch
from django.utils import timezone

from accounts.access import member_action_record
from accounts.models import Membership
from core.model_package import PRIVATE_CODING_SCHEME

from .models import Image, ModelVersion, Result, Review, Study
from .selectors import study_get

FHIR_CONTENT_TYPE = "application/fhir+json"
AI_NOTICE = "AI assistance, not a diagnosis: a machine-learning model's finding, for a clinician to review."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SIGHTLINE_CODES = "urn:sightline:codes"  # the verdict and its values where DICOM has no code
PSEUDONYM_SYSTEM = "urn:sightline:patient-pseudonym"
PROBABILITY_DIGITS = 6  # a model's probability to a millionth: what a float32 softmax resolves
# DICOM coding scheme designators → FHIR code systems (HL7 terminology); others keep a URN
CODE_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": LOINC,
    "RADLEX": "http://www.radlex.org",
    "RDLX": "http://www.radlex.org",
    "DCM": DCM,
    "UCUM": UCUM,
}
VERDICTS: dict[str, dict[str, str]] = {
    Review.Verdict.AGREE: {"system": DCM, "code": "122775", "display": "Agreement with prior findings"},
    Review.Verdict.DISAGREE: {"system": DCM, "code": "122776", "display": "Disagreement with prior findings"},
    Review.Verdict.CORRECT: {
        "system": SIGHTLINE_CODES,
        "code": "corrected-label",
        "display": "Disagreement: label corrected",
    },
}


def _name(tenant_id: int, kind: str, pk: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sightline:{tenant_id}:{kind}:{pk}"))


def _ref(name: str) -> dict:
    return {"reference": f"urn:uuid:{name}"}


def _instant(moment: datetime) -> str:
    return timezone.localtime(moment).isoformat()


def label_coding(version: ModelVersion, label: str) -> dict:
    """The label's code from the manifest (``label_codes``), else the label in the model's own URN."""
    code = (version.manifest.get("label_codes") or {}).get(label)
    if code:
        system = CODE_SYSTEMS.get(code["scheme"], f"urn:sightline:scheme:{code['scheme'].lower()}")
        return {"system": system, "code": code["value"], "display": code["meaning"]}
    return {
        "system": f"urn:sightline:{PRIVATE_CODING_SCHEME.lower()}:{version.model.name}",
        "code": label,
        "display": label,
    }


def _patient(study: Study, name: str) -> dict:
    patient: dict = {
        "resourceType": "Patient",
        "id": name,
        "meta": {
            "security": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "PSEUDED",
                    "display": "pseudonymized",
                }
            ]
        },
    }
    if study.patient_pseudonym:
        patient["identifier"] = [{"system": PSEUDONYM_SYSTEM, "value": study.patient_pseudonym}]
    return patient


def _modality(code: str) -> dict:
    return {"system": DCM, "code": code or "OT"}


def _imaging_study(study: Study, name: str, patient: str) -> dict:
    from dicomnet.models import Instance  # dicomnet sits above recognition

    instances = list(Instance.objects.filter(study=study, tenant_id=study.tenant_id).order_by("instance_number", "id"))
    by_series: dict[int, list] = {}
    for instance in instances:
        by_series.setdefault(instance.series_id, []).append(instance)
    image_uids: dict[int, set[str]] = {}
    for series_id, sop_uid in Image.objects.filter(study=study).values_list("series_id", "sop_instance_uid"):
        image_uids.setdefault(series_id, set()).add(sop_uid or f"image-of-{series_id}")
    series_out, counted = [], 0
    all_series = list(study.series.order_by("number", "id"))
    for series in all_series:
        held = {instance.sop_instance_uid for instance in by_series.get(series.pk, [])}
        count = len(held | image_uids.get(series.pk, set()))
        counted += count
        if not series.series_instance_uid:
            continue  # an upload that was not DICOM: no series a PACS knows
        entry: dict = {
            "uid": series.series_instance_uid,
            "number": series.number,
            "modality": _modality(series.modality),
            "numberOfInstances": count,
        }
        if series.description:
            entry["description"] = series.description
        if by_series.get(series.pk):
            entry["instance"] = [
                {
                    "uid": instance.sop_instance_uid,
                    "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{instance.sop_class_uid}"},
                    **({"number": instance.instance_number} if instance.instance_number is not None else {}),
                }
                for instance in by_series[series.pk]
            ]
        series_out.append(entry)
    resource: dict = {
        "resourceType": "ImagingStudy",
        "id": name,
        "status": "available",
        "subject": _ref(patient),
        "numberOfSeries": len(all_series),
        "numberOfInstances": counted,
    }
    if study.study_instance_uid:
        resource["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"}]
    if study.accession_number:
        resource["identifier"] = [
            *resource.get("identifier", []),
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "value": study.accession_number,
            },
        ]
    if study.study_date:
        resource["started"] = study.study_date.isoformat()
    modalities = sorted({series.modality for series in all_series if series.modality})
    if modalities:
        resource["modality"] = [_modality(code) for code in modalities]
    if study.description:
        resource["description"] = study.description
    if series_out:
        resource["series"] = series_out
    return resource


def _device(version: ModelVersion, name: str) -> dict:
    return {
        "resourceType": "Device",
        "id": name,
        "manufacturer": "Sightline",
        "deviceName": [{"name": version.model.name, "type": "model-name"}],
        "type": {"text": "AI model (image recognition)" + (", a demo" if version.model.is_demo else "")},
        "version": [{"value": version.version}],
        "note": [{"text": f"weights sha256 {version.weights_sha256}"}],
    }


def _ai_observation(result: Result, *, name: str, patient: str, imaging: str, device: str) -> dict:
    version = result.model_version
    return {
        "resourceType": "Observation",
        "id": name,
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
        ],
        "code": {"coding": [{"system": DCM, "code": "121071", "display": "Finding"}], "text": "AI finding"},
        "subject": _ref(patient),
        "effectiveDateTime": _instant(result.created),
        "issued": _instant(result.created),
        "valueCodeableConcept": {"coding": [label_coding(version, result.top_label)], "text": result.top_label},
        "component": [
            {
                "code": {"coding": [{"system": DCM, "code": "122157", "display": "Probability"}]},
                "valueQuantity": {
                    "value": round(float(result.top_probability), PROBABILITY_DIGITS),
                    "unit": "1",
                    "system": UCUM,
                    "code": "1",
                },
            }
        ],
        "method": {"text": f"AI model {version.model.name} {version.version}"},
        "device": _ref(device),
        "derivedFrom": [_ref(imaging)],
        "note": [{"text": AI_NOTICE}],
    }


def _verdict_observation(review: Review, *, name: str, patient: str, ai: str) -> dict:
    signer, signed_off_at = review.signed_off_by or review.author, review.signed_off_at
    assert signed_off_at is not None  # only signed reviews are verdicts
    version = review.model_version
    observation: dict = {
        "resourceType": "Observation",
        "id": name,
        "status": "amended" if review.amends_id else "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
        ],
        "code": {
            "coding": [
                {"system": SIGHTLINE_CODES, "code": "verdict", "display": "Clinician's verdict on the AI finding"}
            ]
        },
        "subject": _ref(patient),
        "effectiveDateTime": _instant(signed_off_at),
        "issued": _instant(signed_off_at),
        "performer": [{"display": signer.get_full_name() or signer.get_username()}],
        "valueCodeableConcept": {"coding": [VERDICTS[review.verdict]], "text": review.get_verdict_display()},
        "derivedFrom": [_ref(ai)],
    }
    label = review.label or (review.ai_label if review.verdict == Review.Verdict.AGREE else "")
    if label and version is not None:
        observation["component"] = [
            {
                "code": {
                    "coding": [{"system": DCM, "code": "121071", "display": "Finding"}],
                    "text": "Clinician's label",
                },
                "valueCodeableConcept": {"coding": [label_coding(version, label)], "text": label},
            }
        ]
    if review.comment:
        observation["note"] = [{"text": review.comment}]
    return observation


def _images(study: Study) -> list[Image]:
    shown = Result.objects.filter(request__shadow=False).select_related("model_version__model").order_by("-created")
    signed = (
        Review.objects.filter(signed_off_at__isnull=False)
        .select_related("author", "signed_off_by", "model_version__model")
        .order_by("-signed_off_at", "-id")
    )
    return list(
        Image.objects.filter(study=study, tenant_id=study.tenant_id)
        .order_by("series__number", "instance_number", "frame_number", "id")
        .prefetch_related(Prefetch("results", queryset=shown), Prefetch("reviews", queryset=signed))
    )


def study_bundle(study: Study) -> dict:
    """The Bundle of a study reached through ``study_get`` (scoped and logged by the caller)."""
    tenant_id = study.tenant_id
    patient = _name(tenant_id, "patient", study.patient_pseudonym or f"study-{study.pk}")
    imaging = _name(tenant_id, "imaging-study", study.pk)
    report = _name(tenant_id, "diagnostic-report", study.pk)
    devices: dict[int, dict] = {}
    observations: list[dict] = []
    moments: list[datetime] = []
    for image in _images(study):
        result = next(iter(image.results.all()), None)
        if result is None:
            continue
        version = result.model_version
        device = _name(tenant_id, "device", version.pk)
        devices.setdefault(version.pk, _device(version, device))
        ai = _name(tenant_id, "ai-finding", result.pk)
        observations.append(_ai_observation(result, name=ai, patient=patient, imaging=imaging, device=device))
        moments.append(result.created)
        review = next((r for r in image.reviews.all() if r.result_id == result.pk), None)
        if review is not None:
            observations.append(
                _verdict_observation(review, name=_name(tenant_id, "verdict", review.pk), patient=patient, ai=ai)
            )
            moments.append(review.signed_off_at or review.created)
    signed_off = study.review_state == Study.ReviewState.SIGNED_OFF
    diagnostic_report: dict = {
        "resourceType": "DiagnosticReport",
        "id": report,
        "status": ("final" if signed_off else "preliminary") if observations else "registered",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": _ref(patient),
        "imagingStudy": [_ref(imaging)],
        "conclusion": AI_NOTICE
        + (" Every finding has been reviewed and signed off by a clinician." if signed_off else ""),
    }
    if study.study_date:
        diagnostic_report["effectiveDateTime"] = study.study_date.isoformat()
    if moments:
        diagnostic_report["issued"] = _instant(max(moments))
    if observations:
        diagnostic_report["result"] = [_ref(observation["id"]) for observation in observations]
    resources = [
        diagnostic_report,
        _patient(study, patient),
        _imaging_study(study, imaging, patient),
        *devices.values(),
        *observations,
    ]
    return {
        "resourceType": "Bundle",
        "id": _name(tenant_id, "bundle", study.pk),
        "type": "collection",
        "timestamp": _instant(timezone.now()),
        "entry": [{"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource} for resource in resources],
    }


def study_fhir_bundle(*, membership: Membership, study_id: int, request=None) -> dict:
    """A study of the member's hospital as a FHIR Bundle (404 for another hospital's, logged); the
    export itself is logged as ``study.fhir``."""
    study = study_get(membership=membership, study_id=study_id, request=request)
    member_action_record(membership, "study.fhir", request=request, target_type="study", target_id=study.pk)
    return study_bundle(study)
