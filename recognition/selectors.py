"""Reads of clinical data, always through the member's hospital.

``image_get`` is the one access helper for images: another hospital's image and a missing
one both answer 404, and the attempt is logged.
"""

from __future__ import annotations

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery

from accounts.models import AccessEvent, Membership
from accounts.permissions import Action
from accounts.services import access_event_record, require
from config.errors import NotFound

from .models import Image, InferenceRequest, Result


def _with_ai_state(queryset: QuerySet) -> QuerySet:
    latest = InferenceRequest.objects.filter(image=OuterRef("pk")).order_by("-id")
    return queryset.annotate(
        ai_status=Subquery(latest.values("status")[:1]),
        ai_error=Subquery(latest.values("error")[:1]),
        ai_top_label=Subquery(latest.values("result__top_label")[:1]),
        ai_top_probability=Subquery(latest.values("result__top_probability")[:1]),
    )


def image_list(*, membership: Membership, request=None) -> QuerySet:
    """The hospital's images, newest first. Reading the list is itself logged."""
    require(membership, Action.IMAGE_VIEW, request=request)
    access_event_record(
        action="image.list", request=request, user=membership.user, tenant=membership.tenant, target_type="image"
    )
    return _with_ai_state(
        Image.objects.for_tenant(membership.tenant).select_related("study").order_by("-created", "-id")
    )


def image_heatmap_get(*, membership: Membership, image_id: int, request=None) -> Result:
    """The newest result with a Grad-CAM overlay for one image of the member's hospital."""
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.heatmap")
    result = next((r for r in image.results.all() if r.heatmap), None)
    if result is None:
        raise NotFound("This image has no heatmap.")
    return result


def image_get(*, membership: Membership, image_id: int, request=None, action: str = "image.view") -> Image:
    """One image of the member's hospital, its access logged as ``action``."""
    require(membership, Action.IMAGE_VIEW, request=request)
    image = (
        _with_ai_state(Image.objects.for_tenant(membership.tenant))
        .select_related("study", "series")
        .prefetch_related(
            Prefetch(
                "results",
                queryset=Result.objects.select_related("model_version__model").order_by("-created"),
            )
        )
        .filter(pk=image_id)
        .first()
    )
    if image is None:
        access_event_record(
            action=action,
            outcome=AccessEvent.Outcome.DENIED,
            request=request,
            user=membership.user,
            tenant=membership.tenant,
            target_type="image",
            target_id=image_id,
        )
        raise NotFound("No such image.")
    access_event_record(
        action=action,
        request=request,
        user=membership.user,
        tenant=membership.tenant,
        target_type="image",
        target_id=image.pk,
    )
    return image
