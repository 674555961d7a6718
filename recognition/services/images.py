"""Uploads: check by content, store as received, record, and queue the AI read; and the
worker step that renders what the request did not (``images_render``).

A PNG or JPEG upload is decoded in the request only as far as refusing a damaged or truncated
file needs (422), never re-encoded there: its bytes are stored as they came as the image's
``original`` and the image is recorded ``received``. The worker makes the sanitised display
copy (``recognition.display``) from the decode the model needs anyway, in the read's own pass
(or ``images_render`` when no read is waiting), and the original is deleted once the copy
exists. A browser is only ever sent the display copy, never an original.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.db.models.fields.files import FieldFile
from django.utils import timezone
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from pydicom.filereader import _read_file_meta_info

from accounts import events
from accounts.access import member_action_record
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.bulk import rows_update
from core.errors import Conflict, Invalid, TooLarge, Unavailable, Unprocessable, UnsupportedMedia
from core.pseudonym import PATIENT, patient_pseudonym_of, pseudonym_candidates, pseudonym_for

from .. import dicom
from ..display import DisplayCopy, display_copy
from ..enqueue import task_send
from ..models import REASON_LENGTH, Image, InferenceRequest, ModelVersion, Series, Study, UploadKey
from ..storage import dicom_key, image_key, original_key, pixels_key
from .inference import inference_queue, inference_request_create, upload_routing
from .registry import Routing, version_for
from .screening import Screen, ScreenPlan, preliminary_store, read_routed, route_priority, screen_plan
from .studies import study_summary_refresh, study_updated_on_commit

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # format → the original's file suffix
# A JPEG is checked at 1/8 scale: libjpeg still reads every entropy-coded segment (so a
# truncated or damaged stream fails as it does at full size) but skips most of the inverse DCT
# and colour conversion: measured 0.95 ms against 1.62 for a 512² JPEG (0.24 and 0.26 at 224²).
JPEG_CHECK_SCALE = 8
RENDER_RECONCILE_MAX = 10_000  # stalled images woken per reconciliation pass; the next pass takes the rest


@dataclass(frozen=True)
class CheckedImage:
    """What the request learns from a PNG/JPEG upload it has checked."""

    format: str
    width: int
    height: int


@dataclass(frozen=True)
class ValidatedImage:
    content: bytes  # the display copy, free of metadata
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
    """Decode a PNG/JPEG upload in full (refused in words, as an upload is) and make its display
    copy: what the worker does with an upload, in one call (the benchmarks and tests use it)."""
    data = _read_upload(upload)
    opened = _opened(data, full=True)
    with opened as image:
        checked = CheckedImage(opened.format, *image.size)
        copy = display_copy(image, checked.format)
    return ValidatedImage(
        content=copy.content,
        width=checked.width,
        height=checked.height,
        original_format=checked.format,
        sha256=copy.sha256,
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # measured (make bench): level 6 spent 13 ms of a 512² upload, level 1 about 9, same pixels
    PILImage.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class _opened:
    """``with _opened(data, full=...) as image``: the upload opened and decoded, with every
    refusal in words: not an image or not PNG/JPEG (415), too many pixels (413), damaged or
    truncated (422). ``full=False``: a JPEG is decoded at reduced scale, enough to check it."""

    def __init__(self, data: bytes, *, full: bool) -> None:
        self.data, self.full = data, full
        self.image: PILImage.Image | None = None
        self.format = ""  # one of ACCEPTED_FORMATS once opened
        self.size = (0, 0)  # as the file declares it (a drafted JPEG reports its reduced size)

    def __enter__(self) -> PILImage.Image:
        try:
            image = self.image = PILImage.open(io.BytesIO(self.data))
            if image.format not in ACCEPTED_FORMATS:
                raise UnsupportedMedia(
                    f"{image.format} images are not accepted; send PNG, JPEG or DICOM.",
                    code="unsupported_format",
                )
            self.format = image.format
            width, height = self.size = image.size
            if width * height > settings.SIGHTLINE_MAX_IMAGE_PIXELS:
                raise TooLarge(
                    f"The image has {width}x{height} pixels; the limit is "
                    f"{settings.SIGHTLINE_MAX_IMAGE_PIXELS:,} pixels.",
                    code="too_many_pixels",
                )
            if image.format == "JPEG" and not self.full:
                scale = JPEG_CHECK_SCALE
                image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
            image.load()  # a truncated or damaged file fails here, before anything is stored
            return image
        except UnidentifiedImageError as exc:
            self.close()
            raise UnsupportedMedia(
                "The file is not an image this service can read; send PNG, JPEG or DICOM.",
                code="not_an_image",
            ) from exc
        except PILImage.DecompressionBombError as exc:
            self.close()
            raise TooLarge("The image has too many pixels.", code="too_many_pixels") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            self.close()
            raise Unprocessable("The image is damaged or truncated and cannot be read.", code="damaged_image") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.image is not None:
            self.image.close()

    def __exit__(self, *exc) -> None:
        self.close()


def image_check(data: bytes) -> CheckedImage:
    """The request's check of a PNG/JPEG upload: decoded as far as refusing damage needs (a PNG
    in full, a JPEG at reduced scale), never re-encoded. Raises the refusals ``_opened`` names."""
    opened = _opened(data, full=False)
    with opened:
        return CheckedImage(opened.format, *opened.size)


@dataclass(frozen=True)
class StudyFields:
    patient_pseudonym: str = ""
    accession_number: str = ""
    modality: str = ""
    description: str = ""
    study_date: date | None = None


def _study_for_upload(*, tenant, fields: StudyFields, summary: dict | None = None) -> tuple[Study, bool]:
    """The study an upload belongs to, and whether it was made now (with ``summary``'s worklist
    columns, when the caller knows them: one statement instead of an INSERT and an UPDATE)."""
    summary = summary or {}
    if fields.accession_number:
        study, created = Study.objects.for_tenant(tenant).get_or_create(
            tenant=tenant,
            accession_number=fields.accession_number,
            defaults={
                "patient_pseudonym": fields.patient_pseudonym,
                "modality": fields.modality,
                "description": fields.description,
                "study_date": fields.study_date,
                **summary,
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
        **summary,
    )
    return study, True


def image_upload(
    *,
    membership: Membership,
    upload,
    study: StudyFields | None = None,
    request=None,
    read: bool = True,
    screen: Screen | None = None,
) -> Image:
    """Store one file for the member's hospital; the first image it became (see images_upload)."""
    return images_upload(membership=membership, upload=upload, study=study, request=request, read=read, screen=screen)[
        0
    ]


