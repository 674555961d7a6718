"""The second factor: TOTP devices (django-otp), recovery codes, enrolment codes, resets.

- A user with a confirmed authenticator gives a code at every sign-in (page and token endpoint);
  a recovery code works once in its place.
- Where a first enrolment could otherwise be done by whoever holds the password (an admin of a
  hospital that requires a second factor, platform staff in production), it needs a one-time
  enrolment code issued by another admin of the hospital or by platform staff.
- Codes of every kind are random, high-entropy strings: only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from core.errors import Forbidden, Invalid

from .models import AccessEvent, Membership, RecoveryCode, Role, Tenant, TwoFactorEnrolmentCode
from .permissions import Action

RECOVERY_CODES = 10
# 16 characters of a 32-letter alphabet: 80 random bits, so a stolen hash cannot be searched
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1
_CODE_LENGTH = 16
_CODE_GROUP = 4  # shown as XXXX-XXXX-XXXX-XXXX
# Longer than any code with its hyphens: a longer input is refused before it is hashed.
_MAX_CODE_INPUT = 64
_TOTP = re.compile(r"^\d{6,8}$")

# amr claim values (RFC 8176) a token carries
AMR_PASSWORD = "pwd"  # noqa: S105  (a claim value, not a password)
AMR_OTP = "otp"


def _random_code() -> str:
    raw = "".join(secrets.choice(_ALPHABET) for _ in range(_CODE_LENGTH))
    return "-".join(raw[i : i + _CODE_GROUP] for i in range(0, _CODE_LENGTH, _CODE_GROUP))


def _normalise(code: str) -> str:
    return re.sub(r"[\s-]", "", code).upper()


def code_hash(code: str) -> str:
    return hashlib.sha256(_normalise(code).encode()).hexdigest()


def confirmed_device(user) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=True).order_by("pk").first()


@dataclass(frozen=True)
class SecondFactor:
    device: TOTPDevice
    method: str  # "totp" or "recovery_code"


def second_factor_verify(*, user, code: str, request=None) -> SecondFactor | None:
    """The user's authenticator accepts ``code`` (once: a used step is refused), or ``code`` is one
    of their unused recovery codes (used up now, logged). None otherwise."""
    code = (code or "").strip()
    if not code or len(code) > _MAX_CODE_INPUT:
        return None
    with transaction.atomic():
        # the row lock makes "unused" hold for concurrent requests with the same code
        device = TOTPDevice.objects.select_for_update().filter(user=user, confirmed=True).order_by("pk").first()
        if device is None:
            return None
        if _TOTP.match(code):
            return SecondFactor(device, "totp") if device.verify_token(code) else None
        recovery = RecoveryCode.objects.filter(user=user, code_hash=code_hash(code), used_at__isnull=True).first()
        if recovery is None:
            return None
        if RecoveryCode.objects.filter(pk=recovery.pk, used_at__isnull=True).update(used_at=timezone.now()) != 1:
            return None
        from .services import access_event_record

        access_event_record(
            action="auth.recovery_code", request=request, user=user, target_type="recovery_code", target_id=recovery.pk
        )
        return SecondFactor(device, "recovery_code")


def recovery_codes_left(user) -> int:
    return RecoveryCode.objects.filter(user=user, used_at__isnull=True).count()


def recovery_codes_replace(*, user, request=None) -> list[str]:
    """A new set, shown once; the old set stops working."""
    codes = [_random_code() for _ in range(RECOVERY_CODES)]
    with transaction.atomic():
        RecoveryCode.objects.filter(user=user).delete()
        RecoveryCode.objects.bulk_create([RecoveryCode(user=user, code_hash=code_hash(code)) for code in codes])
        from .services import access_event_record

        access_event_record(
            action="auth.recovery_codes_issue", request=request, user=user, target_type="user", target_id=user.pk
        )
    return codes


def enrolment_code_required(user) -> bool:
    """A first authenticator needs an enrolment code: an admin of a hospital that requires a
    second factor for admins, and platform staff where the staff rule is on (production)."""
    if user.is_staff and settings.SIGHTLINE_STAFF_TWO_FACTOR:
        return True
    return Membership.objects.filter(
        user=user,
        role=Role.TENANT_ADMIN,
        is_active=True,
        tenant__is_active=True,
        tenant__require_admin_two_factor=True,
    ).exists()


def _check_actor_may_act_for(*, actor: Membership, membership: Membership, request) -> None:
    """Another admin of every hospital the person belongs to, and never for oneself or staff:
    an admin of one hospital cannot open a back door into another."""
    from .access import member_action_record
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    target = membership.user
    problem = ""
    if target.pk == actor.user_id:
        problem = "Another admin of your hospital (or platform staff) does this for you."
    elif target.is_staff or target.is_superuser:
        problem = "Platform staff accounts are managed by platform staff."
    else:
        theirs = set(
            Membership.objects.filter(user=target, is_active=True, tenant__is_active=True).values_list(
                "tenant_id", flat=True
            )
        )
        mine = set(
            Membership.objects.filter(user=actor.user, role=Role.TENANT_ADMIN, is_active=True).values_list(
                "tenant_id", flat=True
            )
        )
        if not theirs <= mine:
            problem = f"{target.get_username()} also belongs to another hospital: platform staff do this."
    if problem:
        member_action_record(
            actor,
            "two_factor.manage",
            outcome=AccessEvent.Outcome.DENIED,
            request=request,
            target_type="membership",
            target_id=membership.pk,
        )
        raise Forbidden(problem)


def _enrolment_code_create(*, user, tenant: Tenant | None, issued_by, request) -> tuple[TwoFactorEnrolmentCode, str]:
    from .services import access_event_record

    raw = _random_code()
    now = timezone.now()
    with transaction.atomic():
        # a new code replaces any the person has not used yet
        TwoFactorEnrolmentCode.objects.filter(user=user, used_at__isnull=True, expires_at__gt=now).update(
            expires_at=now
        )
        code = TwoFactorEnrolmentCode.objects.create(
            user=user,
            tenant=tenant,
            code_hash=code_hash(raw),
            issued_by=issued_by,
            expires_at=now + timedelta(hours=settings.SIGHTLINE_ENROLMENT_CODE_HOURS),
        )
        access_event_record(
            action="two_factor.enrolment_code_issue",
            request=request,
            user=issued_by,
            username="" if issued_by else "manage.py",
            tenant=tenant,
            target_type="user",
            target_id=user.pk,
        )
    return code, raw


def enrolment_code_issue(
    *, actor: Membership, membership: Membership, request=None
) -> tuple[TwoFactorEnrolmentCode, str]:
    """A hospital admin issues a code for another member; the code is shown to the admin once."""
    _check_actor_may_act_for(actor=actor, membership=membership, request=request)
    return _enrolment_code_create(user=membership.user, tenant=actor.tenant, issued_by=actor.user, request=request)


def _check_staff_may_act_for(*, staff, user) -> None:
    """Only a superuser opens a way into another staff account (None: an operator's shell)."""
    if staff is not None and (user.is_staff or user.is_superuser) and not staff.is_superuser:
        raise Forbidden(f"Only a superuser can do this for the staff account {user.get_username()}.")


def enrolment_code_issue_by_staff(*, user, issued_by=None, request=None) -> tuple[TwoFactorEnrolmentCode, str]:
    """Platform staff (the Django admin) or an operator (``manage.py two_factor_enrolment_code``)."""
    if issued_by is not None and issued_by.pk == user.pk:
        raise Forbidden("Another member of the platform staff issues your enrolment code.")
    _check_staff_may_act_for(staff=issued_by, user=user)
    return _enrolment_code_create(user=user, tenant=None, issued_by=issued_by, request=request)


def _enrolment_code_usable(*, user, raw: str) -> TwoFactorEnrolmentCode | None:
    return TwoFactorEnrolmentCode.objects.filter(
        user=user, code_hash=code_hash(raw), used_at__isnull=True, expires_at__gt=timezone.now()
    ).first()


def _refresh_tokens_revoke(user) -> None:
    from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken

    open_tokens = OutstandingToken.objects.filter(user=user, blacklistedtoken__isnull=True)
    BlacklistedToken.objects.bulk_create([BlacklistedToken(token=t) for t in open_tokens], ignore_conflicts=True)


def device_enrol(*, user, device: TOTPDevice, code: str, enrolment_code: str = "", request=None) -> list[str]:
    """Confirm the pending ``device`` with its current code (and an enrolment code where one is
    required). Returns the recovery codes, to be shown once. Refresh tokens obtained with the
    password alone stop working. Raises Invalid with the reason."""
    from .services import access_event_record

    refusal = None
    with transaction.atomic():
        device = TOTPDevice.objects.select_for_update().filter(pk=device.pk, user=user, confirmed=False).first()
        if device is None or confirmed_device(user) is not None:
            raise Invalid("Two-factor sign-in is already on for your account.", code="already_enrolled")
        grant = _enrolment_code_usable(user=user, raw=enrolment_code) if enrolment_code_required(user) else None
        if enrolment_code_required(user) and grant is None:
            refusal = Invalid(
                "That enrolment code is not valid: it may be mistyped, used or expired. "
                "Ask another admin of your hospital (or platform staff) for a new one.",
                code="enrolment_code_invalid",
            )
        elif not device.verify_token((code or "").strip()):  # a failure is counted by the device's throttle
            refusal = Invalid("That code is not valid. Check the time on your phone and try the current code.")
        elif grant is not None and not TwoFactorEnrolmentCode.objects.filter(pk=grant.pk, used_at__isnull=True).update(
            used_at=timezone.now()
        ):
            refusal = Invalid("That enrolment code has just been used.", code="enrolment_code_invalid")
        if refusal is None:
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            TOTPDevice.objects.filter(user=user).exclude(pk=device.pk).delete()
            access_event_record(
                action="auth.two_factor_enrol",
                request=request,
                user=user,
                target_type="enrolment_code" if grant else "",
                target_id=grant.pk if grant else "",
            )
            _refresh_tokens_revoke(user)
            return recovery_codes_replace(user=user, request=request)
        access_event_record(
            action="auth.two_factor_enrol", outcome=AccessEvent.Outcome.FAILED, request=request, user=user
        )
    raise refusal


def _reset(*, user, tenant: Tenant | None, actor_user, request) -> None:
    from .services import access_event_record

    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).delete()
        RecoveryCode.objects.filter(user=user).delete()
        now = timezone.now()
        TwoFactorEnrolmentCode.objects.filter(user=user, used_at__isnull=True, expires_at__gt=now).update(
            expires_at=now
        )
        access_event_record(
            action="two_factor.reset",
            request=request,
            user=actor_user,
            tenant=tenant,
            target_type="user",
            target_id=user.pk,
        )
        _refresh_tokens_revoke(user)  # tokens obtained with the lost device end too


def device_reset(*, actor: Membership, membership: Membership, request=None) -> None:
    """A hospital admin removes a member's authenticator and recovery codes (a lost phone); the
    member signs in with the password again, and where enrolment needs a code, needs a new one."""
    _check_actor_may_act_for(actor=actor, membership=membership, request=request)
    _reset(user=membership.user, tenant=actor.tenant, actor_user=actor.user, request=request)


def device_reset_by_staff(*, user, reset_by, request=None) -> None:
    if reset_by.pk == user.pk:
        raise Forbidden("Another member of the platform staff resets your second factor.")
    _check_staff_may_act_for(staff=reset_by, user=user)
    _reset(user=user, tenant=None, actor_user=reset_by, request=request)


def users_with_second_factor(user_ids) -> set[int]:
    return set(TOTPDevice.objects.filter(user_id__in=user_ids, confirmed=True).values_list("user_id", flat=True))
