"""Reads for hospitals and people, and the one way a request finds its hospital.

Reading the access log is the audit app's (audit/selectors.py): it sits above this app and
recognition, and looks up patients and studies, which this app never imports."""

from __future__ import annotations

from core.errors import Forbidden, Invalid, NotFound

from .models import TARGET_ID_LENGTH, AccessEvent, Invitation, Membership
from .permissions import Action


def memberships_active(*, user):
    return (
        Membership.objects.filter(user=user, is_active=True, tenant__is_active=True)
        .select_related("tenant", "user")
        .order_by("tenant__name")
    )


# Set on the request by accounts.authentication.MembershipJWTAuthentication: (the X-Tenant it
# was read for, or "", and the user's active memberships it read with the user: up to two).
ACTIVE_MEMBERSHIPS = "_sightline_active_memberships"


def membership_resolve(*, user, tenant_slug: str | None, request=None) -> Membership:
    """The membership a request acts under: the named hospital, or the only one.

    A hospital the user does not belong to answers 404 like one that does not exist.
    """
    slug = tenant_slug or ""
    read = getattr(request, ACTIVE_MEMBERSHIPS, None)
    if read is not None and read[0] == slug:
        candidates = read[1]  # read in this request's authentication query, not again
    else:
        memberships = memberships_active(user=user)
        candidates = list((memberships.filter(tenant__slug=slug) if slug else memberships)[:2])
    if slug:
        membership = candidates[0] if candidates else None
        if membership is None:
            from .services import access_event_record

            access_event_record(
                action="tenant.select",
                outcome=AccessEvent.Outcome.DENIED,
                request=request,
                user=user,
                target_type="tenant",
                target_id=slug[:TARGET_ID_LENGTH],
            )
            raise NotFound("No such hospital.")
        _touch(membership)
        return membership
    if not candidates:
        raise Forbidden("You are not a member of any hospital.")
    if len(candidates) > 1:
        raise Invalid(
            "You belong to several hospitals: name one with the X-Tenant header.",
            code="tenant_required",
        )
    _touch(candidates[0])
    return candidates[0]


def _touch(membership: Membership) -> None:
    from .services import membership_touch

    membership_touch(membership)


def membership_get(*, actor: Membership, membership_id: int, request=None) -> Membership:
    """A member of the actor's hospital; another hospital's member is 404 like a missing one."""
    from .access import tenant_object_get
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return tenant_object_get(
        _people(Membership.objects.select_related("user", "tenant")),
        membership=actor,
        pk=membership_id,
        request=request,
        action="membership.view",
        target_type="membership",
        message="No such member.",
    )


def membership_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return (
        _people(Membership.objects.for_tenant(actor.tenant))
        .select_related("user")
        .order_by("-is_active", "user__username")
    )


def _people(memberships):
    """Service accounts' memberships are managed on their own page (accounts.service_accounts),
    where their roles stay within what a service account may hold."""
    return memberships.filter(user__service_account__isnull=True)


def invitation_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return Invitation.objects.for_tenant(actor.tenant).filter(accepted_at__isnull=True).order_by("-created")


ACTIVITY_ACTIONS = ("membership.", "invitation.", "tenant.", "two_factor.", "service_account.", "api_key.")


def activity_list(*, actor: Membership, request=None):
    """The hospital's people-related events: invitations, grants, role changes, deactivations."""
    from django.db.models import Q

    from .services import require

    require(actor, Action.ACTIVITY_VIEW, request=request)
    prefixes = Q()
    for prefix in ACTIVITY_ACTIONS:
        prefixes |= Q(action__startswith=prefix)
    return AccessEvent.objects.filter(prefixes, tenant=actor.tenant).order_by("-created", "-id")


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