def images_upload(
    *,
    membership: Membership,
    upload,
    study: StudyFields | None = None,
    request=None,
    read: bool = True,
    read_as: Routing | None = None,
    screen: Screen | None = None,
) -> list[Image]:
    """Store one file for the member's hospital and queue its AI read after commit (``read``;
    a bulk job queues its reads when it starts). A DICOM file becomes one image per frame.
    ``read_as``: the routing ``upload_routing`` gave for a named version, lane or protocol.
    ``screen``: the browser's screen that came with it (services/screening.py), stored as the
    image's preliminary in the same transaction and routing its read."""
    require(membership, Action.IMAGE_UPLOAD, request=request)
    routing = (read_as or upload_routing(tenant=membership.tenant)) if read else None  # 503 before storing
    plan = screen_plan(tenant=membership.tenant, screen=screen)  # 422 before storing
    return _images_from_bytes(
        membership=membership,
        data=_read_upload(upload),
        fields=study or StudyFields(),
        request=request,
        routing=routing,
        plan=plan,
    )


IDEMPOTENCY_KEY_MAX = 128


def images_upload_once(
    *,
    membership: Membership,
    upload,
    study: StudyFields | None = None,
    idempotency_key: str = "",
    request=None,
    read_as: Routing | None = None,
    screen: Screen | None = None,
) -> tuple[list[Image], bool]:
    """``images_upload`` for a client that may retry: the same ``idempotency_key`` in the same
    hospital answers the image(s) of the first try (and False: nothing was created); the same key
    with another file or other study fields is refused in words. A replay stores no second
    preliminary: the screen is not part of what the key names (a retry screens again)."""
    if not idempotency_key:
        images = images_upload(
            membership=membership, upload=upload, study=study, request=request, read_as=read_as, screen=screen
        )
        return images, True
    if len(idempotency_key) > IDEMPOTENCY_KEY_MAX or not idempotency_key.isascii() or not idempotency_key.isprintable():
        raise Invalid(
            f"The Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} printable ASCII characters.",
            code="bad_idempotency_key",
        )
    require(membership, Action.IMAGE_UPLOAD, request=request)
    tenant, fields = membership.tenant, study or StudyFields()
    data = _read_upload(upload)
    fingerprint = hashlib.sha256(
        data + json.dumps([str(getattr(fields, name)) for name in StudyFields.__dataclass_fields__]).encode()
    ).hexdigest()
    if (earlier := _upload_replay(membership, idempotency_key, fingerprint, request)) is not None:
        return earlier, False
    routing = read_as or upload_routing(tenant=tenant)
    plan = screen_plan(tenant=tenant, screen=screen)

    def remember(images: list[Image]) -> None:  # in the upload's own transaction: both or neither
        UploadKey.objects.create(
            tenant=tenant,
            key=idempotency_key,
            fingerprint=fingerprint,
            image_ids=[image.pk for image in images],
            created_by=membership.user,
        )

    try:
        images = _images_from_bytes(
            membership=membership,
            data=data,
            fields=fields,
            request=request,
            routing=routing,
            on_stored=remember,
            plan=plan,
        )
    except IntegrityError:
        # a concurrent try with the same key won the unique constraint; this one stored nothing
        earlier = _upload_replay(membership, idempotency_key, fingerprint, request)
        if earlier is None:
            raise
        return earlier, False
    return images, True


