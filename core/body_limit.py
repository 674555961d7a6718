"""A cap on request bodies where they enter: the ASGI layer, before Django reads a byte.

Django reads a whole request body (to a temporary file) before any middleware runs, and a
chunked request has no Content-Length to check. This wrapper answers 413 for a declared length
over the cap at once, and for a body that grows past it while arriving: Django is told the
client went away (so it stops, writes nothing) and the client gets the 413. A chunked body that
ends within the cap is given the Content-Length it turned out to have.
"""

from __future__ import annotations

import json

TOO_LARGE_CODE = "too_large"


def too_large_body(limit: int) -> dict:
    """The project's error shape for an oversized request (shared with the Django middleware)."""
    return {
        "error": {
            "code": TOO_LARGE_CODE,
            "message": f"The request is larger than {limit // 2**20} MB.",
            "detail": None,
        }
    }


class BodySizeLimit:
    def __init__(self, app, limit: int | None = None):
        self.app = app
        self._limit = limit

    @property
    def limit(self) -> int:
        if self._limit is None:
            from django.conf import settings

            return settings.SIGHTLINE_MAX_REQUEST_BYTES
        return self._limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)
        received, exceeded, started = 0, False, False

        async def counted_receive():
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # Django abandons the request
                if not message.get("more_body") and not declared and received:
                    # a chunked body, complete: Django builds the request from the scope only after
                    # reading the body, and its parsers (and DRF's) read nothing without a length
                    scope["headers"] = [*scope.get("headers", []), (b"content-length", str(received).encode())]
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, watched_send)
        if exceeded and not started:
            await _refuse(send, limit)


class RequestSizeLimitMiddleware:
    """Refuse a request body larger than any legitimate upload before anything parses it.

    Django parses multipart bodies (CSRF checks read POST) before views run, and streams file
    parts to disk without a limit of its own; the proxy should enforce the same cap. Under the
    ASGI server, BodySizeLimit (above) refuses earlier still, chunked bodies included.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.conf import settings
        from django.http import JsonResponse

        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.SIGHTLINE_MAX_REQUEST_BYTES:
            return JsonResponse(too_large_body(settings.SIGHTLINE_MAX_REQUEST_BYTES), status=413)
        return self.get_response(request)


async def _refuse(send, limit: int) -> None:
    body = json.dumps(too_large_body(limit)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            # answered before Django's middleware: no-store here too (core/cache_control.py)
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
