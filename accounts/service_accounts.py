"""Service accounts and their API keys: writes and reads.

A service account is a Django user with an unusable password and exactly one Membership, in its
hospital, with one role that is never ``tenant_admin``: every scoping mechanism, access helper and
role check applies to it unchanged. It authenticates with API keys (``slk_<prefix>_<secret>``),
each kept as a SHA-256 hash, limited to a rate, revocable at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import F, Prefetch, QuerySet
from django.utils import timezone

from core.errors import Conflict, Gone, Invalid

from .access import member_action_record, tenant_object_get
from .events import access_revoked_on_commit, api_key_revoked_on_commit
from .models import DESCRIPTION_LENGTH, KEY_SCHEME, AccessEvent, ApiKey, Membership, Role, ServiceAccount
from .permissions import Action
from .services import access_event_record, membership_grant, require

Outcome = AccessEvent.Outcome

SERVICE_ACCOUNT_ROLES = (Role.VIEWER, Role.CLINICIAN, Role.AUDITOR)
SERVICE_ACCOUNT_ROLE_CHOICES = [(str(role), role.label) for role in SERVICE_ACCOUNT_ROLES]
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_PREFIX_LENGTH = 12  # 60 random bits: finds the key, names it; not part of the secret
_SECRET_BYTES = 32  # 256 random bits: the secret part of a key
_KEY = re.compile(rf"^{KEY_SCHEME}([a-z2-7]{{{_PREFIX_LENGTH}}})_([A-Za-z0-9_-]{{43}})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,49}$")
API_KEY_RATE_MAX = 6000  # requests per minute; a bulk client that needs more should send archives
# the key in use and its replacement while a client is switched over; a third means revoke one first
API_KEYS_PER_ACCOUNT = 2
LAST_USED_RESOLUTION = timedelta(minutes=1)  # write last_used at most this often per key


class KeyRefused(Exception):
    """The presented key does not authenticate (the message says why, for the client)."""


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def service_account_username(*, tenant_slug: str, name: str) -> str:
    """``svc:<hospital>:<name>``: the colon is not allowed in a person's username (the sign-up
    form's validator refuses it), so no person can take or imitate a service account's name."""
    return f"svc:{tenant_slug}:{name}"


def is_service_account(user) -> bool:
    return bool(user is not None and user.pk and ServiceAccount.objects.filter(user_id=user.pk).exists())


def _check_role(role: str) -> None:
    if role == Role.TENANT_ADMIN:
        raise Invalid("A service account cannot be a hospital admin.", code="invalid_role")
    if role not in SERVICE_ACCOUNT_ROLES:
        choices = ", ".join(str(r) for r in SERVICE_ACCOUNT_ROLES)
        raise Invalid(f"{role!r} is not a service account role; choose one of {choices}.", code="invalid_role")


def _check_rate(rate: int) -> None:
    if not 1 <= rate <= API_KEY_RATE_MAX:
        raise Invalid(f"A key's rate is 1 to {API_KEY_RATE_MAX:,} requests per minute.", code="invalid_rate")


# --- reads -------------------------------------------------------------------------------------


def service_account_list(*, actor: Membership, request=None) -> QuerySet[ServiceAccount]:
    """The hospital's service accounts, live ones first, each with its keys (newest first)."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    keys = ApiKey.objects.order_by(F("revoked_at").asc(nulls_first=True), "-created")
    return (
        ServiceAccount.objects.for_tenant(actor.tenant)
        .select_related("membership", "user", "tenant")
        .prefetch_related(Prefetch("keys", queryset=keys))
        .order_by(F("revoked_at").asc(nulls_first=True), "name")
    )


def service_account_get(*, actor: Membership, service_account_id: int, request=None) -> ServiceAccount:
    """One of the actor's hospital's service accounts; another hospital's is 404 like a missing one."""
    return tenant_object_get(
        service_account_list(actor=actor, request=request),
        membership=actor,
        pk=service_account_id,
        request=request,
        action="service_account.view",
        target_type="service_account",
        message="No such service account.",
    )


def api_key_get(*, actor: Membership, api_key_id: int, request=None) -> ApiKey:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    return tenant_object_get(
        ApiKey.objects.select_related("service_account", "service_account__user"),
        membership=actor,
        pk=api_key_id,
        request=request,
        action="api_key.view",
        target_type="api_key",
        message="No such key.",
    )


# --- writes ------------------------------------------------------------------------------------