def _upload_replay(membership: Membership, key: str, fingerprint: str, request) -> list[Image] | None:
    earlier = UploadKey.objects.for_tenant(membership.tenant).filter(key=key).first()
    if earlier is None:
        return None
    if not hmac.compare_digest(earlier.fingerprint, fingerprint):
        raise Unprocessable(
            "This Idempotency-Key was already used for a different upload (another file or other study "
            "fields); use a new key for a new upload.",
            code="idempotency_key_reused",
        )
    images = list(Image.objects.for_tenant(membership.tenant).filter(pk__in=earlier.image_ids).order_by("pk"))
    if not images:
        raise Conflict(
            "The images this Idempotency-Key made have since been deleted; use a new key to upload again.",
            code="idempotency_key_gone",
        )
    for image in images:
        member_action_record(
            membership, "image.upload_replayed", request=request, target_type="image", target_id=image.pk
        )
    return images


OnStored = Callable[[list[Image]], None] | None


def _images_from_bytes(
    *,
    membership: Membership,
    data: bytes,
    fields: StudyFields,
    request,
    routing: Routing | None,
    on_stored: OnStored = None,
    plan: ScreenPlan | None = None,
) -> list[Image]:
    """``routing``: the AI read to queue (None: no read now, a bulk job's item). ``plan``: the
    browser's screen, for a PNG/JPEG (the browser screens no DICOM: one that came with a DICOM
    file was not made from it, and is not stored)."""
    tenant = membership.tenant
    fields = replace(fields, patient_pseudonym=patient_pseudonym_of(fields.patient_pseudonym, scope=tenant.pk))
    if dicom.looks_like_dicom(data):
        return _dicom_upload(
            membership=membership, data=data, fields=fields, request=request, routing=routing, on_stored=on_stored
        )
    checked = image_check(data)
    # stored as it came (metadata and all) for the worker, which makes the display copy
    extension = ACCEPTED_FORMATS[checked.format]
    stored_name = default_storage.save(original_key(tenant_id=tenant.pk, extension=extension), ContentFile(data))
    try:
        with transaction.atomic():
            # a new study's worklist columns are known without looking: one image, its read queued
            summary: dict[str, object] = {
                "image_count": 1,
                "ai_status": Study.AIStatus.QUEUED if routing else Study.AIStatus.NONE,
            }
            if routing and routing.protocol:
                summary["protocol"] = routing.protocol
            study_row, new_study = _study_for_upload(tenant=tenant, fields=fields, summary=summary)
            if new_study:  # its first series cannot exist yet
                series = Series.objects.create(tenant=tenant, study=study_row, number=1, modality=study_row.modality)
            else:
                series, _ = Series.objects.get_or_create(
                    tenant=tenant, study=study_row, number=1, defaults={"modality": study_row.modality}
                )
            image = Image.objects.create(
                tenant=tenant,
                study=study_row,
                series=series,
                file="",
                original=stored_name,
                state=Image.State.RECEIVED,
                render_queued_at=timezone.now(),  # reconciliation's clock, should nothing render it
                sha256="",
                width=checked.width,
                height=checked.height,
                format=checked.format,
                byte_size=len(data),
                uploaded_by=membership.user,
            )
            if plan is not None:
                preliminary_store(
                    image=image,
                    plan=plan,
                    bulk_lane=routing is not None and routing.priority == InferenceRequest.Priority.INTERACTIVE,
                )
            else:  # the answer knows there is none without asking (ImageCreatedOutput.preliminary)
                Image.preliminary.related.set_cached_value(image, None)
            if routing:  # the read renders it, in the same pass as the forward (workers/runner.py)
                _read_create(routing, image, plan)
                # what the answer shows, without asking again (the list queries annotate it)
                image.ai_status = InferenceRequest.Status.QUEUED  # type: ignore[attr-defined]
            else:  # no read yet (a bulk job's item): the bulk lane's worker renders it for display
                ids = [image.pk]
                transaction.on_commit(lambda: _enqueue_render(ids, _render_queue(None)), robust=True)
            if new_study:
                study_updated_on_commit([study_row])
            else:
                study_summary_refresh([study_row.pk])
            member_action_record(membership, "image.upload", request=request, target_type="image", target_id=image.pk)
            if on_stored:
                on_stored([image])
    except BaseException:
        # no row points at the stored bytes: remove them, so nothing is half-written
        default_storage.delete(stored_name)
        raise
    logger.info("image %s received for tenant %s", image.pk, tenant.pk)
    return [image]


