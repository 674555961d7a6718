"""DICOMweb: STOW-RS, QIDO-RS and WADO-RS (PS3.18) under the hospital's own sign-in.

Who may call: the API's authenticators and throttle (service-account keys, JWTs, and the
browser's session, which needs its CSRF token for a POST as a page does), the hospital from
``X-Tenant`` or the only one (``accounts.selectors.membership_resolve``), the role table
(``accounts.services.require``). Searching, metadata and rendered frames need ``image.view``;
storing needs ``image.upload``. The stored originals and their headers (``/metadata``) keep the
hospital's identifiers, so they go only to people with a reading role (viewer, clinician) and to
the service accounts of the hospital's registered DICOM nodes, never to another service account;
each retrieval is an access-log entry written with the read.

Files: a stored file is opened only when its key is inside its row's hospital's storage
(``recognition.storage.storage_key_for_tenant``; otherwise a logged 404), and DICOM is read only
through ``recognition.dicom.dicom_read`` (inflating bounded by the upload limit).

Answers are DICOM's own (application/dicom+json, multipart/related); refusals are the platform's
one error shape with a ``Warning`` header saying the same, and the 4xx status PS3.18 names.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.files.storage import default_storage
from django.db import transaction
from django.http import Http404, HttpResponse, JsonResponse
from django.utils.http import parse_header_parameters
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser, DataAndFiles
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from accounts.access import member_action_record
from accounts.models import AccessEvent, Membership, Role, ServiceAccount
from accounts.permissions import Action
from accounts.selectors import membership_resolve
from accounts.services import require
from core.errors import DomainError, Forbidden, Invalid, NotFound, UnsupportedMedia, error_body
from core.streaming import CHUNK_BYTES, Part, multipart_response, streaming_response
from protocols.core import Failure, failure_of
from recognition import dicom
from recognition.storage import ForeignStorageKey, storage_key_for_tenant

from . import dicomjson, selectors
from .dicomjson import element
from .multipart import multipart_parts

logger = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# the roles whose members read images: they may have the originals, identifiers and all
READING_ROLES = frozenset({Role.VIEWER, Role.CLINICIAN})
# FailureReason values (PS3.4 Annex GG / PS3.18 Table 10.5.3-1)
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900  # also: the instance belongs to another study than the URL names
CANNOT_UNDERSTAND = 0xC000


class NotAcceptable(DomainError):
    status, code = 406, "not_acceptable"


# --- who is calling -------------------------------------------------------------------------------


class _Unread(BaseParser):
    """Reads nothing: the CSRF check asks DRF for the form fields, and STOW reads its own body."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return DataAndFiles({}, {})


class _AnyAccept(BaseContentNegotiation):
    """Each view reads Accept and Content-Type itself (DICOM's media types, not DRF's)."""

    def select_parser(self, request, parsers):
        return _Unread()

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def _failure_response(failure: Failure) -> HttpResponse:
    response = JsonResponse(error_body(failure.code, failure.message, failure.detail), status=failure.status)
    response["Warning"] = _warning(failure.message)
    for name, value in failure.headers.items():
        response[name] = value
    return response


def _warning(*texts: str) -> str:
    """An RFC 7234 Warning header (PS3.18 8.6.3): code 299, the agent, the text quoted."""
    clean = [text.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "/") for text in texts]
    return ", ".join(f'299 sightline "{text}"' for text in clean)


class DicomwebView(APIView):
    """The API's authentication, throttle and hospital; DICOM's formats; never a 500 for a refusal."""

    content_negotiation_class = _AnyAccept
    renderer_classes = [JSONRenderer]
    parser_classes: list = []  # STOW reads its own body, a part at a time

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        request.membership = membership_resolve(
            user=request.user, tenant_slug=request.headers.get("X-Tenant"), request=request
        )

    def handle_exception(self, exc):
        if isinstance(exc, Http404):
            exc = NotFound("Not found.")
        elif isinstance(exc, DjangoPermissionDenied):
            exc = Forbidden("You do not have permission to do this.")
        failure = failure_of(exc)
        if failure is None:  # a bug: logged with its traceback (never with the query string)
            logger.exception("DICOMweb request %s failed", getattr(self.request, "request_id", ""))
            failure = Failure(500, "server_error", "Something went wrong on our side.")
        return _failure_response(failure)


