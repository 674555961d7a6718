"""The DICOM objects Sightline makes of its findings, for images that came in as DICOM.

- ``ai_report_for(result)``: the AI finding as a Comprehensive 3D SR following TID 1500
  (Measurement Report): per finding one measurement group (TID 1501) with the label as a coded
  finding and a coded qualitative evaluation (label: Present), its probability as a numeric
  measurement (DCM 122157 "Probability", UCUM "1"), the model as the algorithm identification
  (TID 4019) and as the device observer (TID 1004), the source image (and frame) referenced, and
  a comment that it is AI assistance, not a diagnosis. Preliminary, unverified.
- ``review_report_for(review)``: once a clinician signed the review off, a second TID 1500 SR with
  the verdict and the clinician's label as codes, the signer as the person observer (TID 1003) and
  verifying observer, at the sign-off time; final and verified. Its Predecessor Documents Sequence
  names the AI SR (the provisional report it settles), or, for an amendment, the review SR it
  amends; both are in its Current Requested Procedure Evidence too. The finding keeps the AI
  finding's Tracking Unique Identifier, so a viewer links the two.
- ``heatmap_object_for(result)``: the Grad-CAM overlay blended over the image as an RGB Secondary
  Capture. Why not a Parametric Map: every PACS viewer shows an SC, few fuse a float map with a
  colour LUT over its source; Grad-CAM is a qualitative picture of where the model looked, not a
  quantity a real-world value map would give meaning to; and a PM wants a frame of reference and
  functional groups a projection radiograph often does not have. IHE AIR allows either.

Every object carries the Patient and Study modules of its source instance, copied by highdicom
from the stored original (read with ``stop_before_pixels``; the original passed the ingest checks
when it was stored), so the PACS files it with its study. Each object kind has one series per
study (``OBJECT_SERIES``: a recognition Series row, modality SR or OT). Its UIDs are derived once
from the platform's UID root and the row it reports on (``SIGHTLINE_DICOM_UID_ROOT``, else 2.25),
the bytes are stored once (default_storage) in an ``Instance`` (origin "created"): a second call
returns that row, and a resend is byte-identical. Two concurrent calls derive the same SOP Instance
UID; the per-hospital unique constraint lets one row in and the other call returns it.

No value of the source reaches an exception, a log line or a warning: before highdicom copies
them, the source's values are checked silently against their VRs (``_conformant``): a non-conformant
Type 2 Patient/Study value (``TYPE_2_PATIENT_AND_STUDY``: a PatientBirthDate of "1970-01-31", a
StudyDate of "2020/01/02", a name component over 64 characters, a PatientSex other than M, F, O) is
blanked (present, empty: unknown) and any other non-conformant attribute left out, so such a study
still exports; UIDs are kept as they are. Every highdicom/pydicom build is wrapped (``_building``):
whatever it raises becomes an ``Unprocessable`` in fixed words (the keyword at most), raised
``from None``, so a task's traceback carries no value. Every stored file read here (the original,
a made object, the display copy, the heatmap) is vouched for first by
``recognition.storage.storage_key_for_tenant`` against its hospital; a key elsewhere is refused
(``foreign_storage_key``), never opened.

Making an object is logged (``dicom.object_create``, by the platform, in the transaction that
stores it); it discloses nothing: sending it is the disclosure, logged by the sender.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.utils import timezone
from highdicom._standard_utils import is_multiframe_image
from PIL import Image as PILImage
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM, VALIDATORS

from accounts.services import access_event_record
from core.errors import Conflict, DomainError, Unprocessable
from core.model_package import PRIVATE_CODING_SCHEME
from core.transient import is_transient
from recognition.fhir import PROBABILITY_DIGITS
from recognition.models import Image, ModelVersion, Result, Review, Series, Study
from recognition.services.heatmaps import HeatmapStatus, result_heatmap_request, result_heatmap_status
from recognition.storage import ForeignStorageKey, storage_key_for_tenant

from .models import Instance

logger = logging.getLogger(__name__)

MANUFACTURER = "Sightline"
SYSTEM_ACTOR = "sightline"  # the access log's actor for what the platform itself does
AI_NOTICE = (
    "AI assistance, not a diagnosis: produced by a machine-learning model for a clinician to review; "
    "it has not been confirmed by a clinician."
)
MAP_NOTICE = "AI assistance, not a diagnosis: where the model looked (Grad-CAM) for its finding, over the image."


class Kind:
    AI_SR = "ai_sr"
    REVIEW_SR = "review_sr"
    MAP = "map"


@dataclass(frozen=True)
class ObjectSeries:
    number: int  # the preferred Series Number; the next free one if the study already has it
    modality: str
    description: str


# one series per object kind and study, numbered away from a modality's own series
OBJECT_SERIES = {
    Kind.AI_SR: ObjectSeries(9001, "SR", "Sightline AI findings (AI assistance, not a diagnosis)"),
    Kind.REVIEW_SR: ObjectSeries(9002, "SR", "Sightline clinician reviews of AI findings"),
    Kind.MAP: ObjectSeries(9003, "OT", "Sightline AI heatmaps (AI assistance, not a diagnosis)"),
}

UCUM_NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
AI_FINDING = hd.sr.CodedConcept(value="ai-finding", scheme_designator=PRIVATE_CODING_SCHEME, meaning="AI finding")
VERDICT = hd.sr.CodedConcept(
    value="verdict", scheme_designator=PRIVATE_CODING_SCHEME, meaning="Clinician's verdict on the AI finding"
)
AI_FINDING_REVIEWED = hd.sr.CodedConcept(
    value="ai-finding-reviewed", scheme_designator=PRIVATE_CODING_SCHEME, meaning="AI finding reviewed"
)
# agree and disagree are DICOM's own; a corrected label is a disagreement that names another finding
VERDICT_CODES: dict[str, hd.sr.CodedConcept] = {
    Review.Verdict.AGREE: hd.sr.CodedConcept.from_code(codes.DCM.AgreementWithPriorFindings),
    Review.Verdict.DISAGREE: hd.sr.CodedConcept.from_code(codes.DCM.DisagreementWithPriorFindings),
    Review.Verdict.CORRECT: hd.sr.CodedConcept(
        value="corrected-label", scheme_designator=PRIVATE_CODING_SCHEME, meaning="Disagreement: label corrected"
    ),
}
# the Patient and General Study attributes of type 2 that highdicom copies from the source; a file
# that left one out gets it empty (its meaning: unknown)
TYPE_2_PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
PATIENT_SEXES = ("M", "F", "O")
AI_SR_REFUSAL = "This image cannot be the source of a DICOM SR: its DICOM header is not one an SR can be made of."
REVIEW_SR_REFUSAL = "This review cannot be made a DICOM SR: the image's DICOM header is not one an SR can be made of."
MAP_REFUSAL = "This image's heatmap cannot be made a DICOM Secondary Capture: its DICOM header does not allow it."
UID_ROOT_MAX = 40  # characters of an operator's root: the rest of the 64 is the derived part


class NotDicomSource(Conflict):
    """The finding is of an image that did not come in as DICOM (or of a shadow read): there is no
    study in a PACS to file an object with."""

    code = "not_dicom"


class NotSignedOff(Conflict):
    code = "not_signed_off"


# -- identifiers -----------------------------------------------------------------------------------------------------


def object_uid(*parts: object) -> str:
    """A UID derived from ``parts`` under the platform's root (``SIGHTLINE_DICOM_UID_ROOT``; 2.25,
    UUID-derived, without one): the same parts give the same UID, so concurrent makers of one
    object agree on it and the unique constraint keeps one."""
    root = str(settings.SIGHTLINE_DICOM_UID_ROOT or "").strip().rstrip(".")
    sources = ["sightline", *(str(part) for part in parts)]
    if root and len(root) <= UID_ROOT_MAX:
        return generate_uid(prefix=f"{root}.", entropy_srcs=sources)
    # ISO/IEC 9834-8: a name-based (v5) UUID as an integer under 2.25 (pydicom's 2.25 is random)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(sources)).int}"


def _object_key(tenant_id: int, sop_instance_uid: str) -> str:
    return f"tenants/{tenant_id}/dicom-made/{sop_instance_uid}.dcm"


# -- codes -----------------------------------------------------------------------------------------------------------


def label_code(version: ModelVersion, label: str) -> hd.sr.CodedConcept:
    """The label's code from the version's manifest (``label_codes``), else the label itself in the
    platform's private coding scheme."""
    code = (version.manifest.get("label_codes") or {}).get(label)
    if code:
        return hd.sr.CodedConcept(value=code["value"], scheme_designator=code["scheme"], meaning=code["meaning"])
    return hd.sr.CodedConcept(value=label, scheme_designator=PRIVATE_CODING_SCHEME, meaning=label[:64])


