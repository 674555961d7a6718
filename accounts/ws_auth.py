"""WebSocket authentication: the browser's session, ``?token=<JWT access token>``, or a service
account's API key in the handshake's ``Authorization: Bearer slk_...`` header.

Session sockets carry cookies, so their Origin must be one of ALLOWED_HOSTS (no cross-site
socket hijacking). Token and key sockets carry no cookie and come from API clients that send no
Origin, so the credential alone authenticates them. An API key is accepted only in the header,
never in the query string, where proxies and servers log it; a key socket joins the key's own
group (``scope["api_key_id"]``), which revoking the key closes.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.contrib.auth.models import AnonymousUser
from rest_framework.exceptions import AuthenticationFailed
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError

from .authentication import api_key_from_header
from .service_accounts import KeyRefused, api_key_authenticate, api_key_looks_like_one


def _query_token(scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


def _header_key(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            return api_key_from_header(value)
    return None


@database_sync_to_async
def _user_for_token(raw: str):
    """(user, expiry as a Unix time) for a valid access token; (anonymous, None) otherwise."""
    if api_key_looks_like_one(raw):
        return AnonymousUser(), None  # a key in the URL is refused, not tried as a token
    authentication = JWTAuthentication()
    try:
        token = authentication.get_validated_token(raw)
        user = authentication.get_user(token)
    except (InvalidToken, TokenError, AuthenticationFailed):
        return AnonymousUser(), None
    # the same rule as the API: a token counts as verified by a second factor only when its
    # ``amr`` claim says one was given (consumers ask ``user.is_verified()`` like pages do)
    verified = "otp" in (token.get("amr") or ())
    user.is_verified = lambda: verified
    return user, token.get("exp")


@database_sync_to_async
def _user_for_key(raw: str):
    """(the service account's user, the key) for a live key; (anonymous, None) otherwise."""
    try:
        key = api_key_authenticate(raw=raw)
    except KeyRefused:
        return AnonymousUser(), None
    user = key.service_account.user
    user.is_verified = lambda: False  # a key is never a second factor (and never an admin's)
    return user, key


def websocket_auth(urlpatterns):
    session_app = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(urlpatterns)))
    token_router = URLRouter(urlpatterns)

    async def application(scope, receive, send):
        key = _header_key(scope)
        if key is not None:
            user, api_key = await _user_for_key(key)
            # the key's id for revocation, its public id for the access-log entries the socket writes
            ids = {"api_key_id": None}
            if api_key is not None:
                ids = {"api_key_id": api_key.pk, "api_key_public_id": api_key.public_id}
            return await token_router(dict(scope, user=user, **ids), receive, send)
        token = _query_token(scope)
        if token is None:
            return await session_app(scope, receive, send)
        user, expires = await _user_for_token(token)
        return await token_router(dict(scope, user=user, token_expires=expires), receive, send)

    return application