def not_found(request, rest: str = ""):
    """A path DICOMweb does not serve: its 404 in the same shape (no sign-in needed to learn that)."""
    return _failure_response(Failure(404, "not_found", "DICOMweb serves no such resource."))


def originals_require(membership: Membership, *, request) -> None:
    """403 (logged) unless the member may have the stored originals, identifiers and all: a person
    with a reading role, or the service account of one of the hospital's registered nodes."""
    require(membership, Action.IMAGE_VIEW, request=request)
    if ServiceAccount.objects.filter(membership=membership).exists():
        allowed = selectors.is_registered_node(membership)
    else:
        allowed = membership.role in READING_ROLES
    if allowed:
        return
    member_action_record(membership, "dicomweb.originals", outcome=AccessEvent.Outcome.DENIED, request=request)
    raise Forbidden(
        "The stored originals carry the hospital's patient identifiers: only members with a reading role "
        "and the hospital's registered DICOM nodes may retrieve them.",
        code="originals_refused",
    )


# --- Accept -----------------------------------------------------------------------------------------


def _accepted(request) -> list[tuple[str, dict[str, str]]]:
    """The Accept header's media ranges (q=0 left out), in the client's order; */* when absent."""
    header = request.headers.get("Accept", "") or "*/*"
    ranges = []
    for item in header.split(","):
        if not item.strip():
            continue
        media, params = parse_header_parameters(item.strip())
        params = {name.lower(): value for name, value in params.items()}
        if params.get("q", "1").strip() in {"0", "0.0", "0.00", "0.000"}:
            continue
        ranges.append((media.lower(), params))
    return ranges


def _multipart_dicom_accepted(request, *, transfer_syntaxes: set[str]) -> None:
    """406 unless the client takes multipart/related; type="application/dicom" as stored (this
    server sends each instance in the transfer syntax it was received in; it does not transcode)."""
    for media, params in _accepted(request):
        if media in {"*/*", "multipart/*"}:
            return
        if media == "multipart/related" and params.get("type", DICOM).lower() in {DICOM, "*/*", "application/*"}:
            asked = params.get("transfer-syntax", "*")
            if asked == "*" or transfer_syntaxes <= {asked}:
                return
    raise NotAcceptable(
        'This server sends instances as multipart/related; type="application/dicom" in the transfer syntax '
        "they were stored in (transfer-syntax=*); it does not transcode.",
        detail={"stored_transfer_syntaxes": sorted(transfer_syntaxes)},
    )


def _json_accepted(request) -> None:
    for media, _ in _accepted(request):
        if media in {"*/*", "application/*", DICOM_JSON, "application/json"}:
            return
    raise NotAcceptable("This server answers in DICOM JSON (application/dicom+json).")


RENDERED_TYPES = ("image/png", "image/jpeg")


def _rendered_type(request, stored: str) -> str:
    for media, _ in _accepted(request):
        if media in {"*/*", "image/*"}:
            return stored
        if media in RENDERED_TYPES:
            return media
    raise NotAcceptable("Rendered frames are PNG (image/png) or JPEG (image/jpeg).")


def _dicom_json(request, body: list | dict, *, warnings: list[str] | None = None, status: int = 200) -> HttpResponse:
    response = HttpResponse(json.dumps(body, separators=(",", ":")), content_type=DICOM_JSON, status=status)
    if warnings:
        response["Warning"] = _warning(*warnings)
    return response


# --- URLs in answers ---------------------------------------------------------------------------------


