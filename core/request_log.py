"""The web process's one line per request, written at the ASGI edge so that every HTTP request has
it: Django's views, the protocol endpoints (their own ASGI app) and the body limit's 413 alike.

The request id is chosen here (the proxy's ``X-Request-ID`` when well-formed, else a new one),
bound for everything the request logs or publishes (a Celery task's message header carries it on),
and handed to Django in the scope's headers so ``request.request_id`` is the same id.
Fields: method, path (never the query string: tokens and DICOMweb identifiers travel there),
status, duration_ms, request_id, and the user and tenant ids once known: no usernames.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

from core.logging import bind_request_id, unbind_request_id
from core.request_id import new_request_id

logger = logging.getLogger("sightline.request")

# who the request turned out to be, filled in by Django's side (core/request_id.py); a dict per
# request, mutated in place so the values cross asgiref's thread hop back to this coroutine
_who: ContextVar[dict | None] = ContextVar("sightline_request_who", default=None)


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
            logger.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status.get("code", 0),
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status.get("code", 0),  # 0: the client went away before an answer
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "user_id": who.get("user_id"),
                    "tenant_id": who.get("tenant_id"),
                },
            )
