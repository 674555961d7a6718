"""Reads of clinical data, always through the member's hospital.

``image_get``, ``study_get`` and ``review_get`` reach their rows through the access helper
(accounts.access.tenant_object_get): another hospital's row and a missing one both answer 404,
and the attempt is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from django.conf import settings
from django.db.models import OuterRef, Prefetch, Q, QuerySet, Subquery

from accounts.access import member_action_record, tenant_object_get
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.cursor import BAD_CURSOR, cursor_decode, cursor_encode
from core.errors import Conflict, Invalid, NotFound
from core.pseudonym import PATIENT, pseudonym_candidates

from . import dicom
from .models import Image, InferenceRequest, Result, Review, Study


def _with_ai_state(queryset: QuerySet) -> QuerySet:
    latest = InferenceRequest.objects.filter(image=OuterRef("pk")).order_by("-id")
    return queryset.annotate(
        ai_status=Subquery(latest.values("status")[:1]),
        ai_error=Subquery(latest.values("error")[:1]),
        ai_top_label=Subquery(latest.values("result__top_label")[:1]),
        ai_top_probability=Subquery(latest.values("result__top_probability")[:1]),
    )


def image_list(*, membership: Membership, request=None, protocol: bool = False) -> QuerySet:
    """The hospital's images, newest first. Reading the list is itself logged. Images that came
    by a model-server protocol (protocols/) are listed only when ``protocol`` asks for them, and
    then alone: clinicians' lists stay theirs."""
    require(membership, Action.IMAGE_VIEW, request=request)
    member_action_record(membership, "image.list", request=request, target_type="image")
    images = Image.objects.for_tenant(membership.tenant)
    images = images.exclude(study__protocol="") if protocol else images.filter(study__protocol="")
    return _with_ai_state(images.select_related("study").order_by("-created", "-id"))


def image_get(*, membership: Membership, image_id: int, request=None, action: str = "image.view") -> Image:
    """One image of the member's hospital, its access logged as ``action``."""
    require(membership, Action.IMAGE_VIEW, request=request)
    image = tenant_object_get(
        _with_ai_state(Image.objects.all())
        .select_related("study", "series")
        .prefetch_related(
            Prefetch(
                "results",
                queryset=Result.objects.select_related("model_version__model").order_by("-created"),
            )
        ),
        membership=membership,
        pk=image_id,
        request=request,
        action=action,
        target_type="image",
        message="No such image.",
    )
    member_action_record(membership, action, request=request, target_type="image", target_id=image.pk)
    return image


def image_neighbours(image: Image) -> tuple[int | None, int | None, int, int]:
    """(previous id, next id, position, count) of the image within its study: series by number,
    then instance number, frame and id."""
    ids = list(
        Image.objects.filter(study_id=image.study_id)
        .order_by("series__number", "instance_number", "frame_number", "id")
        .values_list("id", flat=True)
    )
    index = ids.index(image.pk)
    return (
        ids[index - 1] if index > 0 else None,
        ids[index + 1] if index + 1 < len(ids) else None,
        index + 1,
        len(ids),
    )


def review_get(*, membership: Membership, review_id: int, request=None, for_update: bool = False) -> Review:
    """One review of the member's hospital; another hospital's is a 404, and logged."""
    require(membership, Action.IMAGE_VIEW, request=request)
    return tenant_object_get(
        Review.objects.select_related("image"),
        membership=membership,
        pk=review_id,
        request=request,
        action="review.view",
        target_type="review",
        message="No such review.",
        for_update=for_update,
    )


def review_history(*, image: Image) -> QuerySet[Review]:
    """An image's reviews, newest first (the image was reached through image_get)."""
    return (
        Review.objects.filter(image=image, tenant_id=image.tenant_id)
        .select_related("author", "signed_off_by", "model_version__model", "amends")
        .order_by("-created", "-id")
    )


def study_get(*, membership: Membership, study_id: int, request=None) -> Study:
    """One study of the member's hospital (404 for another's, logged)."""
    require(membership, Action.IMAGE_VIEW, request=request)
    study = tenant_object_get(
        Study.objects.all(),
        membership=membership,
        pk=study_id,
        request=request,
        action="study.view",
        target_type="study",
        message="No such study.",
    )
    member_action_record(membership, "study.view", request=request, target_type="study", target_id=study.pk)
    return study


@dataclass(frozen=True)
class WorklistFilters:
    ai_status: str = ""
    finding: str = ""
    modality: str = ""
    review: str = ""  # a Study.ReviewState, or "reviewed" for in review or signed off
    date_from: date | None = None
    date_to: date | None = None
    q: str = ""  # a patient id (raw or pseudonymous) or an accession number, exactly; POSTed, never in a URL
    sort: str = "newest"
    protocol: bool = False  # the "protocol reads" filter: only the studies protocol reads made


# sort name → (field, descending); the id breaks ties, so (value, id) is a key for the cursor
WORKLIST_SORTS = {
    "newest": ("created", True),
    "oldest": ("created", False),
    "patient": ("patient_pseudonym", False),
    "accession": ("accession_number", False),
}
WORKLIST_PAGE = 50
WORKLIST_PAGE_MAX = 200  # the most a client may ask for in one page
# Frames allowed when a stored file is parsed again for its values only (no pixels decoded): the
# upload already passed the frame limit, so this one only keeps the parser bounded.
REPARSE_MAX_FRAMES = 10**6