def _patient_pseudonym(tenant, patient_id: str) -> str:
    """A DICOM Patient ID is an identifier: the platform keeps a keyed hash of it, the same for
    the same patient within one hospital, and different between hospitals (core.pseudonym)."""
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
    if uid and study_fields.accession_number:
        # one accession number names one study: never file an instance of another study under it
        taken = (
            Study.objects.for_tenant(tenant)
            .filter(accession_number=study_fields.accession_number)
            .exclude(study_instance_uid="")
            .exclude(study_instance_uid=uid)
            .exists()
        )
        if taken:
            raise Conflict(
                "This accession number belongs to another study (another Study Instance UID); check the file's "
                "Accession Number and Study Instance UID.",
                code="accession_study_mismatch",
            )
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
        # several associations may deliver one series at once (PostgreSQL): the study's row lock
        # lets one make it and the others find it; a number another way in took meanwhile fails
        # on series_number_unique and the caller tries again (dicomnet.ingest)
        Study.objects.select_for_update().filter(pk=study.pk).values_list("pk").first()
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


def dicom_limits() -> dict:
    """The limits every DICOM way in passes to ``dicom.parse`` / ``dicom.dicom_read``: the upload
    byte limit bounds inflating a deflated dataset too (the DIMSE and STOW-RS receivers use it)."""
    return {
        "max_bytes": settings.SIGHTLINE_MAX_UPLOAD_BYTES,
        "max_pixels": settings.SIGHTLINE_MAX_IMAGE_PIXELS,
        "max_frames": settings.SIGHTLINE_MAX_DICOM_FRAMES,
    }


class DecodeBudget:
    """Pixels one request may still decode, all its files and frames together."""

    def __init__(self, pixels: int) -> None:
        self.left = pixels

    def take(self, pixels: int) -> bool:
        if pixels > self.left:
            return False
        self.left -= pixels
        return True


def _decode_budget(request) -> DecodeBudget | None:
    """The request's budget, shared by every file it carries; None outside a request (a worker
    unpacking an archive is the place for long decodes)."""
    if request is None:
        return None
    budget = getattr(request, "_sightline_decode_budget", None)
    if budget is None:
        budget = DecodeBudget(settings.SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST)
        request._sightline_decode_budget = budget
    return budget


@dataclass(frozen=True)
class RenderedFrame:
    png: bytes  # for display and the model
    pixels: bytes | None  # grayscale: modality values as little-endian float32, for the viewer's window/level
    window: tuple[float, float] | None  # grayscale: this frame's default window


def _render_frame(parsed: dicom.DicomFile, index: int) -> RenderedFrame:
    """Decode one frame once: its PNG and, for grayscale, its modality values. DicomError only."""
    values = dicom.frame_modality(parsed, index)
    display = dicom.frame_display(parsed, index, values)
    try:
        png = _png(display)
    except Exception as exc:  # Pillow on an array it cannot encode: the frame's failure, in words
        raise dicom.DicomUnreadable("This frame could not be converted for display.", code="render_failed") from exc
    if parsed.is_color:
        return RenderedFrame(png=png, pixels=None, window=None)
    window = dicom.frame_window(parsed, index, values)
    return RenderedFrame(png=png, pixels=values.astype("<f4").tobytes(), window=window)


