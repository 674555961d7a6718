"""Reads for hospitals and people, and the one way a request finds its hospital."""

from __future__ import annotations

from config.errors import Forbidden, Invalid, NotFound

from .models import AccessEvent, Membership


def memberships_active(*, user):
    return (
        Membership.objects.filter(user=user, is_active=True, tenant__is_active=True)
        .select_related("tenant", "user")
        .order_by("tenant__name")
    )


def membership_resolve(*, user, tenant_slug: str | None, request=None) -> Membership:
    """The membership a request acts under: the named hospital, or the only one.

    A hospital the user does not belong to answers 404 like one that does not exist.
    """
    memberships = memberships_active(user=user)
    if tenant_slug:
        membership = memberships.filter(tenant__slug=tenant_slug).first()
        if membership is None:
            from .services import access_event_record

            access_event_record(
                action="tenant.select",
                outcome=AccessEvent.Outcome.DENIED,
                request=request,
                user=user,
                target_type="tenant",
                target_id=tenant_slug[:64],
            )
            raise NotFound("No such hospital.")
        return membership
    first_two = list(memberships[:2])
    if not first_two:
        raise Forbidden("You are not a member of any hospital.")
    if len(first_two) > 1:
        raise Invalid(
            "You belong to several hospitals: name one with the X-Tenant header.",
            code="tenant_required",
        )
    return first_two[0]
