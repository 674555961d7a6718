"""The worklist's columns: one place recomputes a study's AI status, top finding and review state
from its images, requests, results and reviews, and tells the hospital's open pages."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from django.db.models import OuterRef, Subquery
from django.utils import timezone

from accounts.events import studies_updated_on_commit
from core.bulk import rows_update

from ..models import Image, InferenceRequest, Result, Review, Study

AIStatus, ReviewState = Study.AIStatus, Study.ReviewState
_STATUS_ORDER = [AIStatus.RUNNING, AIStatus.QUEUED, AIStatus.FAILED, AIStatus.DONE, AIStatus.UNPROCESSABLE]


def _study_ai_status(statuses: list[str | None]) -> str:  # None: an image with no read
    """Work in progress first, then a failure, then done; unprocessable only when nothing else."""
    present = set(statuses)
    return next((status for status in _STATUS_ORDER if status in present), AIStatus.NONE)


def _image_ai_status(row: Mapping[str, Any]) -> str | None:
    if row["unprocessable_reason"]:
        return AIStatus.UNPROCESSABLE
    if row["state"] == Image.State.RECEIVED and row["read_on_render"]:
        return AIStatus.QUEUED  # decode: received, its read queued once the worker renders it
    return row["request_status"]


def study_summary_refresh(study_ids: Iterable[int]) -> None:
    """Recompute the worklist columns of these studies (inside the caller's transaction) and send
    ``study.updated`` to their hospitals after commit."""
    study_ids = set(study_ids)
    if not study_ids:
        return
    # shadow reads (services/shadow.py) are compared on the agreement page, never shown here
    latest_request = InferenceRequest.objects.filter(image=OuterRef("pk"), shadow=False).order_by("-id")
    latest_review = Review.objects.filter(image=OuterRef("pk")).order_by("-created", "-id")
    images = (
        Image.objects.filter(study_id__in=study_ids)
        .annotate(
            request_status=Subquery(latest_request.values("status")[:1]),
            review_signed=Subquery(latest_review.values("signed_off_at")[:1]),
            review_id=Subquery(latest_review.values("id")[:1]),
        )
        .values(
            "id",
            "study_id",
            "unprocessable_reason",
            "request_status",
            "review_id",
            "review_signed",
            "state",
            "read_on_render",
        )
    )
    by_study: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for image in images:
        by_study[image["study_id"]].append(image)
    best: dict[int, tuple[float, str]] = {}
    reviewable: set[int] = set()
    for study_id, image_id, label, probability in Result.objects.filter(
        image__study_id__in=study_ids, request__shadow=False
    ).values_list("image__study_id", "image_id", "top_label", "top_probability"):
        reviewable.add(image_id)
        if study_id not in best or probability > best[study_id][0]:
            best[study_id] = (probability, label)

    studies = list(Study.objects.filter(id__in=study_ids))
    now = timezone.now()
    for study in studies:
        rows = by_study.get(study.pk, [])
        study.image_count = len(rows)
        study.ai_status = _study_ai_status([_image_ai_status(row) for row in rows])
        study.top_probability, study.top_label = best.get(study.pk, (None, ""))
        reviewed = [row for row in rows if row["review_id"] is not None]
        to_sign = [row for row in rows if row["id"] in reviewable or row["review_id"] is not None]
        if to_sign and all(row["review_signed"] is not None for row in to_sign):
            study.review_state = ReviewState.SIGNED_OFF
        elif reviewed:
            study.review_state = ReviewState.IN_REVIEW
        else:
            study.review_state = ReviewState.UNREVIEWED
        study.updated = now
    rows_update(studies, ["image_count", "ai_status", "top_label", "top_probability", "review_state", "updated"])
    study_updated_on_commit(studies)


def study_updated_on_commit(studies: list[Study]) -> None:
    """Tell the hospitals' open worklists which rows to re-render, after commit."""
    studies_updated_on_commit((study.tenant_id, study.pk) for study in studies)