def _dicom_upload(
    *, membership: Membership, data: bytes, fields: StudyFields, request, routing: Routing | None, on_stored: OnStored
) -> list[Image]:
    """Parse with limits (a deflated file is inflated with the upload byte bound), keep the
    original with its preamble zeroed, and render each frame for display and the model: here,
    when that is cheap, else in the worker step. An encoding no decoder reads is kept as
    unprocessable (415)."""
    try:
        parsed = dicom.parse(data, **dicom_limits(), decode_first=False)
    except dicom.DicomTooLarge as exc:
        raise TooLarge(exc.message, code=exc.code) from exc
    except dicom.DicomUnsupportedSyntax as exc:
        (image,) = _store_dicom(
            membership=membership,
            data=data,
            header=exc.header,
            fields=fields,
            request=request,
            reason=exc.message,
            on_stored=on_stored,
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
    }
    # Which decodes stay in the request: native (uncompressed) pixels within the request's pixel
    # budget cost about a copy and a PNG encode each, so the answer comes with the images ready.
    # Compressed syntaxes (JPEG 2000, JPEG-LS, JPEG, RLE) cost 10-100x more CPU per pixel, and a
    # small file can describe minutes of it: an upload whose read the worker can queue (an
    # interactive one) never pays that, nor anything past the budget; it is received now and
    # rendered by the worker step. A bulk job's files sent in a request cannot wait for a worker
    # (the job queues their reads when it starts), so they are decoded here within the budget and
    # refused past it; an archive is unpacked by a worker, outside any request's budget.
    budget = _decode_budget(request)
    deferrable = routing is not None
    in_request = budget is None or (not (deferrable and parsed.is_compressed) and budget.take(parsed.pixels))
    if budget is not None and not in_request and not deferrable:  # not in_request: there is a budget
        raise TooLarge(
            f"Decoding this DICOM file ({parsed.pixels:,} pixels) would pass what one request may decode "
            f"({budget.left:,} pixels left of {settings.SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST:,}); add it to "
            "the job inside a zip archive, which a worker unpacks.",
            code="too_many_pixels_per_request",
        )
    if not in_request:
        return _store_dicom(
            membership=membership,
            data=data,
            header=header,
            fields=fields,
            request=request,
            received=parsed.frames,
            routing=routing,
            on_stored=on_stored,
        )
    try:
        renders = [_render_frame(parsed, index) for index in range(parsed.frames)]
        window = renders[0].window  # as before the worker step: the first frame's, for every frame
    except dicom.DicomTooLarge as exc:
        raise TooLarge(exc.message, code=exc.code) from exc
    except dicom.DicomError as exc:
        raise Unprocessable(exc.message, code=exc.code) from exc
    return _store_dicom(
        membership=membership,
        data=data,
        header={**header, "window": window},
        fields=fields,
        request=request,
        renders=renders,
        routing=routing,
        on_stored=on_stored,
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
    renders: Sequence[RenderedFrame] = (),
    received: int = 0,
    reason: str = "",
    routing: Routing | None = None,
    on_stored: OnStored = None,
) -> list[Image]:
    """Store the original and one image per frame: rendered (``renders``), ``received`` frames
    for the worker step to render, or one unprocessable image (``reason``); and the instance's
    ``dicomnet.Instance`` row, so every way in (this upload, C-STORE, STOW-RS) shares the
    hospital's one-copy-per-SOP-Instance-UID rule and DICOMweb lists what was uploaded."""
    tenant = membership.tenant
    _instance_unheld(tenant, header["sop_instance_uid"])
    stored: list[str] = []
    try:
        original = ContentFile(dicom.anonymized_preamble(data))
        stored.append(default_storage.save(dicom_key(tenant_id=tenant.pk), original))
        files = []
        for render in renders:
            png = default_storage.save(image_key(tenant_id=tenant.pk), ContentFile(render.png))
            stored.append(png)
            pixels = ""
            if render.pixels is not None:
                pixels = default_storage.save(pixels_key(tenant_id=tenant.pk), ContentFile(render.pixels))
                stored.append(pixels)
            files.append((png, pixels))
        with transaction.atomic():
            study = _dicom_study(tenant, header, fields)
            if routing is not None and routing.protocol and not study.protocol and not study.images.exists():
                # a protocol read that began a study: out of clinicians' worklists like the others;
                # one of an existing study is filed with it, as the hospital's own image
                study.protocol = routing.protocol
                study.save(update_fields=["protocol"])
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
                        **common,
                        unprocessable_reason=reason[:REASON_LENGTH],
                        state=Image.State.FAILED,
                        sha256="",
                        byte_size=len(data),
                        file="",
                    )
                ]
            elif received:
                images = Image.objects.bulk_create(
                    [
                        Image(
                            **common,
                            frame_number=index,
                            state=Image.State.RECEIVED,
                            read_on_render=routing is not None,
                            render_queued_at=timezone.now(),
                            sha256="",
                            byte_size=0,
                            file="",
                        )
                        for index in range(received)
                    ]
                )
                ids = [image.pk for image in images]
                # robust: a broker outage must not undo a committed upload; reconciliation wakes it
                queue = _render_queue(routing)
                transaction.on_commit(lambda: _enqueue_render(ids, queue), robust=True)
            else:
                images = [
                    Image.objects.create(
                        **common,
                        file=png,
                        pixels=pixels,
                        frame_number=index,
                        sha256=hashlib.sha256(render.png).hexdigest(),
                        byte_size=len(render.png),
                    )
                    for index, ((png, pixels), render) in enumerate(zip(files, renders, strict=True))
                ]
                if routing is not None:
                    for image in images:
                        _read_create(routing, image)
            _instance_record(tenant=tenant, data=data, header=header, study=study, series=series, images=images)
            study_summary_refresh([study.pk])
            for image in images:
                member_action_record(
                    membership, "image.upload", request=request, target_type="image", target_id=image.pk
                )
            if on_stored:
                on_stored(images)
    except BaseException as exc:
        for name in stored:
            default_storage.delete(name)
        if isinstance(exc, IntegrityError):
            # the same instance stored by another way in at the same moment: the rule, in words
            _instance_unheld(tenant, header["sop_instance_uid"])
        raise
    logger.info("DICOM stored for tenant %s as %d image(s), %d to render", tenant.pk, len(images), received)
    return images


DUPLICATE_INSTANCE = "duplicate_instance"


