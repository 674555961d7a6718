"""Uploads: check by content, re-encode, store, record, and queue the AI read."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, replace
from datetime import date

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import access_event_record, require
from config.errors import Conflict, TooLarge, Unprocessable, UnsupportedMedia
from config.pseudonym import PATIENT, pseudonym_candidates, pseudonym_for

from .. import dicom
from ..models import Image, Series, Study
from ..storage import dicom_key, image_key
from .inference import inference_request_create, upload_routing
from .registry import Routing
from .studies import study_summary_refresh, study_updated_on_commit

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG"}
# Modes stored as they are; everything else becomes RGB (or L when it has no colour).
_KEPT_MODES = {"L", "RGB", "I;16", "I;16B", "I;16L"}


@dataclass(frozen=True)
class ValidatedImage:
    content: bytes  # re-encoded PNG, free of metadata
    width: int
    height: int
    original_format: str
    sha256: str


def _read_upload(upload) -> bytes:
    limit = settings.SIGHTLINE_MAX_UPLOAD_BYTES
    if upload.size is not None and upload.size > limit:
        raise TooLarge(f"The file is larger than {limit // (1024 * 1024)} MB.")
    data = upload.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"The file is larger than {limit // (1024 * 1024)} MB.")
    if not data:
        raise Unprocessable("The file is empty.", code="empty_file")
    return data


def image_validate(upload) -> ValidatedImage:
    """Read the file's content (never its name or Content-Type) and re-encode it as PNG."""
    return _validate_bytes(_read_upload(upload))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # measured (make bench): level 6 spent 13 ms of a 512² upload, level 1 about 9, same pixels
    PILImage.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _validate_bytes(data: bytes) -> ValidatedImage:
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if image.format not in ACCEPTED_FORMATS:
                raise UnsupportedMedia(
                    f"{image.format} images are not accepted; send PNG, JPEG or DICOM.",
                    code="unsupported_format",
                )
            width, height = image.size
            if width * height > settings.SIGHTLINE_MAX_IMAGE_PIXELS:
                raise TooLarge(
                    f"The image has {width}x{height} pixels; the limit is "
                    f"{settings.SIGHTLINE_MAX_IMAGE_PIXELS:,} pixels.",
                    code="too_many_pixels",
                )
            original_format = image.format
            image.load()  # a truncated or damaged file fails here, before anything is stored
            clean = _normalise_mode(image)
            clean.info = {}  # no text chunks, EXIF or ICC profile in the stored copy
            buffer = io.BytesIO()
            # measured (make bench): level 6 spent 13 ms of a 512² upload, level 1 about 9, same pixels
            clean.save(buffer, format="PNG", compress_level=1)
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(
            "The file is not an image this service can read; send PNG, JPEG or DICOM.",
            code="not_an_image",
        ) from exc
    except PILImage.DecompressionBombError as exc:
        raise TooLarge("The image has too many pixels.", code="too_many_pixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise Unprocessable("The image is damaged or truncated and cannot be read.", code="damaged_image") from exc
    content = buffer.getvalue()
    return ValidatedImage(
        content=content,
        width=width,
        height=height,
        original_format=original_format,
        sha256=hashlib.sha256(content).hexdigest(),
    )


def _normalise_mode(image: PILImage.Image) -> PILImage.Image:
    if image.mode in _KEPT_MODES:
        return image
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode == "I":  # 16-bit PNGs open as 32-bit grey: store them back as 16 bits
        pixels = np.asarray(image)
        if pixels.min() >= 0 and pixels.max() < 65536:
            return PILImage.fromarray(pixels.astype(np.uint16))
        return image.convert("L")
    return image.convert("RGB")


@dataclass(frozen=True)
class StudyFields:
    patient_pseudonym: str = ""
    accession_number: str = ""
    modality: str = ""
    description: str = ""
    study_date: date | None = None


def _study_for_upload(*, tenant, fields: StudyFields) -> tuple[Study, bool]:
    """The study an upload belongs to, and whether it was made now."""
    if fields.accession_number:
        study, created = Study.objects.for_tenant(tenant).get_or_create(
            tenant=tenant,
            accession_number=fields.accession_number,
            defaults={
                "patient_pseudonym": fields.patient_pseudonym,
                "modality": fields.modality,
                "description": fields.description,
                "study_date": fields.study_date,
            },
        )
        # an accession number names one patient's study: never file an image under another patient
        if not created and fields.patient_pseudonym and fields.patient_pseudonym != study.patient_pseudonym:
            raise Conflict(
                "This accession number belongs to a study of another patient; check the patient id.",
                code="accession_patient_mismatch",
            )
        return study, created
    study = Study.objects.create(
        tenant=tenant,
        patient_pseudonym=fields.patient_pseudonym,
        modality=fields.modality,
        description=fields.description,
        study_date=fields.study_date,
    )
    return study, True


def image_upload(
    *, membership: Membership, upload, study: StudyFields | None = None, request=None, read: bool = True
) -> Image:
    """Store one file for the member's hospital; the first image it became (see images_upload)."""
    return images_upload(membership=membership, upload=upload, study=study, request=request, read=read)[0]


def images_upload(
    *, membership: Membership, upload, study: StudyFields | None = None, request=None, read: bool = True
) -> list[Image]:
    """Store one file for the member's hospital and queue its AI read after commit (``read``;
    a bulk job queues its reads when it starts). A DICOM file becomes one image per frame."""
    require(membership, Action.IMAGE_UPLOAD, request=request)
    tenant = membership.tenant
    routing = upload_routing(tenant=tenant) if read else None  # 503 before storing anything if no model
    data = _read_upload(upload)
    if dicom.looks_like_dicom(data):
        return _dicom_upload(
            membership=membership, data=data, fields=study or StudyFields(), request=request, routing=routing
        )
    validated = _validate_bytes(data)
    stored_name = default_storage.save(image_key(tenant_id=tenant.pk), ContentFile(validated.content))
    try:
        with transaction.atomic():
            study_row, new_study = _study_for_upload(tenant=tenant, fields=study or StudyFields())
            series, _ = Series.objects.get_or_create(
                tenant=tenant, study=study_row, number=1, defaults={"modality": study_row.modality}
            )
            image = Image.objects.create(
                tenant=tenant,
                study=study_row,
                series=series,
                file=stored_name,
                sha256=validated.sha256,
                width=validated.width,
                height=validated.height,
                format=validated.original_format,
                byte_size=len(validated.content),
                uploaded_by=membership.user,
            )
            if read:
                inference_request_create(image=image, model_version=routing.version_for(image.pk))
            if new_study:  # its worklist columns are known without looking: one image, its read queued
                Study.objects.filter(pk=study_row.pk).update(
                    image_count=1, ai_status=Study.AIStatus.QUEUED if read else Study.AIStatus.NONE
                )
                study_updated_on_commit([study_row])
            else:
                study_summary_refresh([study_row.pk])
            _record_upload(membership, image, request)
    except BaseException:
        # no row points at the stored bytes: remove them, so nothing is half-written
        default_storage.delete(stored_name)
        raise
    logger.info("image %s stored for tenant %s", image.pk, tenant.pk)
    return [image]


def _record_upload(membership: Membership, image: Image, request) -> None:
    access_event_record(
        action="image.upload",
        request=request,
        user=membership.user,
        tenant=membership.tenant,
        target_type="image",
        target_id=image.pk,
    )


def _patient_pseudonym(tenant, patient_id: str) -> str:
    """A DICOM Patient ID is an identifier: the platform keeps a keyed hash of it, the same for
    the same patient within one hospital, and different between hospitals (config.pseudonym)."""
    return pseudonym_for(patient_id, purpose=PATIENT, scope=tenant.pk)


def _dicom_study(tenant, header: dict, fields: StudyFields) -> Study:
    pseudonym = fields.patient_pseudonym or _patient_pseudonym(tenant, header["patient_id"])
    # the patient's pseudonym under every key of the ring: a study made before a key rotation
    # is still this patient's
    known = (
        {pseudonym}
        if fields.patient_pseudonym
        else set(pseudonym_candidates(header["patient_id"], purpose=PATIENT, scope=tenant.pk))
    )
    study_fields = StudyFields(
        patient_pseudonym=pseudonym,
        accession_number=fields.accession_number or header["accession_number"],
        modality=fields.modality or header["modality"],
        description=fields.description or header["study_description"],
        study_date=fields.study_date or header["study_date"],
    )
    uid = header["study_instance_uid"]
    if uid:
        existing = Study.objects.for_tenant(tenant).filter(study_instance_uid=uid).first()
        if existing is not None:
            if pseudonym and existing.patient_pseudonym and existing.patient_pseudonym not in known:
                raise Conflict(
                    "This study belongs to another patient; check the file's Patient ID.",
                    code="study_patient_mismatch",
                )
            return existing
    if pseudonym and study_fields.accession_number:  # the accession's study, made under an older key
        earlier = (
            Study.objects.for_tenant(tenant)
            .filter(accession_number=study_fields.accession_number, patient_pseudonym__in=known)
            .values_list("patient_pseudonym", flat=True)
            .first()
        )
        study_fields = replace(study_fields, patient_pseudonym=earlier or pseudonym)
    study, _ = _study_for_upload(tenant=tenant, fields=study_fields)
    if uid and not study.study_instance_uid:
        study.study_instance_uid = uid
        study.save(update_fields=["study_instance_uid"])
    return study


def _dicom_series(tenant, study: Study, header: dict) -> Series:
    uid = header["series_instance_uid"]
    if uid:
        existing = Series.objects.for_tenant(tenant).filter(study=study, series_instance_uid=uid).first()
        if existing is not None:
            return existing
    taken = set(Series.objects.filter(study=study).values_list("number", flat=True))
    number = header["series_number"]
    if number is None or number < 0 or number in taken:
        number = max(taken, default=0) + 1
    return Series.objects.create(
        tenant=tenant,
        study=study,
        number=number,
        series_instance_uid=uid,
        modality=header["modality"],
        description=header["series_description"],
    )


def _dicom_upload(
    *, membership: Membership, data: bytes, fields: StudyFields, request, routing: Routing | None
) -> list[Image]:
    """Parse with limits, render every frame for display and the model, keep the original with
    its preamble zeroed. An encoding no decoder here reads is kept as unprocessable (415)."""
    try:
        parsed = dicom.parse(
            data, max_pixels=settings.SIGHTLINE_MAX_IMAGE_PIXELS, max_frames=settings.SIGHTLINE_MAX_DICOM_FRAMES
        )
        renders = [_png(dicom.frame_display(parsed, index)) for index in range(parsed.frames)]
    except dicom.DicomTooLarge as exc:
        raise TooLarge(exc.message, code=exc.code) from exc
    except dicom.DicomUnsupportedSyntax as exc:
        (image,) = _store_dicom(
            membership=membership, data=data, header=exc.header, fields=fields, request=request, reason=exc.message
        )
        raise UnsupportedMedia(
            f"{exc.message} The file is kept, marked unprocessable.", code=exc.code, detail={"image": image.pk}
        ) from exc
    except dicom.DicomUnreadable as exc:
        raise Unprocessable(exc.message, code=exc.code) from exc
    header = {
        **{key: getattr(parsed, key) for key in _HEADER_KEYS},
        "rows": parsed.rows,
        "columns": parsed.columns,
        "photometric": parsed.photometric,
        "window": None if parsed.is_color else parsed.default_window,
    }
    return _store_dicom(
        membership=membership,
        data=data,
        header=header,
        fields=fields,
        request=request,
        renders=renders,
        routing=routing,
    )


_HEADER_KEYS = (
    "patient_id",
    "study_instance_uid",
    "accession_number",
    "study_date",
    "study_description",
    "modality",
    "series_instance_uid",
    "series_number",
    "series_description",
    "sop_instance_uid",
    "instance_number",
)


def _store_dicom(
    *,
    membership: Membership,
    data: bytes,
    header: dict,
    fields: StudyFields,
    request,
    renders: list[bytes] = (),
    reason: str = "",
    routing: Routing | None = None,
) -> list[Image]:
    tenant = membership.tenant
    stored: list[str] = []
    try:
        original = ContentFile(dicom.anonymized_preamble(data))
        stored.append(default_storage.save(dicom_key(tenant_id=tenant.pk), original))
        names = [default_storage.save(image_key(tenant_id=tenant.pk), ContentFile(png)) for png in renders]
        stored.extend(names)
        with transaction.atomic():
            study = _dicom_study(tenant, header, fields)
            series = _dicom_series(tenant, study, header)
            window = header.get("window")
            common = {
                "tenant": tenant,
                "study": study,
                "series": series,
                "original": stored[0],
                "sop_instance_uid": header["sop_instance_uid"],
                "instance_number": header["instance_number"],
                "photometric": header.get("photometric", ""),
                "window_center": window[0] if window else None,
                "window_width": window[1] if window else None,
                "format": "DICOM",
                "width": header["columns"],
                "height": header["rows"],
                "uploaded_by": membership.user,
            }
            if reason:
                images = [
                    Image.objects.create(
                        **common, unprocessable_reason=reason[:300], sha256="", byte_size=len(data), file=""
                    )
                ]
            else:
                images = [
                    Image.objects.create(
                        **common,
                        file=name,
                        frame_number=index,
                        sha256=hashlib.sha256(png).hexdigest(),
                        byte_size=len(png),
                    )
                    for index, (name, png) in enumerate(zip(names, renders, strict=True))
                ]
                for image in images if routing else ():
                    inference_request_create(image=image, model_version=routing.version_for(image.pk))
            study_summary_refresh([study.pk])
            for image in images:
                _record_upload(membership, image, request)
    except BaseException:
        for name in stored:
            default_storage.delete(name)
        raise
    logger.info("DICOM stored for tenant %s as %d image(s)", tenant.pk, len(images))
    return images