def _base(request) -> str:
    return request.build_absolute_uri("/dicomweb")


def study_url(request, study_uid: str) -> str:
    return f"{_base(request)}/studies/{study_uid}"


def series_url(request, study_uid: str, series_uid: str) -> str:
    return f"{study_url(request, study_uid)}/series/{series_uid}"


def instance_url(request, study_uid: str, series_uid: str, instance_uid: str) -> str:
    return f"{series_url(request, study_uid, series_uid)}/instances/{instance_uid}"


# --- QIDO-RS --------------------------------------------------------------------------------------------


def _study_json(request, study, wanted: set[str]) -> list[tuple[str, dict]]:
    values = {
        "StudyInstanceUID": (study.study_instance_uid,),
        "StudyDate": (study.study_date.strftime("%Y%m%d") if study.study_date else None,),
        "StudyTime": (),
        "StudyID": (),
        "AccessionNumber": (study.accession_number,),
        "StudyDescription": (study.description,),
        "RetrieveURL": (study_url(request, study.study_instance_uid),),
    }
    if hasattr(study, "modalities"):
        values["ModalitiesInStudy"] = tuple(study.modalities)
    if hasattr(study, "series_count"):
        values["NumberOfStudyRelatedSeries"] = (study.series_count,)
        values["NumberOfStudyRelatedInstances"] = (study.instance_count,)
    return [element(name, *values[name]) for name in wanted if name in values]


def _series_json(request, series, wanted: set[str]) -> list[tuple[str, dict]]:
    study = series.study
    values = {
        "SeriesInstanceUID": (series.series_instance_uid,),
        "Modality": (series.modality,),
        "SeriesNumber": (series.number,),
        "SeriesDescription": (series.description,),
        "RetrieveURL": (series_url(request, study.study_instance_uid, series.series_instance_uid),),
    }
    if hasattr(series, "instance_count"):
        values["NumberOfSeriesRelatedInstances"] = (series.instance_count,)
    pairs = [element(name, *values[name]) for name in wanted if name in values]
    study_wanted = wanted & {"StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription"}
    return pairs + _study_json(request, study, study_wanted)


def _instance_json(request, instance, wanted: set[str]) -> list[tuple[str, dict]]:
    study, series = instance.study, instance.series
    values = {
        "SOPClassUID": (instance.sop_class_uid,),
        "SOPInstanceUID": (instance.sop_instance_uid,),
        "InstanceNumber": (instance.instance_number,),
        "Rows": (instance.rows,),
        "Columns": (instance.columns,),
        "NumberOfFrames": (instance.frames or None,),
        "AvailableTransferSyntaxUID": (instance.transfer_syntax_uid,),
        "RetrieveURL": (
            instance_url(request, study.study_instance_uid, series.series_instance_uid, instance.sop_instance_uid),
        ),
    }
    pairs = [element(name, *values[name]) for name in wanted if name in values]
    pairs += _series_json(request, series, wanted & {"SeriesInstanceUID", "Modality", "SeriesNumber"})
    return pairs + _study_json(request, study, wanted & {"StudyInstanceUID", "StudyDate", "AccessionNumber"})


def _search(
    request, *, level: str, levels: tuple[str, ...], find, render, study: str | None = None, series: str | None = None
) -> HttpResponse:
    membership = request.membership
    require(membership, Action.IMAGE_VIEW, request=request)
    _json_accepted(request)
    query = selectors.query_parse(request.query_params, level=level, levels=levels)
    wanted = dicomjson.included(level, query.includefield)
    in_study, in_series = _scoped(request, study, series, action="dicomweb.search")  # a logged 404 first
    with transaction.atomic():
        found = find(membership, query, in_study, in_series)
        member_action_record(membership, "dicomweb.search", request=request, target_type=level)
    answer = [dicomjson.dataset(render(request, row, wanted)) for row in found]
    return _dicom_json(request, answer, warnings=query.warnings)