def _instance_unheld(tenant, sop_instance_uid: str) -> None:
    """One copy of a DICOM instance per hospital, whichever way it came in."""
    from dicomnet.models import Instance  # dicomnet builds on recognition: imported when used

    if sop_instance_uid and Instance.objects.for_tenant(tenant).filter(sop_instance_uid=sop_instance_uid).exists():
        raise Conflict(
            "This hospital already holds this DICOM instance (the same SOP Instance UID); it was not stored again.",
            code=DUPLICATE_INSTANCE,
        )


def _instance_record(*, tenant, data: bytes, header: dict, study: Study, series: Series, images: list[Image]):
    """The stored file's ``dicomnet.Instance`` (a DICOM without a SOP Instance UID has none)."""
    from dicomnet.models import UID_LENGTH, Instance

    uid = header["sop_instance_uid"]
    if not uid:
        return None
    meta = _file_meta(data)
    modality_length = Instance._meta.get_field("modality").max_length
    return Instance.objects.create(
        tenant=tenant,
        study=study,
        series=series,
        sop_instance_uid=uid[:UID_LENGTH],
        sop_class_uid=meta.get("MediaStorageSOPClassUID", "")[:UID_LENGTH],
        transfer_syntax_uid=meta.get("TransferSyntaxUID", "")[:UID_LENGTH],
        modality=(header.get("modality") or "")[:modality_length],
        instance_number=header.get("instance_number"),
        frames=len(images),
        rows=header.get("rows"),
        columns=header.get("columns"),
        file=images[0].original.name or "",
        byte_size=len(data),
        origin=Instance.Origin.RECEIVED,
    )


def _file_meta(data: bytes) -> dict[str, str]:
    """The Part 10 file meta's SOP class and transfer syntax (bounded: the meta group only)."""
    stream = io.BytesIO(data)
    stream.seek(dicom.PREAMBLE_SIZE + len(dicom.MAGIC))
    try:
        meta = _read_file_meta_info(stream)
    except Exception:
        return {}
    return {key: str(meta.get(key, "") or "").strip() for key in ("MediaStorageSOPClassUID", "TransferSyntaxUID")}


# -- the worker step: render what the request did not --------------------------------------------------------------


def _render_queue(routing: Routing | None) -> str:
    """The lane that renders received images: a clinician's upload (its read waits for the
    render) the interactive one; a bulk job's item (no read yet) or a bulk-lane read the bulk
    one, so that a job of thousands never stands in front of the interactive lane's reads."""
    return inference_queue(routing.priority if routing is not None else InferenceRequest.Priority.BULK)


def _enqueue_render(image_ids: list[int], queue: str) -> None:
    # the broker down: the images stay received in the database; reconciliation wakes them
    task_send("workers.tasks.image_render", args=[image_ids], queue=queue)


def images_render(*, image_ids: list[int]) -> int:
    """Render received images (the worker step; redelivery-safe): a DICOM original's frames are
    each decoded once, stored, moved received → rendered with a conditional UPDATE, and only then
    is its AI read queued; a PNG/JPEG upload gets its display copy and loses its original. A
    frame or file that fails, fails alone and in words. Returns the images rendered.

    A PNG/JPEG whose read is queued or running is left to that read: the runner decodes it for
    the model and makes the display copy from that same decode (``image_rendered``)."""
    Image.objects.filter(pk__in=image_ids, state=Image.State.RECEIVED).update(render_attempts=F("render_attempts") + 1)
    images = list(
        Image.objects.filter(pk__in=image_ids, state=Image.State.RECEIVED)
        .select_related("tenant")
        .order_by("original", "frame_number")
    )
    if not images:
        return 0
    worn = [image for image in images if image.render_attempts > settings.SIGHTLINE_MAX_ATTEMPTS]
    images_render_failed(
        worn, f"This image could not be prepared for display in {settings.SIGHTLINE_MAX_ATTEMPTS} attempts."
    )
    images = [image for image in images if image not in worn]
    uploads = [image for image in images if image.format != "DICOM"]
    rendered = _uploads_render(uploads)
    images = [image for image in images if image.format == "DICOM"]
    for original in sorted({_stored_name(image.original) for image in images}):
        frames = [image for image in images if image.original.name == original]
        with default_storage.open(original, "rb") as stored:  # OSError: the task retries
            data = stored.read(settings.SIGHTLINE_MAX_UPLOAD_BYTES + 1)
        try:
            parsed = dicom.parse(data, **dicom_limits(), decode_first=False)
        except dicom.DicomError as exc:
            images_render_failed(frames, exc.message)
            continue
        done = sum(_render_one(image, parsed) for image in frames)
        if done:  # the worklist learns once per original, not once per frame
            with transaction.atomic():
                study_summary_refresh({image.study_id for image in frames})
        rendered += done
    return rendered