def _private_scheme_identified(dataset: Dataset) -> None:
    """PS3.3 C.12.1.1.5: a private coding scheme used in the object is named in it."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_CODING_SCHEME
    item.CodingSchemeName = "Sightline model labels and review verdicts"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [item]


def _algorithm(version: ModelVersion) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=version.model.name, version=version.version, parameters=[f"weights sha256 {version.weights_sha256}"]
    )


def _device_observer(version: ModelVersion) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=object_uid("device", version.model.name, version.version, version.weights_sha256),
            name=f"{version.model.name} {version.version}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=version.model.name[:64],
            serial_number=version.weights_sha256[:64],
        ),
    )


def person_name(user) -> str:
    """How the platform names a person (the username, as the review history shows it; the full name
    first where the account has one), as a DICOM PN: Family^Given."""
    first, last = (user.first_name or "").strip(), (user.last_name or "").strip()
    if first and last:
        return f"{last}^{first}"[:64]
    # one component: a trailing caret says it is the whole name (PS3.5 6.2.1.2)
    return user.get_username().replace("^", " ").replace("\\", " ")[:63] + "^"


# -- the source ------------------------------------------------------------------------------------------------------


def source_dataset(image: Image) -> Dataset:
    """The stored original's header (no pixels): the hospital's own identifiers, which the objects
    copy so that the PACS files them with their study."""
    if not image.is_dicom or not image.original:
        raise NotDicomSource("Only images that came in as DICOM have findings as DICOM objects.")
    key = _own_key(image.original.name, tenant_id=image.tenant_id, under="dicom", what=f"image {image.pk}")
    try:
        with default_storage.open(key, "rb") as stored:
            dataset = pydicom.dcmread(stored, stop_before_pixels=True)
        blanked = _conformant(dataset)
    except Exception as exc:  # the library's words may quote the file's values: never passed on
        if is_transient(exc):
            raise  # the storage, not the file: the task tries again
        raise Unprocessable("The stored DICOM original could not be read.", code="dicom_source") from None
    if blanked:  # keywords only, never a value
        logger.info("image %s: non-conformant source attributes left out: %s", image.pk, ", ".join(sorted(blanked)))
    if not dataset.get("SOPInstanceUID") or not dataset.get("StudyInstanceUID") or not dataset.get("SOPClassUID"):
        raise Unprocessable("The stored DICOM original has no SOP or Study Instance UID.", code="dicom_no_uid")
    for keyword in TYPE_2_PATIENT_AND_STUDY:  # present, if empty, as PS3.3 asks: the objects copy them
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    if not dataset.get("Modality"):
        dataset.Modality = "OT"
    return dataset


@contextmanager
def _unvalidated_reading() -> Iterator[None]:
    """pydicom validates a value as it first converts it and, in its default mode, logs and warns
    with the value quoted ("Invalid value for VR DA: '...'"); here the values are checked silently
    instead (``_conformant``). The mode is pydicom's global: set for the conversion loop only."""
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = mode


