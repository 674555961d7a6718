"""WebSocket authentication: the browser's session, or ``?token=<JWT access token>``.

Session sockets carry cookies, so their Origin must be one of ALLOWED_HOSTS (no cross-site
socket hijacking). Token sockets carry no cookie and come from API clients that send no
Origin, so the token alone authenticates them.
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


def _query_token(scope) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


@database_sync_to_async
def _user_for_token(raw: str):
    """(user, expiry as a Unix time) for a valid access token; (anonymous, None) otherwise."""
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


def websocket_auth(urlpatterns):
    session_app = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(urlpatterns)))
    token_router = URLRouter(urlpatterns)

    async def application(scope, receive, send):
        token = _query_token(scope)
        if token is None:
            return await session_app(scope, receive, send)
        user, expires = await _user_for_token(token)
        return await token_router(dict(scope, user=user, token_expires=expires), receive, send)

    return application
