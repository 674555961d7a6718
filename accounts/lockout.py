"""The per-account sign-in limit across addresses.

django-axes counts failures per (username, address) and locks that pair; rotating addresses
gets round it. This adds a limit per account across all addresses: after
``SIGHTLINE_ACCOUNT_FAILURE_LIMIT`` failures within ``SIGHTLINE_ACCOUNT_FAILURE_WINDOW`` the
account is paused for ``SIGHTLINE_ACCOUNT_COOLOFF`` everywhere except at the addresses where
the person signed in successfully before, so an attacker cannot keep them out; the person and
their hospitals' admins get an e-mail, and the access log a security event. Axes' per-address
lock still applies at known addresses too.

Axes cannot express the exemption (its per-username lock counts every address and has no
per-parameter whitelist), so this small piece is hand-written. It keys its state on the user id;
a name that is no account gets a keyed hash of the name instead, so it locks exactly like a
real one and the limit tells nobody which names exist.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.crypto import salted_hmac

from .models import AccessEvent, AccountSignInLimit, KnownSignInAddress, Membership, Role

_NAME_PREFIX = "name-"  # the subject of a username no account has: its salted hash
_NAME_DIGITS = 32  # of that hash, kept as the access-log target: enough to match entries
ACCOUNT_LOCKED_MESSAGE = (
    "Sign-in to this account is paused for a few minutes after many failed attempts from different "
    "addresses. Sign-in still works from a place where you signed in before; or try again later."
)


def client_ip(request) -> str | None:
    """The address axes uses for the same request, in canonical text form."""
    from axes.helpers import get_client_ip_address

    try:
        value = get_client_ip_address(request)
        return ipaddress.ip_address(value).compressed if value else None
    except ValueError:
        return None


def _user_for_name(username: str):
    User = get_user_model()
    return User._default_manager.filter(**{User.USERNAME_FIELD: username}).first() if username else None


def _subject(username: str, user) -> str:
    if user is not None:
        return f"user-{user.pk}"
    return _NAME_PREFIX + salted_hmac("sightline.account-limit", username, algorithm="sha256").hexdigest()


def address_is_known(*, user, ip: str | None) -> bool:
    if user is None or ip is None:
        return False
    since = timezone.now() - timedelta(days=settings.SIGHTLINE_KNOWN_ADDRESS_DAYS)
    return KnownSignInAddress.objects.filter(user=user, ip_address=ip, last_seen__gte=since).exists()


def known_address_record(*, user, request) -> None:
    """After a completed sign-in (password and, where the person has one, second factor)."""
    ip = client_ip(request)
    if ip is None:
        return
    now = timezone.now()
    updated = KnownSignInAddress.objects.filter(user=user, ip_address=ip).update(last_seen=now)
    if not updated:
        KnownSignInAddress.objects.get_or_create(
            user=user, ip_address=ip, defaults={"first_seen": now, "last_seen": now}
        )
    since = now - timedelta(days=settings.SIGHTLINE_KNOWN_ADDRESS_DAYS)
    KnownSignInAddress.objects.filter(user=user, last_seen__lt=since).delete()


def account_is_locked(*, request, username: str) -> bool:
    """Paused, and this request does not come from an address the person signed in from."""
    user = _user_for_name(username)
    row = AccountSignInLimit.objects.filter(subject=_subject(username, user)).first()
    if row is None or row.locked_until is None or row.locked_until <= timezone.now():
        return False
    return not address_is_known(user=user, ip=client_ip(request))


def account_failure_record(*, request, username: str) -> bool:
    """Count one failed sign-in (a wrong password or a wrong second-factor code) against the
    account, unless it comes from a known address. True when this failure paused the account."""
    user = _user_for_name(username)
    if address_is_known(user=user, ip=client_ip(request)):
        return False
    now = timezone.now()
    with transaction.atomic():
        row, created = AccountSignInLimit.objects.select_for_update().get_or_create(
            subject=_subject(username, user), defaults={"user": user}
        )
        if created:  # names sprayed at the sign-in must not grow the table for ever
            _stale_rows_delete(now, keep=row.pk)
        if row.locked_until is not None and row.locked_until > now:
            return False  # already paused: refused requests do not extend it
        if row.window_started is None or now - row.window_started > settings.SIGHTLINE_ACCOUNT_FAILURE_WINDOW:
            row.failures, row.window_started = 0, now
        row.failures += 1
        fired = row.failures >= settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT
        if fired:
            row.locked_until = now + settings.SIGHTLINE_ACCOUNT_COOLOFF
            row.failures, row.window_started = 0, None
            notify = user is not None and (
                row.notified_at is None or now - row.notified_at >= settings.SIGHTLINE_ACCOUNT_NOTICE_INTERVAL
            )
            if notify:
                row.notified_at = now
            _lock_recorded(row=row, user=user, request=request, notify=notify)
        row.save()
    if fired and request is not None:
        request.sightline_account_locked = True
    return fired


def _stale_rows_delete(now, *, keep: int) -> None:
    cutoff = now - max(settings.SIGHTLINE_ACCOUNT_FAILURE_WINDOW, settings.SIGHTLINE_ACCOUNT_NOTICE_INTERVAL)
    AccountSignInLimit.objects.filter(
        Q(window_started__isnull=True) | Q(window_started__lt=cutoff),
        Q(locked_until__isnull=True) | Q(locked_until__lt=cutoff),
        Q(notified_at__isnull=True) | Q(notified_at__lt=cutoff),
    ).exclude(pk=keep).delete()


def _lock_recorded(*, row: AccountSignInLimit, user, request, notify: bool) -> None:
    """In the counting transaction: one security event per hospital of the account (or the
    platform's chain), and after commit the e-mails."""
    from .services import access_event_record

    memberships = (
        list(Membership.objects.filter(user=user, is_active=True, tenant__is_active=True).select_related("tenant"))
        if user is not None
        else []
    )
    target = (
        ("user", user.pk)
        if user is not None
        else ("unknown_username", row.subject[len(_NAME_PREFIX) : len(_NAME_PREFIX) + _NAME_DIGITS])
    )
    for tenant in [m.tenant for m in memberships] or [None]:
        access_event_record(
            action="auth.account_lockout",
            outcome=AccessEvent.Outcome.DENIED,
            request=request,
            user=None,
            tenant=tenant,
            target_type=target[0],
            target_id=target[1],
        )
    if not notify:
        return
    minutes = settings.SIGHTLINE_ACCOUNT_COOLOFF // timedelta(minutes=1)
    username = user.get_username()
    if user.email:
        body = (
            f"Sign-in to your Sightline account {username} was paused for {minutes} minutes after "
            f"{settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT} failed attempts from addresses you have not "
            "signed in from.\n\nYou can still sign in from places where you signed in before. If these "
            "attempts were not you, change your password and tell your hospital's admin."
        )
        _mail_on_commit("Sign-in to your Sightline account was paused", body, [user.email])
    for membership in memberships:
        admins = (
            Membership.objects.for_tenant(membership.tenant)
            .filter(role=Role.TENANT_ADMIN, is_active=True, user__is_active=True)
            .exclude(user=user)
            .exclude(user__email="")
            .values_list("user__email", flat=True)
        )
        if admins:
            body = (
                f"Sign-in to the account {username} of {membership.tenant.name} was paused for {minutes} "
                f"minutes after {settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT} failed attempts from addresses it "
                "has not signed in from. The access log has the attempts (action auth.login, outcome failed)."
            )
            _mail_on_commit(f"Sightline: sign-in paused for a member of {membership.tenant.name}", body, list(admins))


def _mail_on_commit(subject: str, body: str, recipients: list[str]) -> None:
    transaction.on_commit(lambda: send_mail(subject, body, None, recipients), robust=True)


def sign_in_second_factor_failed(*, request, user) -> None:
    """A wrong, used or missing second-factor code after the right password is a failed sign-in:
    logged, and counted by axes (per username and address) and by the per-account limit."""
    from axes.handlers.proxy import AxesProxyHandler

    from .services import access_event_record

    access_event_record(action="auth.two_factor", outcome=AccessEvent.Outcome.FAILED, request=request, user=user)
    username = user.get_username()
    AxesProxyHandler.user_login_failed(
        sender=sign_in_second_factor_failed, credentials={"username": username}, request=request
    )
    account_failure_record(request=request, username=username)


def sign_in_is_locked(*, request, username: str) -> bool:
    """Either lock holds for this username here (the code page checks before each code)."""
    from axes.handlers.proxy import AxesProxyHandler

    if AxesProxyHandler.is_locked(request, {"username": username}):
        request.axes_locked_out = True
        return True
    if account_is_locked(request=request, username=username):
        request.sightline_account_locked = True
        return True
    return False


class AccountLimitBackend:
    """Placed after axes' backend and before the password check: refuses a paused account from
    an address it never signed in from, and marks the request as one whose password is checked
    (so only real guesses count against the account)."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None or username is None:
            return None
        request.sightline_password_checked = False
        if account_is_locked(request=request, username=str(username)):
            request.sightline_account_locked = True
            raise PermissionDenied("the account is paused")  # authenticate() stops and reports a failure
        request.sightline_password_checked = True
        return None  # no get_user: sessions and force_login belong to the password backend