def _valid(element: DataElement) -> bool:
    validator = VALIDATORS.get(element.VR)
    # a UID is kept as the PACS holds it, even a legacy one pydicom frowns on ("1.2.0123"): the
    # objects reference their study and source by it; it names an object, not a person
    if validator is None or element.value is None or element.VR in ("SQ", "UI"):
        return True
    values = element.value if element.VM > 1 else [element.value]
    # a DS or IS converted unvalidated is a number: the text it was read from is what is checked
    return all(value is None or validator(element.VR, getattr(value, "original_string", value))[0] for value in values)


def _conformant(dataset: Dataset, *, nested: bool = False) -> set[str]:
    """Make the source's values conformant before highdicom copies them, silently: a value its VR
    does not allow (a PatientBirthDate of "1970-01-31", a 70-character name component, a PatientSex
    other than M, F or O) is blanked when it is one of the Type 2 Patient and Study attributes the
    objects must carry (``TYPE_2_PATIENT_AND_STUDY``: present, empty, meaning unknown) and left out
    otherwise (UIDs are kept: see ``_valid``). The keywords changed (never their values)."""
    changed: set[str] = set()
    with _unvalidated_reading():
        for tag in list(dataset.keys()):
            try:
                element = dataset[tag]
                ok = _valid(element)
            except Exception:  # pydicom could not even convert it (e.g. an IS of "abc")
                element, ok = None, False
            keyword = keyword_for_tag(tag) or str(tag)  # a private tag by its number
            if ok and element is not None and element.VR == "SQ":
                for item in element.value:
                    changed |= _conformant(item, nested=True)
                continue
            if ok:
                continue
            changed.add(keyword)
            if not nested and keyword in TYPE_2_PATIENT_AND_STUDY:
                dataset[tag] = DataElement(tag, dictionary_VR(tag), "")
            else:
                del dataset[tag]
        sex = dataset.get("PatientSex") if not nested else None
        if sex and str(sex) not in PATIENT_SEXES:  # highdicom takes only these, and says the value if not
            dataset.PatientSex = ""
            changed.add("PatientSex")
    return changed


