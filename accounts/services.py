"""Writes for hospitals, people and the access log."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction

from config.errors import Forbidden

from .models import AccessEvent, Membership, Role, Tenant
from .permissions import Action, can

Outcome = AccessEvent.Outcome


def _request_context(request) -> dict:
    if request is None:
        return {}
    meta = request.META
    context = {
        "ip_address": meta.get("REMOTE_ADDR") or None,
        "user_agent": meta.get("HTTP_USER_AGENT", "")[:256],
        "request_id": getattr(request, "request_id", "")[:64],
    }
    token = getattr(request, "auth", None)
    jti = token.get("jti") if hasattr(token, "get") else None
    if jti:
        context["token_id"] = str(jti)[:32]
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
) -> AccessEvent:
    """Append one entry. Call it inside the action's transaction: if it fails, the action fails."""
    context = _request_context(request)
    if user is None and request is not None:
        user = getattr(request, "user", None)
    if user is not None and not user.is_authenticated:
        user = None
    label = user.get_username() if user is not None else username
    token_id = context.pop("token_id", None)
    if token_id:
        label = f"{label} (token {token_id})"
    return AccessEvent.objects.create(
        action=action,
        outcome=outcome,
        actor=user,
        actor_label=label[:150],
        tenant=tenant,
        target_type=target_type,
        target_id=str(target_id)[:64],
        **context,
    )


def require(membership: Membership, action: Action, *, request=None) -> None:
    """403 for a member whose role lacks ``action``; the denial is logged."""
    if can(membership, action):
        return
    access_event_record(
        action=str(action),
        outcome=Outcome.DENIED,
        request=request,
        user=membership.user,
        tenant=membership.tenant,
    )
    raise Forbidden(f"Your role in {membership.tenant.name} does not allow this.")


@transaction.atomic
def tenant_create(*, name: str, slug: str) -> Tenant:
    return Tenant.objects.create(name=name, slug=slug)


@transaction.atomic
def membership_grant(*, tenant: Tenant, user, role: Role, granted_by=None) -> Membership:
    membership, created = Membership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
    if not created and (membership.role != role or not membership.is_active):
        membership.role, membership.is_active = role, True
        membership.save(update_fields=["role", "is_active"])
        created = True
    if created:
        access_event_record(
            action="membership.role_change",
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
