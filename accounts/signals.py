"""Security events raised by django.contrib.auth go to the access log."""

from axes.signals import user_locked_out
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from core.pseudonym import USERNAME, pseudonym_for

from .events import session_ended
from .lockout import account_failure_record, known_address_record
from .models import ACTOR_LABEL_LENGTH, AccessEvent
from .services import access_event_record


@receiver(user_logged_in)
def _logged_in(sender, request, user, **kwargs):
    access_event_record(action="auth.login", request=request, user=user)


@receiver(user_logged_out)
def _logged_out(sender, request, user, **kwargs):
    if user is not None:
        access_event_record(action="auth.logout", request=request, user=user)
    session_ended(getattr(request.session, "session_key", None))


def username_tried(value) -> str:
    """What the platform keeps of a username typed at a failed sign-in: its keyed hash (the
    pseudonym key, purpose "username"), never the text, which may be a password typed in the
    wrong field. The auditor's person filter hashes what it is given the same way."""
    return pseudonym_for(str(value or ""), purpose=USERNAME)


def axes_username(request, credentials=None) -> str | None:
    """AXES_USERNAME_CALLABLE: axes counts, locks and stores attempts under the hash, so its
    AccessAttempt and AccessFailureLog rows (and log lines) carry no typed username."""
    if credentials:
        value = credentials.get("username")
    else:
        value = getattr(request, "data", request.POST).get("username") if request is not None else None
    return username_tried(value) or None


@receiver(user_login_failed)
def _login_failed(sender, credentials, request=None, **kwargs):
    access_event_record(
        action="auth.login",
        outcome=AccessEvent.Outcome.FAILED,
        request=request,
        user=None,
        username=username_tried(credentials.get("username", "")),
    )


@receiver(user_locked_out)
def _locked_out(sender, request=None, username=None, **kwargs):
    """django-axes locked this username and address out after repeated failures."""
    access_event_record(
        action="auth.lockout",
        outcome=AccessEvent.Outcome.DENIED,
        request=request,
        user=None,
        username=str(username or "")[:ACTOR_LABEL_LENGTH],
    )


# --- the per-account limit across addresses (accounts/lockout.py) ---------------------------


@receiver(user_login_failed)
def _count_against_the_account(sender, credentials, request=None, **kwargs):
    """Only real guesses count: the password was checked (no lock refused the attempt first)."""
    if request is not None and getattr(request, "sightline_password_checked", False):
        account_failure_record(request=request, username=str(credentials.get("username", "")))


@receiver(user_logged_in)
def _remember_the_address(sender, request, user, **kwargs):
    if request is not None:
        known_address_record(user=user, request=request)