def _uploads_render(images: list[Image]) -> int:
    """PNG/JPEG received images no read is waiting for: decode, display copy, rendered."""
    if not images:
        return 0
    reading = set(
        InferenceRequest.objects.filter(
            image__in=images, status__in=(InferenceRequest.Status.QUEUED, InferenceRequest.Status.RUNNING)
        ).values_list("image_id", flat=True)
    )
    rendered = 0
    for image in images:
        if image.pk in reading:
            continue
        try:
            with default_storage.open(_stored_name(image.original), "rb") as stored:  # OSError: the task retries
                data = stored.read(settings.SIGHTLINE_MAX_UPLOAD_BYTES + 1)
        except FileNotFoundError:  # a read that started meanwhile rendered it and deleted the original
            if Image.objects.filter(pk=image.pk, state=Image.State.RECEIVED).exists():
                images_render_failed([image], "The uploaded file is missing from storage.")
            continue
        try:
            with _opened(data, full=True) as decoded:
                copy = display_copy(decoded, image.format)
        except (Unprocessable, UnsupportedMedia, TooLarge) as exc:  # checked at upload: a changed limit, a bug
            images_render_failed([image], exc.message)
            continue
        except Exception as exc:  # Pillow on pixels it cannot encode: this image's failure, in words
            logger.warning("image %s: its display copy could not be made: %r", image.pk, exc)
            images_render_failed([image], "This image could not be converted for display.")
            continue
        name = image_display_store(image=image, copy=copy)
        try:
            with transaction.atomic():
                moved = image_rendered(image=image, copy=copy, stored_name=name)
                if moved:
                    study_summary_refresh({image.study_id})
                    if image.read_on_render:
                        _queue_read(image)
        except BaseException:
            default_storage.delete(name)
            raise
        rendered += moved
    return rendered


def image_display_store(*, image: Image, copy: DisplayCopy) -> str:
    """Store an image's display copy; the stored name, for ``image_rendered``."""
    return default_storage.save(
        image_key(tenant_id=image.tenant_id, extension=copy.extension), ContentFile(copy.content)
    )


def image_rendered(*, image: Image, copy: DisplayCopy, stored_name: str) -> bool:
    """``images_rendered`` for one image: True when it moved."""
    return image.pk in images_rendered([(image, copy, stored_name)])


def images_rendered(rendered: list[tuple[Image, DisplayCopy, str]]) -> set[int]:
    """Call inside the transaction that stores the outcome (the runner's, after its forward
    pass; or images_render's): move the PNG/JPEG images received → rendered with their display
    copies (stored names from ``image_display_store``), forgetting the originals' names, in two
    statements whatever their number (the rows still received, locked; one UPDATE). Returns the
    ids that moved: their originals are deleted after commit (nothing needs one once its copy
    exists). An image another pass rendered first keeps that pass's copy; this one's is deleted."""
    if not rendered:
        return set()
    ids = [image.pk for image, _, _ in rendered]
    still = set(
        Image.objects.select_for_update().filter(pk__in=ids, state=Image.State.RECEIVED).values_list("pk", flat=True)
    )
    moved = []
    for image, copy, stored_name in rendered:
        if image.pk not in still:
            default_storage.delete(stored_name)
            continue
        image_original_discard_on_commit(image)  # the name as it is now, before it is forgotten
        image.state, image.file, image.sha256, image.byte_size = (
            Image.State.RENDERED,
            stored_name,
            copy.sha256,
            len(copy.content),
        )
        if image.format != "DICOM":
            image.original = ""
        moved.append(image)
    rows_update(moved, ["state", "file", "original", "sha256", "byte_size"])
    return {image.pk for image in moved}


def image_original_discard_on_commit(image: Image) -> None:
    """After commit, delete a PNG/JPEG upload's stored original (``image.original`` as it is
    now); a DICOM original is kept (its other frames, the viewer's values and exports read it
    again). A storage error leaves the file behind, logged; it never undoes the render."""
    if image.format == "DICOM" or not image.original:
        return
    name, image_id = _stored_name(image.original), image.pk

    def discard() -> None:
        try:
            default_storage.delete(name)
        except Exception:
            logger.warning("image %s: its original could not be deleted; it stays in storage", image_id, exc_info=True)

    transaction.on_commit(discard, robust=True)