def _own_key(key: str | None, *, tenant_id: int, under: str, what: str) -> str:
    """``key`` once ``storage_key_for_tenant`` vouches that it is in the hospital's own area
    (``tenants/<id>/<under>/``); a key elsewhere (another hospital's file) is refused and never
    opened."""
    try:
        return storage_key_for_tenant(tenant_id=tenant_id, key=key or "", under=under)
    except ForeignStorageKey:
        logger.warning("%s: a stored file outside hospital %s's storage was refused, not read", what, tenant_id)
        raise Unprocessable(
            "This finding's stored files are not in its hospital's storage: no DICOM object is made of them.",
            code="foreign_storage_key",
        ) from None


def _frames(dataset: Dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _referenced_frames(image: Image, dataset: Dataset) -> list[int] | None:
    """The frame a result is of (Referenced Frame Number is 1-based), for an image of a multi-frame
    IOD; a single-frame IOD's image is referenced whole (a legacy one that carries several frames
    anyway is referenced whole too: its IOD has no frame to name)."""
    multi_frame_iod = is_multiframe_image(dataset)
    return [image.frame_number + 1] if multi_frame_iod and _frames(dataset) > 1 else None


def _source_reference(image: Image, dataset: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    with _building("This image cannot be the source of a DICOM SR (it is not an image a finding can be of)."):
        return hd.sr.SourceImageForMeasurementGroup.from_source_image(
            dataset, referenced_frame_numbers=_referenced_frames(image, dataset)
        )


@contextmanager
def _building(refusal: str, code: str = "dicom_source") -> Iterator[None]:
    """Around every highdicom/pydicom build from the source: any exception becomes ``refusal`` (a
    fixed sentence, never the library's words, which quote the source's values: "Unable to convert
    '1970-01-31' to 'DA'"), with no chained exception for a traceback to print; the libraries'
    warnings (highdicom's quotes a one-part Patient Name) are not shown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except DomainError:
        raise
    except Exception as exc:
        logger.warning("DICOM object not made: %s (%s)", code, type(exc).__name__)
        raise Unprocessable(refusal, code=code) from None


def _measurement_report(*, observation_context, groups: list, source: Dataset) -> hd.sr.MeasurementReport:
    """TID 1500 with the source in its Image Library (optional there): a source whose attributes the
    library cannot describe is still referenced by every group."""
    common = {
        "observation_context": observation_context,
        "procedure_reported": codes.SCT.ImagingProcedure,
        "imaging_measurements": groups,
    }
    try:
        return hd.sr.MeasurementReport(**common, referenced_images=[source])
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        logger.warning("image library left out of an SR: %s", type(exc).__name__)
        return hd.sr.MeasurementReport(**common)


def _check_source(result: Result) -> None:
    if result.request.shadow:
        raise NotDicomSource("A shadow read is never shown, nor sent.")


# -- storing ---------------------------------------------------------------------------------------------------------


def _objects_series(*, study: Study, kind: str, study_uid: str) -> Series:
    """The study's one series for Sightline's objects of ``kind``, made on first use."""
    spec = OBJECT_SERIES[kind]
    uid = object_uid("series", study.tenant_id, study.pk, study_uid, kind)
    found = Series.objects.for_tenant(study.tenant).filter(study=study, series_instance_uid=uid).first()
    if found is not None:
        return found
    with transaction.atomic():
        # the study row's lock serialises series numbering between concurrent makers (PostgreSQL)
        Study.objects.select_for_update().filter(pk=study.pk).first()
        found = Series.objects.for_tenant(study.tenant).filter(study=study, series_instance_uid=uid).first()
        if found is not None:
            return found
        taken = set(Series.objects.filter(study=study).values_list("number", flat=True))
        number = spec.number if spec.number not in taken else max(taken) + 1
        return Series.objects.create(
            tenant=study.tenant,
            study=study,
            number=number,
            series_instance_uid=uid,
            modality=spec.modality,
            description=spec.description,
        )


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _made(tenant, sop_instance_uid: str) -> Instance | None:
    return Instance.objects.for_tenant(tenant).filter(sop_instance_uid=sop_instance_uid).first()


def _store(
    *,
    dataset: Dataset,
    kind: str,
    image: Image,
    series: Series,
    result: Result | None = None,
    review: Review | None = None,
) -> Instance:
    tenant = image.tenant
    with _building("The DICOM object could not be written.", code="dicom_write"):
        data = _encode(dataset)
    name = default_storage.save(_object_key(tenant.pk, dataset.SOPInstanceUID), ContentFile(data))
    try:
        with transaction.atomic():
            instance = Instance.objects.create(
                tenant=tenant,
                study=image.study,
                series=series,
                sop_instance_uid=dataset.SOPInstanceUID,
                sop_class_uid=dataset.SOPClassUID,
                transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
                modality=dataset.Modality,
                instance_number=int(dataset.InstanceNumber),
                frames=_frames(dataset) if "PixelData" in dataset else 0,
                rows=dataset.get("Rows"),
                columns=dataset.get("Columns"),
                file=name,
                byte_size=len(data),
                origin=Instance.Origin.CREATED,
                source_image=image,
                result=result,
                review=review,
                kind=kind,
            )
            access_event_record(
                action="dicom.object_create",
                username=SYSTEM_ACTOR,
                tenant=tenant,
                target_type="dicom_instance",
                target_id=instance.pk,
            )
    except IntegrityError:
        # a concurrent maker derived the same UID and stored it first: its object is this one
        existing = _made(tenant, dataset.SOPInstanceUID)
        if existing is None or existing.file.name != name:
            default_storage.delete(name)
        if existing is None:
            raise
        return existing
    except BaseException:
        default_storage.delete(name)  # the row is not there: neither is its file
        raise
    logger.info("made DICOM %s %s for tenant %s", kind, instance.pk, tenant.pk)
    return instance


def _content_datetime(moment) -> dict:
    local = timezone.localtime(moment)
    return {"content_date": local.date(), "content_time": local.time()}


def _timezone_offset(dataset: Dataset, moment) -> None:
    offset = timezone.localtime(moment).utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    dataset.TimezoneOffsetFromUTC = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _sr_common(version: ModelVersion | None = None) -> dict:
    common = {"manufacturer": MANUFACTURER, "manufacturer_model_name": "Sightline"}
    if version is not None:
        common["software_versions"] = f"{version.model.name} {version.version}"[:64]
    return common


def _read_instance(instance: Instance) -> Dataset:
    key = _own_key(instance.file.name, tenant_id=instance.tenant_id, under="dicom-made", what=f"instance {instance.pk}")
    with default_storage.open(key, "rb") as stored:
        return pydicom.dcmread(stored, stop_before_pixels=True)


def _result_rows(result: Result) -> Result:
    return Result.objects.select_related(
        "tenant", "request", "image__tenant", "image__study", "model_version__model"
    ).get(pk=result.pk)


# -- the AI finding ----------------------------------------------------------------------------------------------------


def _findings(result: Result) -> list[tuple[str, float]]:
    """(label, probability) of each finding: the top label (single-label), or each label above its
    threshold (multi-label; the top label when none is)."""
    probabilities = result.probabilities or {}
    labels = [label for label in (result.positive_labels or []) if label in probabilities]
    if not labels:
        return [(result.top_label, float(result.top_probability))]
    return [(label, float(probabilities[label])) for label in labels]


def tracking_uid(result: Result, label: str) -> str:
    """The Tracking Unique Identifier of a finding: the AI SR's and every review SR's group of it."""
    return object_uid("tracking", result.tenant_id, result.pk, result.created.isoformat(), label)


def ai_report_for(result: Result) -> Instance:
    """The AI finding of ``result`` as a TID 1500 Comprehensive 3D SR in the source image's study:
    made and stored on the first call, the same Instance on every later one."""
    result = _result_rows(result)
    image = result.image
    existing = Instance.objects.for_tenant(result.tenant).filter(result=result, kind=Kind.AI_SR).first()
    if existing is not None:
        return existing
    _check_source(result)
    source = source_dataset(image)
    sop_instance_uid = object_uid(Kind.AI_SR, result.tenant_id, result.pk, result.created.isoformat())
    if (made := _made(result.tenant, sop_instance_uid)) is not None:
        return made
    version = result.model_version
    with _building(AI_SR_REFUSAL):
        report = _ai_report(result, image, source)
    series = _objects_series(study=image.study, kind=Kind.AI_SR, study_uid=source.StudyInstanceUID)
    with _building(AI_SR_REFUSAL):
        document = hd.sr.Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=series.series_instance_uid,
            series_number=series.number,
            sop_instance_uid=sop_instance_uid,
            instance_number=result.pk,
            is_complete=True,
            is_final=False,  # preliminary: a clinician has not read it yet
            is_verified=False,
            series_description=OBJECT_SERIES[Kind.AI_SR].description,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **_content_datetime(result.created),
            **_sr_common(version),
        )
        _private_scheme_identified(document)
        _timezone_offset(document, result.created)
    return _store(dataset=document, kind=Kind.AI_SR, image=image, series=series, result=result)


def _ai_report(result: Result, image: Image, source: Dataset) -> hd.sr.MeasurementReport:
    version = result.model_version
    algorithm = _algorithm(version)
    groups = []
    for index, (label, probability) in enumerate(_findings(result), start=1):
        code = label_code(version, label)
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(result, label), identifier=f"AI finding {index}: {label}"[:64]
            ),
            finding_type=code,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability,
                    value=round(probability, PROBABILITY_DIGITS),
                    unit=UCUM_NO_UNITS,
                    algorithm_id=algorithm,
                )
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=AI_FINDING, value=code)],
            source_images=[_source_reference(image, source)],
        )
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=codes.DCM.Comment, value=AI_NOTICE, relationship_type="CONTAINS")
        )
        groups.append(group)
    return _measurement_report(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_observer(version)),
        groups=groups,
        source=source,
    )


# -- the clinician's review --------------------------------------------------------------------------------------------


def _review_rows(review: Review) -> Review:
    return Review.objects.select_related(
        "tenant", "image__tenant", "image__study", "result__model_version__model", "result__request",
        "signed_off_by", "amends",
    ).get(pk=review.pk)  # fmt: skip


def _person_observer(user, tenant) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=person_name(user), login_name=user.get_username()[:64], organization_name=tenant.name[:64]
        ),
    )


def review_report_for(review: Review) -> Instance:
    """A signed-off review as a TID 1500 SR that settles the AI SR (its predecessor; an amendment's
    predecessor is the review SR it amends): the verdict and the clinician's label as codes, the
    signer as person observer and verifying observer, at the sign-off time."""
    review = _review_rows(review)
    signed_off_at = review.signed_off_at
    if signed_off_at is None:
        raise NotSignedOff("A review becomes a DICOM object once it is signed off.")
    existing = Instance.objects.for_tenant(review.tenant).filter(review=review, kind=Kind.REVIEW_SR).first()
    if existing is not None:
        return existing
    result, image = review.result, review.image
    if result is None:
        raise NotDicomSource("This review has no AI finding to report on.")
    ai = ai_report_for(result)
    ai_dataset = _read_instance(ai)
    earlier_dataset = None
    if review.amends is not None and review.amends.is_signed:
        earlier_dataset = _read_instance(review_report_for(review.amends))
    source = source_dataset(image)
    sop_instance_uid = object_uid(Kind.REVIEW_SR, review.tenant_id, review.pk, signed_off_at.isoformat())
    if (made := _made(review.tenant, sop_instance_uid)) is not None:
        return made
    version, signer = result.model_version, review.signed_off_by or review.author
    label = review.label or (result.top_label if review.verdict == Review.Verdict.AGREE else "")
    with _building(REVIEW_SR_REFUSAL):
        evaluations = [
            hd.sr.QualitativeEvaluation(name=VERDICT, value=VERDICT_CODES[review.verdict]),
            hd.sr.QualitativeEvaluation(name=AI_FINDING_REVIEWED, value=label_code(version, review.ai_label)),
        ]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(result, review.ai_label or result.top_label),
                identifier=f"Review of AI finding: {review.ai_label or result.top_label}"[:64],
            ),
            finding_type=label_code(version, label) if label else None,
            qualitative_evaluations=evaluations,
            source_images=[_source_reference(image, source)],
        )
        if review.comment:
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(name=codes.DCM.Comment, value=review.comment, relationship_type="CONTAINS")
            )
        report = _measurement_report(
            observation_context=hd.sr.ObservationContext(
                observer_person_context=_person_observer(signer, review.tenant)
            ),
            groups=[group],
            source=source,
        )
    series = _objects_series(study=image.study, kind=Kind.REVIEW_SR, study_uid=source.StudyInstanceUID)
    with _building(REVIEW_SR_REFUSAL):
        evidence = [source, ai_dataset, *([earlier_dataset] if earlier_dataset is not None else [])]
        predecessor = earlier_dataset if earlier_dataset is not None else ai_dataset
        document = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=series.series_instance_uid,
            series_number=series.number,
            sop_instance_uid=sop_instance_uid,
            instance_number=review.pk,
            is_complete=True,
            is_final=True,
            is_verified=True,
            verifying_observer_name=person_name(signer),
            verifying_organization=review.tenant.name[:64],
            previous_versions=[predecessor],
            series_description=OBJECT_SERIES[Kind.REVIEW_SR].description,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **_content_datetime(signed_off_at),
            **_sr_common(version),
        )
        signed = timezone.localtime(signed_off_at)
        document.VerifyingObserverSequence[0].VerificationDateTime = signed.strftime("%Y%m%d%H%M%S.%f%z")
        _private_scheme_identified(document)
        _timezone_offset(document, signed_off_at)
    return _store(dataset=document, kind=Kind.REVIEW_SR, image=image, series=series, review=review)


# -- the heatmap -------------------------------------------------------------------------------------------------------


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation, or the nearest one from its Image Orientation (Patient)."""
    given = source.get("PatientOrientation")
    if given and len(given) == 2 and all(given):
        return str(given[0]), str(given[1])
    cosines = source.get("ImageOrientationPatient")
    if not cosines or len(cosines) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))  # -x/+x, -y/+y, -z/+z (LPS)

    def nearest(vector) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][int(vector[axis] > 0)]

    values = [float(v) for v in cosines]
    return nearest(values[:3]), nearest(values[3:])