def service_account_create(
    *, actor: Membership, name: str, role: str, description: str = "", interactive: bool = False, request=None
) -> ServiceAccount:
    """A new service account of the actor's hospital, with its one membership. It has no key yet.
    ``interactive``: its model-server protocol reads go to the interactive lane, not the bulk one."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    _check_role(role)
    if not _NAME.match(name):
        raise Invalid(
            "A service account's name is 1 to 50 lowercase letters, digits and hyphens, starting with a "
            "letter or digit (e.g. nightly-import).",
            code="invalid_name",
        )
    tenant = actor.tenant
    username = service_account_username(tenant_slug=tenant.slug, name=name)
    User = get_user_model()
    taken = Conflict(f"{tenant.name} already has a service account named {name!r}.", code="name_taken")
    try:
        with transaction.atomic():
            if User.objects.filter(username=username).exists():
                raise taken
            user = User.objects.create_user(username=username, password=None)  # unusable password
            membership = membership_grant(
                tenant=tenant, user=user, role=Role(role), granted_by=actor.user, request=request
            )
            account = ServiceAccount.objects.create(
                tenant=tenant,
                user=user,
                membership=membership,
                name=name,
                description=description[:DESCRIPTION_LENGTH],
                interactive=interactive,
                created_by=actor.user,
            )
            access_event_record(
                action="service_account.create",
                request=request,
                user=actor.user,
                tenant=tenant,
                target_type="service_account",
                target_id=account.pk,
            )
    except IntegrityError:  # a concurrent create of the same name
        raise taken from None
    return account


def service_account_revoke(*, actor: Membership, service_account: ServiceAccount, request=None) -> ServiceAccount:
    """For good: its membership ends, every key is revoked, its open sockets close."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    if service_account.revoked_at is not None:
        return service_account
    now = timezone.now()
    with transaction.atomic():
        ServiceAccount.objects.filter(pk=service_account.pk).update(revoked_at=now)
        Membership.objects.filter(pk=service_account.membership_id).update(is_active=False)
        ApiKey.objects.filter(service_account=service_account, revoked_at__isnull=True).update(revoked_at=now)
        member_action_record(
            actor,
            "service_account.revoke",
            request=request,
            target_type="service_account",
            target_id=service_account.pk,
        )
        access_revoked_on_commit(user_id=service_account.user_id, tenant_id=None)
    service_account.refresh_from_db()
    return service_account


def _new_key() -> tuple[str, str]:
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(_PREFIX_LENGTH))
    return prefix, f"{KEY_SCHEME}{prefix}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def api_key_create(
    *, actor: Membership, service_account: ServiceAccount, rate: int | None = None, request=None
) -> tuple[ApiKey, str]:
    """A new key; the raw key is returned this once and never stored."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    rate = settings.SIGHTLINE_API_KEY_RATE_PER_MINUTE if rate is None else rate
    _check_rate(rate)
    with transaction.atomic():
        # the account's row lock serialises concurrent creates against the per-account cap
        account = ServiceAccount.objects.select_for_update().get(pk=service_account.pk, tenant=actor.tenant)
        if account.revoked_at is not None:
            raise Gone("This service account has been revoked; create a new one.", code="service_account_revoked")
        if ApiKey.objects.filter(service_account=account, revoked_at__isnull=True).count() >= API_KEYS_PER_ACCOUNT:
            raise Conflict(
                f"A service account holds at most {API_KEYS_PER_ACCOUNT} live keys; revoke one first.",
                code="too_many_keys",
            )
        prefix, raw = _new_key()
        key = ApiKey.objects.create(
            tenant=actor.tenant,
            service_account=account,
            prefix=prefix,
            key_hash=_hash(raw),
            rate=rate,
            created_by=actor.user,
        )
        member_action_record(actor, "api_key.create", request=request, target_type="api_key", target_id=key.public_id)
    return key, raw


def api_key_revoke(*, actor: Membership, api_key: ApiKey, request=None) -> ApiKey:
    """Takes effect on the key's next request; its open sockets close after commit."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if revoked:
            member_action_record(
                actor, "api_key.revoke", request=request, target_type="api_key", target_id=api_key.public_id
            )
            api_key_revoked_on_commit(api_key_id=api_key.pk)
    api_key.refresh_from_db()
    return api_key


# --- authentication ----------------------------------------------------------------------------


def api_key_looks_like_one(raw: str) -> bool:
    """Whether a credential is meant as an API key (then no other scheme may try it)."""
    return raw.startswith(KEY_SCHEME)


def api_key_authenticate(*, raw: str, request=None) -> ApiKey:
    """The live key ``raw`` is, with its account and user; ``KeyRefused`` otherwise.

    ``request`` is the Django request (never DRF's, which would authenticate again to log).
    A wrong secret for a real key and any use of a revoked key are logged; a key that matches
    no prefix names nothing to log against."""
    match = _KEY.match(raw)
    if match is None:
        raise KeyRefused("The API key is malformed.")
    key = (
        ApiKey.objects.select_related("service_account", "service_account__user", "tenant")
        .filter(prefix=match.group(1))
        .first()
    )
    if key is None:
        raise KeyRefused("The API key is not valid.")
    if not hmac.compare_digest(key.key_hash, _hash(raw)):
        access_event_record(
            action="auth.api_key",
            outcome=Outcome.FAILED,
            request=request,
            username=f"key {key.public_id}",
            tenant=key.tenant,
            target_type="api_key",
            target_id=key.public_id,
        )
        raise KeyRefused("The API key is not valid.")
    account = key.service_account
    if key.revoked_at is not None or account.revoked_at is not None or not account.user.is_active:
        access_event_record(
            action="auth.api_key",
            outcome=Outcome.DENIED,
            request=request,
            user=account.user,
            tenant=key.tenant,
            target_type="api_key",
            target_id=key.public_id,
        )
        raise KeyRefused("The API key has been revoked.")
    now = timezone.now()
    if key.last_used is None or now - key.last_used > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used=now)
        key.last_used = now
    return key


def api_key_is_live(*, api_key_id: int) -> bool:
    return ApiKey.objects.filter(
        pk=api_key_id, revoked_at__isnull=True, service_account__revoked_at__isnull=True
    ).exists()
