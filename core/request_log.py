"""The web process's one line per request, written at the ASGI edge so that every HTTP request has
it: Django's views, the protocol endpoints (their own ASGI app) and the body limit's 413 alike.

The request id is chosen here (the proxy's ``X-Request-ID`` when well-formed, else a new one),
bound for everything the request logs or publishes (a Celery task's message header carries it on),
and handed to Django in the scope's headers so ``request.request_id`` is the same id.
Fields: method, path (never the query string: tokens and DICOMweb identifiers travel there; and
the path segments that are credentials themselves redacted, ``SECRET_PATHS``), status,
duration_ms, request_id, and the user and tenant ids once known: no usernames.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar

from core.logging import MS_PER_SECOND, bind_request_id, new_request_id, unbind_request_id

logger = logging.getLogger("sightline.request")

# who the request turned out to be, filled in by Django's side (core/request_id.py); a dict per
# request, mutated in place so the values cross asgiref's thread hop back to this coroutine
_who: ContextVar[dict | None] = ContextVar("sightline_request_who", default=None)


# Path segments that are credentials in themselves: whoever holds the link can use it. The
# invitation link (accounts/urls.py, built in accounts/services.py) is the only one routed: no
# password-reset or other token links (config/urls.py, accounts/, recognition/, dicomnet/,
# protocols/). A pattern matches at the start of a path or after a space or quote (inside a
# request line, "GET /invitations/… HTTP/1.1"). platform/nginx/sightline.conf.template's
# $sightline_path map redacts the same paths for nginx's access log: keep the two in step.
SECRET_PATHS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'(?:^|(?<=[\s"\']))/invitations/[^/?\s"\']+'), "/invitations/[redacted]"),
)


def redact_path(path: str) -> str:
    """The path as a log line may name it: no query string (a decoded ``%3F`` reads as one too),
    and every secret segment of ``SECRET_PATHS`` replaced."""
    return redact_secret_paths(path.split("?", 1)[0])


def redact_secret_paths(text: str) -> str:
    """``SECRET_PATHS`` replaced anywhere in a text (a request line); its query string kept."""
    for pattern, replacement in SECRET_PATHS:
        text = pattern.sub(replacement, text)
    return text


def note_requester(*, user_id: int | None = None, tenant_id: int | None = None) -> None:
    who = _who.get()
    if who is None:
        return
    if user_id is not None:
        who["user_id"] = user_id
    if tenant_id is not None:
        who["tenant_id"] = tenant_id


class RequestLog:
    """ASGI middleware for ``http`` scopes; anything else passes through untouched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = ""
        headers = []
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            else:
                headers.append((name, value))
        request_id = new_request_id(incoming)
        headers.append((b"x-request-id", request_id.encode()))
        scope = {**scope, "headers": headers}
        status: dict = {}
        who: dict = {}

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        token = bind_request_id(request_id)
        who_token = _who.set(who)
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            _who.reset(who_token)
            unbind_request_id(token)
            path = redact_path(scope["path"])
            logger.info(
                "%s %s %s",
                scope["method"],
                path,
                status.get("code", 0),
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": path,
                    "status": status.get("code", 0),  # 0: the client went away before an answer
                    "duration_ms": round((time.perf_counter() - started) * MS_PER_SECOND, 1),
                    "user_id": who.get("user_id"),
                    "tenant_id": who.get("tenant_id"),
                },
            )