def _scoped(request, study_uid: str | None, series_uid: str | None = None, *, action: str):
    study = series = None
    if study_uid is not None:
        study = selectors.study_by_uid_get(
            membership=request.membership, study_uid=study_uid, request=request, action=action
        )
    if series_uid is not None and study is not None:  # a series is named inside its study
        series = selectors.series_by_uid_get(
            membership=request.membership, study=study, series_uid=series_uid, request=request, action=action
        )
    return study, series


class StudiesView(DicomwebView):
    """GET: QIDO-RS search for studies. POST: STOW-RS."""

    def get(self, request):
        return _search(
            request,
            level="study",
            levels=("study",),
            find=lambda membership, query, _study, _series: selectors.qido_studies(membership=membership, query=query),
            render=_study_json,
        )

    def post(self, request):
        return stow(request, study_uid=None)


class SeriesSearchView(DicomwebView):
    """QIDO-RS: a study's series, or every series of the hospital."""

    def get(self, request, study: str | None = None):
        def find(membership, query, in_study, _series):
            return selectors.qido_series(membership=membership, query=query, study=in_study)

        levels = ("series",) if study else ("series", "study")
        return _search(request, level="series", levels=levels, find=find, render=_series_json, study=study)


class InstanceSearchView(DicomwebView):
    """QIDO-RS: a series' instances, a study's, or every instance of the hospital."""

    def get(self, request, study: str | None = None, series: str | None = None):
        def find(membership, query, in_study, in_series):
            return selectors.qido_instances(membership=membership, query=query, study=in_study, series=in_series)

        levels = ("instance",) if series else ("instance", "series") if study else ("instance", "series", "study")
        return _search(
            request, level="instance", levels=levels, find=find, render=_instance_json, study=study, series=series
        )


# --- WADO-RS ---------------------------------------------------------------------------------------------


def _file_blocks(name: str) -> Iterator[bytes]:
    with default_storage.open(name, "rb") as stored:
        while block := stored.read(CHUNK_BYTES):
            yield block


def _instance_part(request, instance) -> Part:
    syntax = instance.transfer_syntax_uid
    content_type = f"{DICOM}; transfer-syntax={syntax}" if syntax else DICOM
    location = instance_url(
        request, instance.study.study_instance_uid, instance.series.series_instance_uid, instance.sop_instance_uid
    )
    return Part(
        content_type=content_type, content=_file_blocks(instance.file.name), headers={"Content-Location": location}
    )


def _foreign_stored(rows) -> object | None:
    """The first row (an Instance, or an Image for a rendered frame) whose stored file's key is not
    plainly inside its own hospital's storage (recognition.storage.storage_key_for_tenant decides);
    None when every key is. Checked before any file is opened: such a file is never served."""
    for row in rows:
        try:
            storage_key_for_tenant(tenant_id=row.tenant_id, key=str(row.file.name or ""))
        except ForeignStorageKey:
            return row
    return None


def _foreign_refused(membership: Membership, request, *, action: str, row) -> NotFound:
    """A stored key outside the row's hospital: a 404 like a missing object, logged for the
    operators (the row's id, never its key or identifiers) and in the access log as denied."""
    kind = "image" if row._meta.model_name == "image" else "instance"
    logger.error("DICOMweb %s: %s %s's stored file is outside its hospital's storage; not served", action, kind, row.pk)
    member_action_record(
        membership, action, outcome=AccessEvent.Outcome.DENIED, request=request, target_type=kind, target_id=row.pk
    )
    return NotFound(f"No such {kind}.")


