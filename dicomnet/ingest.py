"""The one ingest of a DICOM instance, for every DICOM way in (C-STORE, STOW-RS).

An image instance goes through the upload's own ingest (``_images_from_bytes``: content checks,
the bounded inflater, limits, pseudonymisation, storage, study/series/image rows, its ``Instance``
row (every stored DICOM has one: web uploads too), the access log, the hospital's pin or split for
the read); here the row gains the node that sent it, in the same transaction. A non-image instance
(SR, PR, KO...) is kept and listed, never read: its file is stored, its study and series found or
made the same way, and its ``Instance`` row written with an access-log entry. Receiving is
idempotent by SOP Instance UID per hospital: a second copy, even one delivered at the same moment
by another association, creates nothing but its access-log entry (dicom.instance_duplicate).

The answer (``Received``) says what happened in the terms of both ways in: an HTTP status for
STOW-RS and a DIMSE status (PS3.4 B.2.3) for C-STORE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from pydicom.dataset import Dataset
from pydicom.uid import UID

from accounts.access import member_action_record
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    TooLarge,
    Unavailable,
    Unprocessable,
    UnsupportedMedia,
)
from core.pseudonym import patient_pseudonym_of
from recognition import dicom
from recognition.models import Image, InferenceRequest
from recognition.services.images import (
    DUPLICATE_INSTANCE,
    StudyFields,
    _dicom_series,
    _dicom_study,
    _images_from_bytes,
    dicom_limits,
)
from recognition.services.inference import upload_routing
from recognition.storage import dicom_key

from .models import DicomNode, Instance

logger = logging.getLogger(__name__)

# DIMSE statuses of a C-STORE (PS3.4 Table B.2-1, PS3.7 C.4)
SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.x: the node may not store (its role, its membership)
OUT_OF_RESOURCES = 0xA700  # too large, storage or the database down: the sender may try later
DATASET_MISMATCH = 0xA900  # the dataset is not of the SOP class it was sent as
CANNOT_UNDERSTAND = 0xC000  # damaged, unreadable, no SOP Instance UID, another patient's study

RECEIVE_ATTEMPTS = 3  # a study or series another association made at the same moment: found on the next try
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data


@dataclass(frozen=True)
class Received:
    """What became of one instance. ``status``: stored (new), duplicate (this hospital holds it
    already: nothing created, a success for the sender) or refused (nothing kept, ``reason`` says
    why in words). A stored image whose encoding no decoder reads is kept, unprocessable: stored,
    with ``reason`` and ``code`` set (HTTP 202: accepted with a warning)."""

    status: str
    instance: Instance | None
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    images: list[Image] = field(default_factory=list)
    reason: str = ""
    code: str = ""
    http_status: int = 200
    dimse_status: int = SUCCESS

    @property
    def ok(self) -> bool:
        return self.status != "refused"


def _refused(exc: DomainError, *, sop_instance_uid: str = "", sop_class_uid: str = "") -> Received:
    dimse = CANNOT_UNDERSTAND
    if isinstance(exc, TooLarge | Unavailable):
        dimse = OUT_OF_RESOURCES
    elif isinstance(exc, Forbidden):
        dimse = REFUSED_NOT_AUTHORIZED
    elif exc.code == "sop_class_mismatch":
        dimse = DATASET_MISMATCH
    return Received(
        status="refused",
        instance=None,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        reason=exc.message,
        code=exc.code,
        http_status=exc.status,
        dimse_status=dimse,
    )


@dataclass(frozen=True)
class _Header:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str  # as received: a deflated original is stored as received, deflated
    modality: str
    instance_number: int | None
    frames: int
    rows: int | None
    columns: int | None
    has_pixels: bool
    fields: dict  # recognition.dicom.header_fields: patient, study, series (identifiers: never logged)


def _header(data: bytes) -> _Header:
    """Read the dataset within the upload limits (a deflated one inflated with the bound);
    pixel data stays unread (deferred)."""
    limits = dicom_limits()
    try:
        inflated, received = dicom.dicom_inflate(data, max_bytes=limits["max_bytes"])
        ds: Dataset = dicom.dicom_read(inflated, max_bytes=limits["max_bytes"])
    except dicom.DicomTooLarge as exc:
        raise TooLarge(exc.message, code=exc.code) from exc
    except dicom.DicomError as exc:
        raise Unprocessable(exc.message, code=exc.code) from exc
    fields = dicom.header_fields(ds)
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    declared = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID", "") or "").strip()
    if not fields["sop_instance_uid"]:
        raise Unprocessable("This DICOM object has no SOP Instance UID.", code="no_sop_instance_uid")
    if not sop_class:
        sop_class = declared
    if not sop_class:
        raise Unprocessable("This DICOM object has no SOP Class UID.", code="no_sop_class_uid")
    if declared and declared != sop_class:
        raise Unprocessable(
            "This DICOM object was sent as another SOP class than the one its dataset names.",
            code="sop_class_mismatch",
        )

    def number(keyword: str) -> int | None:
        try:
            value = ds.get(keyword)
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    return _Header(
        sop_instance_uid=fields["sop_instance_uid"],
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(received),
        modality=fields["modality"],
        instance_number=fields["instance_number"],
        frames=(number("NumberOfFrames") or 1) if has_pixels else 0,
        rows=number("Rows"),
        columns=number("Columns"),
        has_pixels=has_pixels,
        fields=fields,
    )


def _existing(tenant, sop_instance_uid: str) -> Instance | None:
    return Instance.objects.for_tenant(tenant).filter(sop_instance_uid=sop_instance_uid).first()


def _images_of(instance: Instance) -> list[Image]:
    """The image rows (one per frame) made from a received instance: they share its stored file."""
    return list(Image.objects.filter(tenant_id=instance.tenant_id, original=instance.file.name).order_by("pk"))


def _duplicate(instance: Instance, header: _Header) -> Received:
    return Received(
        status="duplicate",
        instance=instance,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        images=_images_of(instance),
        reason="This hospital already holds this instance; nothing was stored again.",
        code="duplicate",
        http_status=200,
        dimse_status=SUCCESS,
    )


def instance_receive(
    *,
    membership: Membership,
    data: bytes,
    node: DicomNode | None = None,
    request=None,
    transfer_syntax: str | None = None,
) -> Received:
    """Receive one DICOM instance for the member's (or node's service account's) hospital.

    ``data``: a Part 10 file; or, with ``transfer_syntax``, a bare dataset as a DIMSE C-STORE
    carries it. ``node``: the sending node (recorded on the instance). Never raises a
    ``DomainError``: every refusal is a ``Received`` with its reason."""
    tenant = membership.tenant
    try:
        limit = settings.SIGHTLINE_MAX_UPLOAD_BYTES
        if len(data) > limit:
            raise TooLarge(f"The instance is larger than {limit // (1024 * 1024)} MB, the limit.", code="too_large")
        if transfer_syntax and not dicom.looks_like_dicom(data):
            data = _as_part10(data, transfer_syntax)
        header = _header(data)
    except DomainError as exc:
        return _refused(exc)
    uids = {"sop_instance_uid": header.sop_instance_uid, "sop_class_uid": header.sop_class_uid}
    try:
        require(membership, Action.IMAGE_UPLOAD, request=request)
    except DomainError as exc:
        return _refused(exc, **uids)
    for attempt in range(RECEIVE_ATTEMPTS):
        if (existing := _existing(tenant, header.sop_instance_uid)) is not None:
            # nothing is stored, but a node touched this patient's record: the log says so
            member_action_record(
                membership, "dicom.instance_duplicate", request=request, target_type="instance", target_id=existing.pk
            )
            return _duplicate(existing, header)
        try:
            if header.has_pixels:
                return _image_receive(membership=membership, data=data, header=header, node=node, request=request)
            return _object_receive(membership=membership, data=data, header=header, node=node, request=request)
        except IntegrityError:
            # another association stored this instance, or made its study or series, at the same
            # moment; this try's rows and files are gone: look again
            if attempt == RECEIVE_ATTEMPTS - 1:
                raise
            logger.info("instance receive for tenant %s raced another delivery; trying again", tenant.pk)
        except UnsupportedMedia as exc:
            # kept, marked unprocessable (its Instance row was written with the image)
            instance = _existing(tenant, header.sop_instance_uid)
            return Received(
                status="stored" if instance is not None else "refused",
                instance=instance,
                images=_images_of(instance) if instance is not None else [],
                reason=exc.message,
                code=exc.code,
                http_status=202 if instance is not None else exc.status,
                dimse_status=SUCCESS if instance is not None else CANNOT_UNDERSTAND,
                **uids,
            )
        except Conflict as exc:
            if exc.code == DUPLICATE_INSTANCE and attempt < RECEIVE_ATTEMPTS - 1:
                continue  # another way in stored it between the look and the store: look again
            return _refused(exc, **uids)
        except (TooLarge, Unprocessable, Unavailable, Forbidden, DomainError) as exc:
            return _refused(exc, **uids)
    raise AssertionError("unreachable")  # pragma: no cover


def _as_part10(dataset: bytes, transfer_syntax: str) -> bytes:
    try:
        return dicom._as_part10(dataset, UID(str(transfer_syntax)), max_bytes=settings.SIGHTLINE_MAX_UPLOAD_BYTES)
    except dicom.DicomTooLarge as exc:
        raise TooLarge(exc.message, code=exc.code) from exc
    except dicom.DicomError as exc:
        raise Unprocessable(exc.message, code=exc.code) from exc


def _instance_row(*, tenant, header: _Header, study, series, file: str, size: int, node: DicomNode | None) -> Instance:
    return Instance.objects.create(
        tenant=tenant,
        study=study,
        series=series,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        modality=header.modality[:16],
        instance_number=header.instance_number,
        frames=header.frames,
        rows=header.rows,
        columns=header.columns,
        file=file,
        byte_size=size,
        origin=Instance.Origin.RECEIVED,
        received_from=node,
    )


def node_read_priority(node: DicomNode | None) -> int:
    """The lane a received instance is read on: a node's reads go to the bulk lane, after the
    clinicians' own uploads, unless an admin marked it interactive (its service account's flag);
    an instance a person stores (STOW-RS) is read as their upload is."""
    if node is None or node.service_account.interactive:
        return InferenceRequest.Priority.INTERACTIVE
    return InferenceRequest.Priority.BULK


def _routing(tenant, node: DicomNode | None = None):
    try:
        return upload_routing(tenant=tenant, priority=node_read_priority(node))
    except Unavailable:
        # a modality's study is kept even before a model is registered; it is read once one is
        logger.warning("tenant %s has no production model: a received instance is stored unread", tenant.pk)
        return None


def _image_receive(*, membership: Membership, data: bytes, header: _Header, node, request) -> Received:
    tenant = membership.tenant
    made: list[Instance] = []

    def on_stored(images: list[Image]) -> None:  # in the upload's own transaction: both or neither
        # the upload wrote the Instance row (every stored DICOM has one); this says who sent it
        instance = Instance.objects.for_tenant(tenant).get(sop_instance_uid=header.sop_instance_uid)
        instance.received_from = node
        instance.frames = header.frames
        instance.transfer_syntax_uid = header.transfer_syntax_uid
        instance.sop_class_uid = header.sop_class_uid
        instance.save(update_fields=["received_from", "frames", "transfer_syntax_uid", "sop_class_uid"])
        member_action_record(
            membership, "dicom.instance_received", request=request, target_type="instance", target_id=instance.pk
        )
        made.append(instance)

    images = _images_from_bytes(
        membership=membership,
        data=data,
        fields=StudyFields(),
        request=request,
        routing=_routing(tenant, node),
        on_stored=on_stored,
    )
    return Received(
        status="stored",
        instance=made[0],
        images=images,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        http_status=200,
        dimse_status=SUCCESS,
    )


def _object_receive(*, membership: Membership, data: bytes, header: _Header, node, request) -> Received:
    """A non-image object (SR, PR, KO...): kept and listed with its study, never read."""
    tenant = membership.tenant
    fields = replace(StudyFields(), patient_pseudonym=patient_pseudonym_of("", scope=tenant.pk))
    try:
        original = dicom.anonymized_preamble(data)
    except dicom.DicomError as exc:
        raise Unprocessable(exc.message, code=exc.code) from exc
    name = default_storage.save(dicom_key(tenant_id=tenant.pk), ContentFile(original))
    try:
        with transaction.atomic():
            study = _dicom_study(tenant, header.fields, fields)
            series = _dicom_series(tenant, study, header.fields)
            instance = _instance_row(
                tenant=tenant, header=header, study=study, series=series, file=name, size=len(data), node=node
            )
            member_action_record(
                membership, "dicom.instance_received", request=request, target_type="instance", target_id=instance.pk
            )
    except BaseException:
        default_storage.delete(name)  # no row points at it
        raise
    logger.info("non-image instance %s stored for tenant %s", instance.pk, tenant.pk)
    return Received(
        status="stored",
        instance=instance,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        http_status=200,
        dimse_status=SUCCESS,
    )
