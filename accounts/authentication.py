"""How service accounts authenticate, and where every other way in refuses them.

- ``ApiKeyAuthentication`` (DRF): ``Authorization: Bearer slk_<prefix>_<secret>``. It runs before
  simplejwt's class and claims only credentials with the ``slk_`` prefix, so a JWT is never tried
  as a key and a key never reaches the JWT parser.
- ``MembershipJWTAuthentication`` (DRF): simplejwt's access tokens, with the user and the
  hospital memberships the request acts under read in one query (``TenantApi`` takes them).
- ``ApiKeyRateThrottle`` (DRF): each key's requests per minute, counted in the shared cache.
- ``ServiceAccountBackend`` (django.contrib.auth): password sign-in (the sign-in page, the token
  endpoint, the admin's) refuses a service account's username even if someone gave it a password.
- ``refuse_service_account_sessions``: a browser session can never be started for one.
"""

from __future__ import annotations

import time

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.contrib.auth.signals import user_logged_in
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.throttling import BaseThrottle
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken
from rest_framework_simplejwt.settings import api_settings as jwt_settings
from rest_framework_simplejwt.utils import get_md5_hash_password

from .models import KEY_SCHEME, AccessEvent, ApiKey, Membership

# DRF imports this module while core.errors (which imports DRF) is still loading: the
# modules that import core.errors are imported where they are used.

BEARER = "Bearer"


def api_key_from_header(value: bytes) -> str | None:
    """The raw key in an ``Authorization`` value, or None when the value is not an API key."""
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != BEARER.lower().encode():
        return None
    try:
        credential = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return credential if credential.startswith(KEY_SCHEME) else None


class ApiKeyAuthentication(BaseAuthentication):
    """``request.user`` is the service account's user, ``request.auth`` the ApiKey."""

    def authenticate(self, request):
        raw = api_key_from_header(get_authorization_header(request))
        if raw is None:
            return None  # not a key: the JWT and session classes decide
        from .service_accounts import KeyRefused, api_key_authenticate

        try:
            key = api_key_authenticate(raw=raw, request=request._request)
        except KeyRefused as refused:
            raise exceptions.AuthenticationFailed(str(refused), code="api_key_invalid") from None
        return key.service_account.user, key

    def authenticate_header(self, request) -> str:
        return f'{BEARER} realm="api"'  # the same challenge simplejwt gives: keys and tokens share it


class MembershipJWTAuthentication(JWTAuthentication):
    """simplejwt's checks (an active user, a token not revoked by a password change), with one
    query where simplejwt's user and the membership lookup took two: the user's active
    memberships in active hospitals (the one ``X-Tenant`` names, or the first two), each with its
    user and tenant. Every request reads them afresh: deactivating a person, a membership or a
    hospital takes effect on the next request, on every web process (nothing is cached).
    ``accounts.selectors.membership_resolve`` uses what was read; a user with no membership is
    read alone."""

    def authenticate(self, request):
        self._tenant_slug = request.headers.get("X-Tenant") or ""
        self._memberships: list[Membership] = []
        authenticated = super().authenticate(request)
        if authenticated is not None:
            from .selectors import ACTIVE_MEMBERSHIPS

            setattr(request._request, ACTIVE_MEMBERSHIPS, (self._tenant_slug, self._memberships))
        return authenticated

    def get_user(self, validated_token):
        try:
            user_id = validated_token[jwt_settings.USER_ID_CLAIM]
        except KeyError as exc:
            raise InvalidToken("Token contained no recognizable user identification") from exc
        from .selectors import memberships_active

        memberships = memberships_active(user=user_id)
        if self._tenant_slug:
            memberships = memberships.filter(tenant__slug=self._tenant_slug)
        self._memberships = list(memberships[:2])
        if self._memberships:
            user = self._memberships[0].user
            for membership in self._memberships[1:]:
                membership.user = user  # one user object for the request
        else:
            user = self.user_model.objects.filter(**{jwt_settings.USER_ID_FIELD: user_id}).first()
            if user is None:
                raise exceptions.AuthenticationFailed("User not found", code="user_not_found")
        if jwt_settings.CHECK_USER_IS_ACTIVE and not user.is_active:
            raise exceptions.AuthenticationFailed("User is inactive", code="user_inactive")
        if jwt_settings.CHECK_REVOKE_TOKEN and validated_token.get(
            jwt_settings.REVOKE_TOKEN_CLAIM
        ) != get_md5_hash_password(user.password):
            raise exceptions.AuthenticationFailed("The user's password has been changed.", code="password_changed")
        return user


class ApiKeyRateThrottle(BaseThrottle):
    """At most ``key.rate`` requests per minute for each key, in fixed one-minute windows counted
    with the cache's atomic increment (Redis: shared by every web process). Other credentials
    pass. A window boundary can let up to twice the rate through in a short burst; the limit
    is about a runaway or leaked key, not exact pacing."""

    WINDOW_SECONDS = 60
    api_errors = (503,)  # the count cannot be made (for the OpenAPI contract; 429 is the throttle's own)

    def allow_request(self, request, view) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):
            return True
        now = time.time()
        window = int(now // self.WINDOW_SECONDS)
        counter = f"api-key-rate:{key.prefix}:{window}"  # the prefix is random per key: no reuse
        from core.errors import Unavailable

        try:
            count = self._count(counter)
        except Exception as error:  # the limit cannot be checked: refuse rather than not limit
            raise Unavailable(
                "The request limit cannot be checked right now; try again shortly.", code="rate_limit_unavailable"
            ) from error
        if count <= key.rate:
            return True
        self._wait = (window + 1) * self.WINDOW_SECONDS - now
        return False

    def _count(self, counter: str) -> int:
        """The window's count after this request: two cache round trips once the window has begun."""
        try:
            return cache.incr(counter)
        except ValueError:  # the window's first request (incr refuses a missing key)
            if cache.add(counter, 1, timeout=self.WINDOW_SECONDS * 2):  # outlives its window
                return 1
            return cache.incr(counter)  # another process began it first

    def wait(self) -> float:
        return max(1.0, getattr(self, "_wait", self.WINDOW_SECONDS))


class ServiceAccountBackend:
    """Placed before ModelBackend: a service account's username ends password authentication."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if username and get_user_model().objects.filter(username=username, service_account__isnull=False).exists():
            raise PermissionDenied("service accounts sign in with API keys only")  # reported as a failed login
        return None  # no get_user: it never authenticates anyone, so no session ever names it


@receiver(user_logged_in, dispatch_uid="refuse_service_account_sessions")
def refuse_service_account_sessions(sender, request, user, **kwargs):
    """The backend already refuses every password path; this holds even for code that calls
    ``login()`` directly: the session is emptied before the response stores it, and refused."""
    from .service_accounts import is_service_account
    from .services import access_event_record

    if not is_service_account(user):
        return

    if request is not None:
        request.session.flush()
        request.user = AnonymousUser()
    access_event_record(action="auth.login", outcome=AccessEvent.Outcome.DENIED, request=request, user=user)
    raise PermissionDenied("A service account cannot hold a browser session.")


class MembershipJWTAuthenticationScheme(SimpleJWTScheme):
    """The OpenAPI document describes the subclass as simplejwt's own bearer scheme."""

    target_class = MembershipJWTAuthentication


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """The OpenAPI document names the key as its own bearer scheme beside the JWT."""

    target_class = ApiKeyAuthentication
    name = "serviceAccountKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "slk_<prefix>_<secret>",
            "description": "A hospital service account's API key, created by a hospital admin "
            "(`Authorization: Bearer slk_...`). Limited per key to a number of requests per minute (429).",
        }