def _retrieval(request, *, study_uid: str, series_uid: str | None = None, instance_uid: str | None = None, what: str):
    """The instances a retrieval names, its access-log entry written in the read's transaction. The
    lookups come first, outside it: a denied (another hospital's) UID stays logged as it 404s; so
    does an instance whose stored key is not its hospital's (``_foreign_stored``)."""
    membership = request.membership
    originals_require(membership, request=request)
    action = f"dicomweb.{what}"
    if instance_uid is not None:
        instance = selectors.instance_get(
            membership=membership,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_uid=instance_uid,
            request=request,
            action=action,
        )
        if (foreign := _foreign_stored([instance])) is not None:
            raise _foreign_refused(membership, request, action=action, row=foreign)
        with transaction.atomic():
            member_action_record(membership, action, request=request, target_type="instance", target_id=instance.pk)
        return [instance]
    study, series = _scoped(request, study_uid, series_uid, action=action)
    target_type, target_id = ("series", series.pk) if series is not None else ("study", study.pk)
    with transaction.atomic():
        # the rows only (a few hundred bytes each); the files are streamed
        instances = list(selectors.retrieval_instances(membership=membership, study=study, series=series))
        if (foreign := _foreign_stored(instances)) is None:
            member_action_record(membership, action, request=request, target_type=target_type, target_id=target_id)
    if foreign is not None:  # none of it is sent: the denied entry outlives the read's transaction
        raise _foreign_refused(membership, request, action=action, row=foreign)
    return instances


class RetrieveView(DicomwebView):
    """WADO-RS: a study, a series or an instance as multipart/related; type="application/dicom".
    A POST to a study's URL is STOW-RS into that study."""

    def get(self, request, study: str, series: str | None = None, instance: str | None = None):
        instances = _retrieval(request, study_uid=study, series_uid=series, instance_uid=instance, what="retrieve")
        _multipart_dicom_accepted(request, transfer_syntaxes={i.transfer_syntax_uid for i in instances} - {""})
        parts = (_instance_part(request, row) for row in instances)
        return multipart_response(request, parts, parameters={"type": DICOM})

    def post(self, request, study: str, series: str | None = None, instance: str | None = None):
        if series is not None or instance is not None:
            raise _method_not_allowed()
        return stow(request, study_uid=study)


def _method_not_allowed():
    from rest_framework.exceptions import MethodNotAllowed

    return MethodNotAllowed("POST")


# what a header in /metadata leaves out: the bulk data of PS3.18 8.7.3.3 (over this many bytes)
BULK_DATA_THRESHOLD = 1024
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
PIXEL_GROUP_START = 0x7FE00000  # (7FE0,0000): the pixel data group, and every tag after it


def _header_json(instance) -> dict:
    # the bounded reader, as for anything from outside: a stored original is kept as it was received,
    # deflated ones too, and is read (and inflated) up to the upload limit only
    limit = settings.SIGHTLINE_MAX_UPLOAD_BYTES
    with default_storage.open(instance.file.name, "rb") as stored:
        data = stored.read(limit + 1)  # one byte past the limit: dicom_read refuses it, never reads on
    header = dicom.dicom_read(data, max_bytes=limit)
    del header[PIXEL_GROUP_START:]  # the pixel data and what follows it (padding, signatures): as stop_before_pixels

    def drop_bulk(dataset) -> None:
        for elem in list(dataset):
            if elem.VR == "SQ":
                for item in elem.value:
                    drop_bulk(item)
            elif elem.VR in _BULK_VRS and elem.value is not None and len(elem.value) > BULK_DATA_THRESHOLD:
                del dataset[elem.tag]

    drop_bulk(header)
    return header.to_json_dict()


def _headers(instances) -> Iterator[bytes]:
    """The metadata array, an instance at a time (each file read up to its pixel data)."""
    yield b"["
    for index, instance in enumerate(instances):
        try:
            body = _header_json(instance)
        except Exception:  # a stored file that no longer parses: said in the answer, not a 500
            logger.warning("DICOMweb metadata: instance %s could not be read", instance.pk, exc_info=True)
            body = dicomjson.dataset(
                [element("SOPInstanceUID", instance.sop_instance_uid), element("SOPClassUID", instance.sop_class_uid)]
            )
        yield (b"," if index else b"") + json.dumps(body, separators=(",", ":")).encode()
    yield b"]"