def _cursor_purpose(sort: str) -> str:
    return f"worklist:{sort}"  # a cursor of one sort order is refused by another


def _cursor_encode(value, pk: int, sort: str) -> str:
    value = value.isoformat() if isinstance(value, datetime) else value
    return cursor_encode([value, pk], purpose=_cursor_purpose(sort))


def _cursor_decode(cursor: str, sort: str):
    field = WORKLIST_SORTS[sort][0]
    try:
        value, pk = cursor_decode(cursor, purpose=_cursor_purpose(sort))
        if field == "created":
            value = datetime.fromisoformat(value)
        return str(value) if field != "created" else value, int(pk)
    except (ValueError, TypeError):
        raise Invalid(BAD_CURSOR, code="bad_cursor") from None


def _patient_or_accession(*, tenant, q: str) -> Q:
    """A search term is a pseudonym as shown, a raw patient id (hashed under every key of the
    pseudonym ring, so studies made before a rotation are found) or an accession number."""
    pseudonyms = [q, *pseudonym_candidates(q, purpose=PATIENT, scope=tenant.pk)]
    return Q(patient_pseudonym__in=pseudonyms) | Q(accession_number=q)


def study_worklist(
    *, membership: Membership, filters: WorklistFilters, cursor: str = "", limit: int = WORKLIST_PAGE, request=None
) -> tuple[list[Study], str]:
    """One page of the hospital's studies and the cursor of the next page ("" at the end). Keyset
    pagination on (sort field, id) over the worklist indexes: as fast on page 2,000 as on page 1."""
    require(membership, Action.IMAGE_VIEW, request=request)
    if filters.sort not in WORKLIST_SORTS:
        raise Invalid(f"Sort by one of: {', '.join(WORKLIST_SORTS)}.", code="bad_sort")
    studies = Study.objects.for_tenant(membership.tenant)
    # protocol reads (protocols/) stay out of clinicians' worklists unless asked for
    studies = studies.exclude(protocol="") if filters.protocol else studies.filter(protocol="")
    if filters.ai_status:
        studies = studies.filter(ai_status=filters.ai_status)
    if filters.finding:
        studies = studies.filter(top_label=filters.finding)
    if filters.modality:
        studies = studies.filter(modality=filters.modality)
    if filters.review == "reviewed":
        studies = studies.exclude(review_state=Study.ReviewState.UNREVIEWED)
    elif filters.review:
        studies = studies.filter(review_state=filters.review)
    if filters.date_from:
        studies = studies.filter(study_date__gte=filters.date_from)
    if filters.date_to:
        studies = studies.filter(study_date__lte=filters.date_to)
    if filters.q:
        studies = studies.filter(_patient_or_accession(tenant=membership.tenant, q=filters.q))
    field, descending = WORKLIST_SORTS[filters.sort]
    if cursor:
        value, pk = _cursor_decode(cursor, filters.sort)
        after = "lt" if descending else "gt"
        studies = studies.filter(Q(**{f"{field}__{after}": value}) | Q(**{field: value, f"id__{after}": pk}))
    prefix = "-" if descending else ""
    page = list(studies.order_by(f"{prefix}{field}", f"{prefix}id")[: limit + 1])
    member_action_record(membership, "study.list", request=request, target_type="study")
    if len(page) <= limit:
        return page, ""
    page = page[:limit]
    return page, _cursor_encode(getattr(page[-1], field), page[-1].pk, filters.sort)


def image_rendering(image: Image):
    """The stored display rendering (PNG) of an image reached through image_get."""
    if image.state == Image.State.RECEIVED:
        raise Conflict("This image is received and still being prepared for display; try again soon.", code="rendering")
    if not image.file:
        raise Conflict(
            f"This image is kept but cannot be displayed: {image.unprocessable_reason}", code="unprocessable"
        )
    return image.file.open("rb")


def image_modality_pixels(image: Image) -> bytes:
    """A grayscale DICOM frame's modality values (e.g. Hounsfield units) as little-endian float32,
    row-major, for the viewer's window/level: stored when the frame was rendered, so a call reads
    one frame's values and never parses the original again."""
    if not image.is_dicom:  # a PNG/JPEG has none, received or rendered
        raise NotFound("This image has no modality values; it is shown as stored.", code="no_pixels")
    if image.state == Image.State.RECEIVED:
        raise Conflict("This image is received and still being prepared for display; try again soon.", code="rendering")
    if not image.has_modality_pixels:
        raise NotFound("This image has no modality values; it is shown as stored.", code="no_pixels")
    if image.pixels:
        with image.pixels.open("rb") as stored:
            return stored.read()
    # rendered before the values were stored: parsed once more, through the bounded reader
    with image.original.open("rb") as stored:
        data = stored.read(settings.SIGHTLINE_MAX_UPLOAD_BYTES + 1)
    try:
        parsed = dicom.parse(
            data,
            max_pixels=settings.SIGHTLINE_MAX_IMAGE_PIXELS,
            max_frames=REPARSE_MAX_FRAMES,
            max_bytes=settings.SIGHTLINE_MAX_UPLOAD_BYTES,
            decode_first=False,
        )
        return dicom.frame_modality(parsed, image.frame_number).astype("<f4").tobytes()
    except dicom.DicomError as exc:
        raise Conflict(f"This image's values cannot be read: {exc.message}", code="unprocessable") from exc
