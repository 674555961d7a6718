"""Clinicians review AI findings: agree, disagree or correct the label, then sign off. A signed
review never changes; a later review of the same image amends it, and the history stays."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from accounts.access import member_action_record
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.errors import Conflict, Invalid
from dicomnet.sending import review_export_on_commit

from ..models import Review
from ..selectors import image_get, review_get
from .studies import study_summary_refresh

Verdict = Review.Verdict
COMMENT_LIMIT = 2000


def _clean(*, verdict: str, label: str, comment: str, result) -> tuple[str, str]:
    if verdict not in Verdict.values:
        raise Invalid(f"Choose a verdict: {', '.join(Verdict.values)}.", code="bad_verdict")
    if len(comment) > COMMENT_LIMIT:
        raise Invalid(f"The comment is longer than {COMMENT_LIMIT} characters.", code="comment_too_long")
    labels = result.model_version.labels
    if verdict == Verdict.AGREE:
        return result.top_label, comment
    if verdict == Verdict.CORRECT and not label:
        raise Invalid("A correction needs the label you read.", code="label_required")
    if label and label not in labels:
        raise Invalid(f"{label!r} is not a label of this model; use one of {', '.join(labels)}.", code="bad_label")
    if verdict == Verdict.CORRECT and label == result.top_label:
        raise Invalid("That is the AI's own label: agree instead of correcting.", code="same_label")
    return label, comment


def review_save(
    *,
    membership: Membership,
    image_id: int,
    verdict: str,
    label: str = "",
    comment: str = "",
    sign_off: bool = False,
    request=None,
) -> Review:
    """Save the member's review of an image's newest AI finding, as a draft or signed off.

    The member's own draft is updated in place; a signed review is amended by a new one; another
    clinician's unsigned draft is theirs to finish (409)."""
    require(membership, Action.REVIEW_WRITE, request=request)
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.review")
    result = next(iter(image.results.all()), None)
    if result is None:
        raise Conflict("This image has no AI finding to review yet.", code="no_finding")
    label, comment = _clean(verdict=verdict, label=label.strip(), comment=comment.strip(), result=result)
    user, now = membership.user, timezone.now()
    with transaction.atomic():
        latest = (
            Review.objects.for_tenant(membership.tenant)
            .select_for_update()
            .filter(image=image)
            .order_by("-created", "-id")
            .first()
        )
        if latest is not None and not latest.is_signed:
            if latest.author_id != user.pk:
                raise Conflict(
                    "Another clinician has an unsigned draft review of this image; it is theirs to sign off.",
                    code="draft_of_another",
                )
            review, action = latest, "review.save"
        else:
            review = Review(tenant=membership.tenant, image=image, author=user, amends=latest, created=now)
            action = "review.amend" if latest is not None else "review.save"
        review.result, review.model_version, review.ai_label = result, result.model_version, result.top_label
        review.verdict, review.label, review.comment, review.updated = verdict, label, comment, now
        if sign_off:
            review.signed_off_at, review.signed_off_by = now, user
        review.save()
        member_action_record(membership, action, request=request, target_type="review", target_id=review.pk)
        if sign_off:
            member_action_record(
                membership, "review.sign_off", request=request, target_type="review", target_id=review.pk
            )
        study_summary_refresh([image.study_id])
        if sign_off:
            review_export_on_commit(review)  # issue 15: the verdict as an SR to the PACS
    return review


def review_sign_off(*, membership: Membership, review_id: int, request=None) -> Review:
    """Sign off one's own draft as it stands."""
    require(membership, Action.REVIEW_WRITE, request=request)
    with transaction.atomic():
        review = review_get(membership=membership, review_id=review_id, request=request, for_update=True)
        if review.is_signed:
            raise Conflict("This review is already signed off; amend it with a new review.", code="already_signed")
        if review.author_id != membership.user_id:
            raise Conflict("Only the author of a draft signs it off.", code="not_the_author")
        review.signed_off_at, review.signed_off_by = timezone.now(), membership.user
        review.save(update_fields=["signed_off_at", "signed_off_by"])
        member_action_record(membership, "review.sign_off", request=request, target_type="review", target_id=review.pk)
        study_summary_refresh([review.image.study_id])
        review_export_on_commit(review)  # issue 15: the verdict as an SR to the PACS (dicomnet/sending.py)
    return review