class MetadataView(DicomwebView):
    """WADO-RS metadata: the stored headers as DICOM JSON, without pixel data or other bulk data."""

    def get(self, request, study: str, series: str | None = None, instance: str | None = None):
        instances = _retrieval(request, study_uid=study, series_uid=series, instance_uid=instance, what="metadata")
        _json_accepted(request)
        return streaming_response(request, _headers(instances), content_type=DICOM_JSON)


class RenderedView(DicomwebView):
    """WADO-RS rendered: a frame's display copy (made when the instance was received) as PNG or JPEG."""

    def get(self, request, study: str, series: str, instance: str, frame: str = "1"):
        membership = request.membership
        require(membership, Action.IMAGE_VIEW, request=request)
        number = selectors.whole_number(frame, what="A rendered frame's number (counted from 1)", code="bad_frame")
        if number < 1:
            raise Invalid("A rendered frame is one frame number, counted from 1.", code="bad_frame")
        _rendered_type(request, RENDERED_TYPES[0])  # a 406 before anything is read or logged
        found = selectors.instance_get(
            membership=membership,
            study_uid=study,
            series_uid=series,
            instance_uid=instance,
            request=request,
            action="dicomweb.rendered",
        )
        if found.frames == 0:
            raise NotAcceptable("This instance holds no image (an SR, a presentation state, …): nothing to render.")
        if number > found.frames:  # before any query: a number past the instance's frames names nothing
            raise NotFound(f"This instance has {found.frames} frame(s).")
        with transaction.atomic():
            image = selectors.instance_frame_image(instance=found, frame=number)
            foreign = _foreign_stored([image]) if image is not None else None
            if image is not None and foreign is None:
                member_action_record(
                    membership, "dicomweb.rendered", request=request, target_type="image", target_id=image.pk
                )
        if foreign is not None:
            raise _foreign_refused(membership, request, action="dicomweb.rendered", row=foreign)
        if image is None:
            raise NotFound("This frame has no rendering (yet): the instance may still be being prepared.")
        name = str(image.file.name)
        stored = "image/jpeg" if name.endswith(".jpg") else "image/png"
        wanted = _rendered_type(request, stored)
        if wanted == stored:
            return streaming_response(request, _file_blocks(name), content_type=stored)
        return HttpResponse(_converted(name, wanted), content_type=wanted)


def _converted(name: str, content_type: str) -> bytes:
    """A display copy in the other format (a display copy is small: at most the display size)."""
    from PIL import Image as PILImage

    with default_storage.open(name, "rb") as stored, PILImage.open(stored) as picture:
        picture.load()
        out = io.BytesIO()
        if content_type == "image/jpeg":
            picture.convert("L" if picture.mode in {"L", "I;16", "I"} else "RGB").save(out, "JPEG", quality=90)
        else:
            picture.save(out, "PNG")
    return out.getvalue()


# --- STOW-RS ------------------------------------------------------------------------------------------------


def _part_study_uid(data: bytes) -> str:
    """A part's Study Instance UID, for the study URL's check before anything is stored; read with
    the platform's bounded reader (a deflated part inflated only up to the upload limit: past it,
    ``DicomTooLarge``). Blank where the part does not parse: the ingest then says why."""
    try:
        header = dicom.dicom_read(data, max_bytes=settings.SIGHTLINE_MAX_UPLOAD_BYTES)
    except dicom.DicomTooLarge:
        raise
    except dicom.DicomError:
        return ""
    return str(header.get("StudyInstanceUID", "") or "")


