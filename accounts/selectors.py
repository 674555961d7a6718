"""Reads for hospitals and people, and the one way a request finds its hospital."""

from __future__ import annotations

from config.errors import Forbidden, Invalid, NotFound

from .models import AccessEvent, Invitation, Membership
from .permissions import Action


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
        _touch(membership)
        return membership
    first_two = list(memberships[:2])
    if not first_two:
        raise Forbidden("You are not a member of any hospital.")
    if len(first_two) > 1:
        raise Invalid(
            "You belong to several hospitals: name one with the X-Tenant header.",
            code="tenant_required",
        )
    _touch(first_two[0])
    return first_two[0]


def _touch(membership: Membership) -> None:
    from .services import membership_touch

    membership_touch(membership)


def membership_get(*, actor: Membership, membership_id: int, request=None) -> Membership:
    """A member of the actor's hospital; another hospital's member is 404 like a missing one."""
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    membership = (
        Membership.objects.for_tenant(actor.tenant).select_related("user", "tenant").filter(pk=membership_id).first()
    )
    if membership is None:
        from .services import access_event_record

        access_event_record(
            action="membership.view",
            outcome=AccessEvent.Outcome.DENIED,
            request=request,
            user=actor.user,
            tenant=actor.tenant,
            target_type="membership",
            target_id=membership_id,
        )
        raise NotFound("No such member.")
    return membership


def membership_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return Membership.objects.for_tenant(actor.tenant).select_related("user").order_by("-is_active", "user__username")


def invitation_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return Invitation.objects.for_tenant(actor.tenant).filter(accepted_at__isnull=True).order_by("-created")


ACTIVITY_ACTIONS = ("membership.", "invitation.", "tenant.")


def activity_list(*, actor: Membership, request=None):
    """The hospital's people-related events: invitations, grants, role changes, deactivations."""
    from django.db.models import Q

    from .services import require

    require(actor, Action.ACTIVITY_VIEW, request=request)
    prefixes = Q()
    for prefix in ACTIVITY_ACTIONS:
        prefixes |= Q(action__startswith=prefix)
    return AccessEvent.objects.filter(prefixes, tenant=actor.tenant).order_by("-created", "-id")


def access_log_list(*, actor: Membership, request=None):
    """Every access-log entry of the auditor's hospital. The read itself is logged."""
    from .services import access_event_record, require

    require(actor, Action.AUDIT_VIEW, request=request)
    access_event_record(action="audit.view", request=request, user=actor.user, tenant=actor.tenant)
    return AccessEvent.objects.filter(tenant=actor.tenant).order_by("-created", "-id")


def membership_for_session(request) -> Membership:
    """The hospital a browser session works in: the one it chose, else the first it belongs to."""
    memberships = memberships_active(user=request.user)
    slug = request.session.get("tenant_slug")
    membership = memberships.filter(tenant__slug=slug).first() if slug else None
    if membership is None:  # never chosen, or access to the chosen one has ended
        membership = memberships.first()
        if membership is None:
            raise Forbidden("You are not a member of any hospital.")
        request.session["tenant_slug"] = membership.tenant.slug
    _touch(membership)
    return membership
