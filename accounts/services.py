"""Writes for hospitals, people and the access log."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from core.errors import Conflict, Forbidden, Gone, Invalid

from .audit import chain_append
from .events import access_revoked_on_commit
from .models import (
    ACTOR_LABEL_LENGTH,
    REQUEST_ID_LENGTH,
    TARGET_ID_LENGTH,
    USER_AGENT_LENGTH,
    AccessEvent,
    Invitation,
    Membership,
    Role,
    Tenant,
)
from .permissions import ADMIN_ACTIONS, Action, can

Outcome = AccessEvent.Outcome

INVITATION_TOKEN_BYTES = 32  # 256 random bits in an invitation link
TOKEN_ID_CHARS = 32  # of a JWT's id in the access log's actor label (a uuid4 hex is 32)


def _ip(value: str | None) -> str | None:
    """The address in its one canonical text form (it is part of the entry's hash)."""
    try:
        return ipaddress.ip_address(value).compressed if value else None
    except ValueError:
        return None


def _request_context(request) -> dict:
    if request is None:
        return {}
    meta = request.META
    context = {
        "ip_address": _ip(meta.get("REMOTE_ADDR")),
        "user_agent": meta.get("HTTP_USER_AGENT", "")[:USER_AGENT_LENGTH],
        "request_id": getattr(request, "request_id", "")[:REQUEST_ID_LENGTH],
    }
    token: Any = getattr(request, "auth", None)  # a JWT, an API key or None: whichever authenticator let it in
    jti = token.get("jti") if hasattr(token, "get") else None
    if jti:
        context["token_id"] = str(jti)[:TOKEN_ID_CHARS]
    key_id = getattr(token, "public_id", None)  # a service account's API key (accounts.models.ApiKey)
    if key_id:
        context["key_id"] = key_id
    return context


def access_event_record(
    *,
    action: str,
    outcome: str = Outcome.SUCCESS,
    request=None,
    user=None,
    username: str = "",
    tenant: Tenant | None = None,
    target_type: str = "",
    target_id: object = "",
    key_id: str = "",
) -> AccessEvent:
    """Append one entry. Call it inside the action's transaction: if it fails, the action fails.
    ``key_id``: the service-account key acting where there is no request (a WebSocket)."""
    context = _request_context(request)
    if key_id:
        context.setdefault("key_id", key_id)
    if user is None and request is not None:
        user = getattr(request, "user", None)
    if user is not None and not user.is_authenticated:
        user = None
    label = user.get_username() if user is not None else username
    token_id = context.pop("token_id", None)
    if token_id:
        label = f"{label} (token {token_id})"
    key_id = context.pop("key_id", None)
    if key_id:
        label = f"{label} (key {key_id})"
    return chain_append(
        AccessEvent(
            action=action,
            outcome=outcome,
            actor=user,
            actor_label=label[:ACTOR_LABEL_LENGTH],
            tenant=tenant,
            target_type=target_type,
            target_id=str(target_id)[:TARGET_ID_LENGTH],
            **context,
        )
    )


def _two_factor_verified(request) -> bool:
    """A browser session verified with a code (django-otp), or an API token whose ``amr`` claim
    says a second factor was given when it was obtained (kept across refreshes)."""
    from rest_framework_simplejwt.tokens import Token

    token = getattr(request, "auth", None)
    if isinstance(token, Token):
        return "otp" in (token.get("amr") or ())
    user = getattr(request, "user", None)
    return bool(user is not None and getattr(user, "is_verified", lambda: False)())


def require(membership: Membership, action: Action, *, request=None) -> None:
    """403 for a member whose role lacks ``action``; the denial is logged.

    Hospitals that require a second factor for their admins also refuse admin actions to
    a session that has not been verified with a one-time code.
    """
    allowed = can(membership, action)
    second_factor_missing = (
        allowed
        and action in ADMIN_ACTIONS
        and membership.tenant.require_admin_two_factor
        and not _two_factor_verified(request)
    )
    if allowed and not second_factor_missing:
        return
    access_event_record(
        action=str(action),
        outcome=Outcome.DENIED,
        request=request,
        user=membership.user,
        tenant=membership.tenant,
    )
    if second_factor_missing:
        raise Forbidden(
            f"{membership.tenant.name} requires its admins to sign in with a one-time code. "
            "Set up two-factor sign-in under your account, then sign in again.",
            code="two_factor_required",
        )
    raise Forbidden(f"Your role in {membership.tenant.name} does not allow this.")


@transaction.atomic
def tenant_create(*, name: str, slug: str, created_by=None) -> Tenant:
    tenant = Tenant.objects.create(name=name, slug=slug)
    access_event_record(
        action="tenant.create", user=created_by, tenant=tenant, target_type="tenant", target_id=tenant.pk
    )
    return tenant


@transaction.atomic
def membership_grant(*, tenant: Tenant, user, role: Role, granted_by=None, request=None) -> Membership:
    membership, created = Membership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
    if not created and (membership.role != role or not membership.is_active):
        membership.role, membership.is_active = role, True
        membership.save(update_fields=["role", "is_active"])
        created = True
    if created:
        access_event_record(
            action="membership.grant",
            request=request,
            user=granted_by,
            tenant=tenant,
            target_type="membership",
            target_id=membership.pk,
        )
    return membership


def user_get_or_create(*, username: str, password: str, **fields):
    User = get_user_model()
    user = User.objects.filter(username=username).first()
    if user is None:
        user = User.objects.create_user(username=username, password=password, **fields)
    return user


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def invitation_create(*, actor: Membership, email: str, role: str, request=None) -> tuple[Invitation, str]:
    """Invite someone into the actor's hospital. The link is e-mailed; only its hash is kept."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    _check_role(role)
    try:
        validate_email(email)
    except ValidationError:
        raise Invalid(f"{email!r} is not an e-mail address.", code="invalid_email") from None
    raw = secrets.token_urlsafe(INVITATION_TOKEN_BYTES)
    with transaction.atomic():
        invitation = Invitation.objects.create(
            tenant=actor.tenant,
            email=email,
            role=role,
            token_hash=_hash_token(raw),
            invited_by=actor.user,
            expires_at=timezone.now() + timedelta(days=settings.SIGHTLINE_INVITATION_DAYS),
        )
        access_event_record(
            action="invitation.create",
            request=request,
            user=actor.user,
            tenant=actor.tenant,
            target_type="invitation",
            target_id=invitation.pk,
        )
        path = reverse("invitation-accept", kwargs={"token": raw})
        link = request.build_absolute_uri(path) if request is not None else path
        tenant_name, days = actor.tenant.name, settings.SIGHTLINE_INVITATION_DAYS
        transaction.on_commit(
            lambda: send_mail(
                f"You are invited to {tenant_name} on Sightline",
                f"Open this link within {days} days to join {tenant_name}:\n\n{link}\n\n"
                "The link works once. If you did not expect it, ignore this message.",
                None,
                [email],
            ),
            robust=True,  # the invitation stands; an admin can send another if mail was down
        )
    return invitation, raw


def invitation_for_token(raw: str) -> Invitation:
    invitation = Invitation.objects.select_related("tenant").filter(token_hash=_hash_token(raw)).first()
    if invitation is None or not invitation.is_usable or not invitation.tenant.is_active:
        raise Gone("This invitation link has expired or has already been used.", code="invitation_unusable")
    return invitation


def invitation_accept(*, raw_token: str, user, request=None) -> Membership:
    """Single use: the first acceptance wins, a second one is refused."""
    with transaction.atomic():
        invitation = invitation_for_token(raw_token)
        claimed = Invitation.objects.filter(
            pk=invitation.pk, accepted_at__isnull=True, expires_at__gt=timezone.now()
        ).update(accepted_at=timezone.now(), accepted_by=user)
        if claimed != 1:
            raise Gone("This invitation link has expired or has already been used.", code="invitation_unusable")
        if Membership.objects.filter(tenant=invitation.tenant, user=user, is_active=True).exists():
            raise Conflict(
                f"You are already a member of {invitation.tenant.name}; ask an admin to change your role.",
                code="already_a_member",
            )
        role = Role(invitation.role)
        membership = membership_grant(
            tenant=invitation.tenant, user=user, role=role, granted_by=invitation.invited_by, request=request
        )
        access_event_record(
            action="invitation.accept",
            request=request,
            user=user,
            tenant=invitation.tenant,
            target_type="invitation",
            target_id=invitation.pk,
        )
    return membership


def _ensure_an_admin_remains(membership: Membership) -> None:
    """Call inside the change's transaction: the hospital row lock serialises concurrent changes."""
    Tenant.objects.select_for_update().filter(pk=membership.tenant_id).first()
    others = (
        Membership.objects.for_tenant(membership.tenant)
        .filter(role=Role.TENANT_ADMIN, is_active=True, user__is_active=True)
        .exclude(pk=membership.pk)
    )
    if membership.role == Role.TENANT_ADMIN and not others.exists():
        raise Invalid("A hospital needs at least one active admin.", code="last_admin")


def _membership_changed(*, action: str, actor: Membership, membership: Membership, request) -> None:
    """Inside the change's transaction: log it, and after commit the member's live sockets
    re-check what they may still receive."""
    access_event_record(
        action=action,
        request=request,
        user=actor.user,
        tenant=actor.tenant,
        target_type="membership",
        target_id=membership.pk,
    )
    access_revoked_on_commit(user_id=membership.user_id, tenant_id=membership.tenant_id)


def _check_role(role: str) -> None:
    if role not in Role.values:
        raise Invalid(f"{role!r} is not a role; choose one of {', '.join(Role.values)}.", code="invalid_role")


def membership_change_role(*, actor: Membership, membership: Membership, role: str, request=None) -> Membership:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    _check_role(role)
    if role == membership.role:
        return membership
    with transaction.atomic():
        if role != Role.TENANT_ADMIN:
            _ensure_an_admin_remains(membership)
        membership.role = role
        membership.save(update_fields=["role"])
        _membership_changed(action="membership.role_change", actor=actor, membership=membership, request=request)
    return membership


def membership_deactivate(*, actor: Membership, membership: Membership, request=None) -> Membership:
    """Takes effect at once: API calls for this hospital fail, open sockets for it close."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    if not membership.is_active:
        return membership
    with transaction.atomic():
        _ensure_an_admin_remains(membership)
        membership.is_active = False
        membership.save(update_fields=["is_active"])
        _membership_changed(action="membership.deactivate", actor=actor, membership=membership, request=request)
    return membership


def user_deactivate(*, user, deactivated_by=None, request=None) -> None:
    """Platform staff: the person can no longer sign in, refresh or use any token or socket."""
    with transaction.atomic():
        type(user).objects.filter(pk=user.pk).update(is_active=False)
        access_event_record(
            action="user.deactivate", request=request, user=deactivated_by, target_type="user", target_id=user.pk
        )
        access_revoked_on_commit(user_id=user.pk, tenant_id=None)


def membership_touch(membership: Membership) -> None:
    """Record activity for the members page, at most once a minute per membership."""
    now = timezone.now()
    if membership.last_seen is None or now - membership.last_seen > timedelta(minutes=1):
        Membership.objects.filter(pk=membership.pk).update(last_seen=now)
        membership.last_seen = now