def _stow_content_type(request) -> str:
    """The body's boundary; 415 unless it is multipart/related of application/dicom parts."""
    media, params = parse_header_parameters(request.headers.get("Content-Type", ""))
    params = {name.lower(): value for name, value in params.items()}
    if media.lower() != "multipart/related":
        raise UnsupportedMedia('STOW-RS takes multipart/related; type="application/dicom" bodies.')
    kind = params.get("type", DICOM).lower()
    if kind != DICOM:
        raise UnsupportedMedia(
            f'This server stores DICOM files (type="application/dicom"), not {kind[:60]} parts.',
            code="unsupported_media_type",
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise Invalid("The multipart body's Content-Type has no boundary.", code="bad_multipart")
    return boundary


def stow(request, *, study_uid: str | None) -> HttpResponse:
    """Each part through the platform's one DICOM ingest (dicomnet.ingest.instance_receive: the
    same checks, limits, pseudonymisation and access log as the SCP and an upload); one answer
    per part, so a refused part does not lose the others (PS3.18 10.5)."""
    from dicomnet.ingest import instance_receive  # the SCP's ingest

    membership = request.membership
    require(membership, Action.IMAGE_UPLOAD, request=request)
    _json_accepted(request)
    if study_uid is not None:
        selectors.uid_checked(study_uid, what="Study Instance UID")
    boundary = _stow_content_type(request)
    referenced: list[dict] = []
    failed: list[dict] = []
    studies: set[str] = set()
    warnings: list[str] = []
    raw = request._request  # Django's request: read a block at a time, never whole
    for part in multipart_parts(raw.read, boundary=boundary, part_limit=settings.SIGHTLINE_MAX_UPLOAD_BYTES):

        def refuse(reason: int, sop_class: str = "", sop_instance: str = "") -> None:
            failed.append(dicomjson.failed_item(sop_class_uid=sop_class, sop_instance_uid=sop_instance, reason=reason))

        part_type = parse_header_parameters(part.content_type)[0].lower() if part.content_type else DICOM
        if part.too_large:
            refuse(OUT_OF_RESOURCES)
            continue
        if part.malformed or part_type != DICOM:
            refuse(CANNOT_UNDERSTAND)
            continue
        if study_uid is not None and part.data:
            # PS3.18 10.5.1: an instance of another study than the URL's is refused, unstored
            try:
                part_study = _part_study_uid(part.data)
            except dicom.DicomTooLarge:
                refuse(OUT_OF_RESOURCES)
                continue
            if part_study and part_study != study_uid:
                refuse(DATA_SET_MISMATCH)
                continue
        try:
            received = instance_receive(membership=membership, data=part.data, request=request)
        except DomainError as exc:
            refuse(PROCESSING_FAILURE if exc.status >= 500 else CANNOT_UNDERSTAND)
            continue
        except Exception:  # one part's bug must not lose the parts after it
            logger.exception("DICOMweb STOW part failed in request %s", getattr(request, "request_id", ""))
            refuse(PROCESSING_FAILURE)
            continue
        sop_class, sop_instance = received.sop_class_uid, received.sop_instance_uid  # the ingest's own reading
        if received.status == "refused" or received.instance is None:
            refuse(int(received.dimse_status or PROCESSING_FAILURE), sop_class, sop_instance)
            continue
        if received.http_status == 202:  # kept, with a reason (e.g. an encoding no decoder here reads)
            warnings.append(f"{sop_instance}: {received.reason}")
        row = received.instance
        row_study, row_series = row.study.study_instance_uid, row.series.series_instance_uid
        studies.add(row_study)
        status = int(received.dimse_status or 0)
        referenced.append(
            dicomjson.referenced_item(
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                retrieve_url=instance_url(request, row_study, row_series, sop_instance),
                warning=status if status and status >> 12 == 0xB else None,
            )
        )
    if not referenced and not failed:
        raise Invalid("The multipart body holds no instance.", code="no_input")
    one_study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    body = dicomjson.stow_response(
        referenced=referenced, failed=failed, retrieve_url=study_url(request, one_study) if one_study else None
    )
    status = 200 if not (failed or warnings) else 202 if referenced else 409
    return _dicom_json(request, body, status=status, warnings=warnings)