def _render_one(image: Image, parsed: dicom.DicomFile) -> int:
    tenant_id = image.tenant_id
    try:
        render = _render_frame(parsed, image.frame_number)
        window = render.window
    except (dicom.DicomError, IndexError) as exc:
        images_render_failed([image], getattr(exc, "message", "This frame is missing from the file."))
        return 0
    names = [default_storage.save(image_key(tenant_id=tenant_id), ContentFile(render.png))]
    if render.pixels is not None:
        names.append(default_storage.save(pixels_key(tenant_id=tenant_id), ContentFile(render.pixels)))
    try:
        with transaction.atomic():
            moved = Image.objects.filter(pk=image.pk, state=Image.State.RECEIVED).update(
                state=Image.State.RENDERED,
                file=names[0],
                pixels=names[1] if len(names) > 1 else "",
                sha256=hashlib.sha256(render.png).hexdigest(),
                byte_size=len(render.png),
                window_center=window[0] if window else None,
                window_width=window[1] if window else None,
            )
            if moved and image.read_on_render:
                _queue_read(image)
    except BaseException:
        for name in names:
            default_storage.delete(name)
        raise
    if not moved:  # another delivery rendered it first: keep its files, not these
        for name in names:
            default_storage.delete(name)
    return moved


def _queue_read(image: Image) -> None:
    try:
        routing = upload_routing(tenant=image.tenant, priority=_deferred_read_priority(image))
    except Unavailable:
        logger.warning("image %s rendered; no production model, so its AI read is not queued", image.pk)
        return
    inference_request_create(image=image, model_version=_read_version(routing, image))


def _deferred_read_priority(image: Image) -> int:
    """The lane of a read queued once the worker rendered the image: a DICOM node's instance is
    read on its node's lane (dicomnet.ingest.node_read_priority), any other upload interactively."""
    if image.format != "DICOM" or not image.original:
        return InferenceRequest.Priority.INTERACTIVE
    from dicomnet.ingest import node_read_priority  # dicomnet builds on recognition, not the reverse
    from dicomnet.models import Instance

    received = (
        Instance.objects.filter(tenant_id=image.tenant_id, file=image.original.name, received_from__isnull=False)
        .select_related("received_from__service_account")
        .first()
    )
    return node_read_priority(received.received_from) if received is not None else InferenceRequest.Priority.INTERACTIVE


def _read_create(routing: Routing, image: Image, plan: ScreenPlan | None = None) -> None:
    """The image's read; a screened image's is routed by its stored preliminary's route."""
    priority = route_priority(plan, routing.priority)
    request = inference_request_create(
        image=image, model_version=_read_version(routing, image), priority=priority, protocol=routing.protocol
    )
    if plan is not None:
        read_routed(request=request, route=image.preliminary.route, max_wait_seconds=plan.max_wait_seconds)


def _read_version(routing: Routing, image: Image) -> ModelVersion:
    """The version that reads this image; the routing came from upload_routing, which refuses a
    hospital without a production model, so there is always one."""
    version = version_for(routing=routing, image_id=image.pk)
    if version is None:
        raise Unavailable("No production model is registered yet, so images cannot be read.", code="no_model")
    return version


def _stored_name(file: FieldFile) -> str:
    """The storage key of a file these callers only reach when it is stored."""
    if not file.name:
        raise FileNotFoundError("the image has no stored original")
    return file.name


def images_render_failed(images: list[Image], message: str) -> None:
    if not images:
        return
    with transaction.atomic():
        failed = [
            image
            for image in images
            if Image.objects.filter(pk=image.pk, state=Image.State.RECEIVED).update(
                state=Image.State.FAILED, unprocessable_reason=message[:REASON_LENGTH]
            )
        ]
        study_summary_refresh({image.study_id for image in failed})
        # the image's page and live lists learn it at once (the API shows it as the image's state)
        events.results_ready_on_commit(
            [
                events.ResultNotice(
                    tenant_id=image.tenant_id, image_id=image.pk, status="failed", top_label="", probability=None
                )
                for image in failed
            ]
        )
    logger.info("%d image(s) failed to render", len(failed))


def images_render_reconcile() -> int:
    """Wake received images whose render wake-up is older than the stall time (a lost message:
    Redis keeps nothing): one wake-up per original. The attempt cap in images_render ends them."""
    before = timezone.now() - timedelta(seconds=settings.SIGHTLINE_RENDER_STALL_SECONDS)
    stalled = Image.objects.filter(
        Q(render_queued_at__lt=before) | Q(render_queued_at__isnull=True), state=Image.State.RECEIVED
    )
    by_original: dict[tuple[str, bool], list[int]] = {}
    for image_id, original, read_on_render in stalled.values_list("pk", "original", "read_on_render")[
        :RENDER_RECONCILE_MAX
    ]:
        by_original.setdefault((original, read_on_render), []).append(image_id)
    for (_, read_on_render), ids in by_original.items():
        if Image.objects.filter(pk__in=ids, state=Image.State.RECEIVED).update(render_queued_at=timezone.now()):
            # a DICOM frame whose read waits for it goes to the interactive lane; the rest (a job's
            # items, an upload whose read ended without rendering it) to the bulk one
            priority = InferenceRequest.Priority.INTERACTIVE if read_on_render else InferenceRequest.Priority.BULK
            _enqueue_render(ids, inference_queue(priority))
    return sum(len(ids) for ids in by_original.values())