def _blended(image: Image, result: Result) -> np.ndarray:
    """The heatmap laid over the image's display copy, as the viewer shows it: RGB, 8 bits."""
    display = _own_key(image.file.name, tenant_id=image.tenant_id, under="images", what=f"image {image.pk}")
    heatmap = _own_key(result.heatmap.name, tenant_id=result.tenant_id, under="heatmaps", what=f"result {result.pk}")
    with default_storage.open(display, "rb") as stored, PILImage.open(stored) as base:
        base.load()
        under = base.convert("RGBA")
    with default_storage.open(heatmap, "rb") as stored, PILImage.open(stored) as overlay:
        overlay.load()
        over = overlay.convert("RGBA")
    if over.size != under.size:
        over = over.resize(under.size, PILImage.Resampling.BILINEAR)
    return np.asarray(PILImage.alpha_composite(under, over).convert("RGB"), dtype=np.uint8)


def heatmap_object_for(result: Result) -> Instance | None:
    """The result's Grad-CAM heatmap over its image as an RGB Secondary Capture in the study; None
    while it is not made yet (this asks a worker for it, once, after commit: call again later) or
    when it can never be (``result_heatmap_status`` then says "unavailable")."""
    result = _result_rows(result)
    image = result.image
    existing = Instance.objects.for_tenant(result.tenant).filter(result=result, kind=Kind.MAP).first()
    if existing is not None:
        return existing
    _check_source(result)
    if not result.heatmap:
        result_heatmap_request(result_id=result.pk)
        return None
    if not image.file:
        return None  # no display copy (yet): nothing to lay the heatmap over
    source = source_dataset(image)
    sop_instance_uid = object_uid(Kind.MAP, result.tenant_id, result.pk, result.created.isoformat())
    if (made := _made(result.tenant, sop_instance_uid)) is not None:
        return made
    pixels = _blended(image, result)
    series = _objects_series(study=image.study, kind=Kind.MAP, study_uid=source.StudyInstanceUID)
    local = timezone.localtime(result.created)
    with _building(MAP_REFUSAL):
        orientation = _patient_orientation(source)
        document = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series.series_instance_uid,
            series_number=series.number,
            sop_instance_uid=sop_instance_uid,
            instance_number=result.pk,
            manufacturer=MANUFACTURER,
            patient_orientation=orientation or ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=OBJECT_SERIES[Kind.MAP].description,
            manufacturer_model_name="Sightline",
            software_versions=f"{result.model_version.model.name} {result.model_version.version}"[:64],
            content_date=local.date(),
            content_time=local.time(),
        )
        if orientation is None:
            document["PatientOrientation"].value = None  # type 2: unknown, rather than made up
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frames := _referenced_frames(image, source):
            reference.ReferencedFrameNumber = frames[0]
        document.SourceImageSequence = [reference]
        document.DerivationDescription = (
            f"Grad-CAM of the finding {result.top_label!r} of {result.model_version.model.name} "
            f"{result.model_version.version}, blended over the image"
        )[:1024]
        document.ImageComments = MAP_NOTICE
        document.BurnedInAnnotation = "NO"
        document.DateOfSecondaryCapture = DA(local.date())
        document.TimeOfSecondaryCapture = TM(local.time().replace(microsecond=0))
        _timezone_offset(document, result.created)
    return _store(dataset=document, kind=Kind.MAP, image=image, series=series, result=result)


def heatmap_ensure(result: Result, *, timeout: float, poll: float = 0.5) -> str:
    """Ask for the result's heatmap and wait up to ``timeout`` seconds for a worker to make it: the
    HeatmapStatus it ends in (ready, computing: not yet, unavailable: never). Call it outside a
    transaction: the request reaches the worker after commit. A Celery task would rather call
    ``heatmap_object_for`` and retry itself later than hold a worker here."""
    deadline = time.monotonic() + timeout
    state = result_heatmap_request(result_id=result.pk)
    while state.status == HeatmapStatus.COMPUTING and time.monotonic() < deadline:
        time.sleep(poll)
        fresh = Result.objects.select_related("model_version").get(pk=result.pk)
        state = type(state)(result_heatmap_status(fresh), fresh)
    return state.status


def objects_for_result(result: Result, *, with_map: bool = True) -> list[Instance]:
    """What a sender sends for an AI result: its SR, and its heatmap SC once made."""
    made = [ai_report_for(result)]
    if with_map and (heatmap := heatmap_object_for(result)) is not None:
        made.append(heatmap)
    return made
