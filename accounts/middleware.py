import time

from django.contrib.auth.models import AnonymousUser


def session_expired(session, now: float | None = None) -> bool:
    """Idle for longer than SIGHTLINE_SESSION_IDLE_SECONDS, or older than SESSION_COOKIE_AGE."""
    from django.conf import settings

    now = time.time() if now is None else now
    started, seen = session.get("started"), session.get("seen")
    if started is None or seen is None:
        return False
    return now - seen > settings.SIGHTLINE_SESSION_IDLE_SECONDS or now - started > settings.SESSION_COOKIE_AGE


class SessionLifetimeMiddleware:
    """Ends a browser session after an idle period and after an absolute lifetime."""

    # write the "seen" mark at most this often, so most requests do not rewrite the session
    SEEN_RESOLUTION_SECONDS = 60

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.user.is_authenticated:
            session, now = request.session, time.time()
            if session_expired(session, now):
                from .events import session_ended
                from .services import access_event_record

                access_event_record(action="auth.session_expired", request=request, user=request.user)
                session_ended(session.session_key)
                session.flush()
                request.user = AnonymousUser()
            else:
                session.setdefault("started", now)
                if now - session.get("seen", 0) > self.SEEN_RESOLUTION_SECONDS:
                    session["seen"] = now
        return self.get_response(request)


class StaffTwoFactorMiddleware:
    """Where ``SIGHTLINE_STAFF_TWO_FACTOR`` is on (production), the Django admin answers only a
    session verified with a second factor (django-otp's, after OTPMiddleware). Staff without
    one are sent to set it up (with an enrolment code from other staff or ``manage.py
    two_factor_enrolment_code``), or to sign in again with their code."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.conf import settings

        if settings.SIGHTLINE_STAFF_TWO_FACTOR and self._needs_second_factor(request):
            from django.contrib import messages
            from django.contrib.auth import logout
            from django.contrib.auth.views import redirect_to_login
            from django.shortcuts import redirect

            from .services import access_event_record
            from .two_factor import confirmed_device

            user = request.user
            access_event_record(action="admin.two_factor_required", outcome="denied", request=request, user=user)
            if confirmed_device(user) is None:
                messages.error(request, "Platform staff need two-factor sign-in for the admin: set it up here.")
                return redirect("two-factor")
            logout(request)  # signed in before the device was set up: sign in again with a code
            return redirect_to_login(request.get_full_path())
        return self.get_response(request)

    @staticmethod
    def _needs_second_factor(request) -> bool:
        from django.urls import reverse

        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated or not user.is_staff:
            return False
        if not request.path.startswith(reverse("admin:index")) or request.path == reverse("admin:login"):
            return False
        return not user.is_verified()
