"""One error shape for the whole platform.

Services raise ``DomainError`` subclasses; the API renders every 4xx as
``{"error": {"code", "message", "detail"}}`` and pages render a friendly error page.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import render
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler


class DomainError(Exception):
    status = 400
    code = "invalid"
    headers: dict[str, str] = {}  # sent with the answer, API or page (e.g. Retry-After)

    def __init__(self, message: str, *, detail: object = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code:
            self.code = code


class Invalid(DomainError):
    status, code = 400, "invalid"


class NotFound(DomainError):
    """Also what another hospital's object looks like: ids leak nothing."""

    status, code = 404, "not_found"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class Conflict(DomainError):
    status, code = 409, "conflict"


class Gone(DomainError):
    status, code = 410, "gone"


class Locked(DomainError):
    status, code = 429, "locked_out"


class Busy(DomainError):
    """Refused for now, nothing stored: try again after ``retry_after`` seconds (the header, as
    DRF's throttles send it)."""

    status, code = 429, "busy"

    def __init__(self, message: str, *, retry_after: int, detail: object = None, code: str | None = None):
        super().__init__(message, detail=detail, code=code)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class TooLarge(DomainError):
    status, code = 413, "too_large"


class UnsupportedMedia(DomainError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(DomainError):
    status, code = 422, "unprocessable"


class Unavailable(DomainError):
    status, code = 503, "unavailable"


def error_body(code: str, message: str, detail: object = None) -> dict:
    return {"error": {"code": code, "message": message, "detail": detail}}


def api_exception_handler(exc, context):
    if isinstance(exc, DomainError):
        return Response(error_body(exc.code, exc.message, exc.detail), status=exc.status, headers=exc.headers)
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None
    detail_data = getattr(exc, "detail", None)
    code = exc.get_codes() if isinstance(exc, drf_exceptions.APIException) else "error"
    if isinstance(exc, drf_exceptions.ValidationError):
        message, detail = "The request has invalid fields.", response.data
    elif isinstance(detail_data, dict) and "detail" in detail_data:
        # simplejwt's token errors: {"detail", "code", "messages": [{"message", ...}]}
        message = str(detail_data["detail"])
        detail = [str(m.get("message", "")) for m in detail_data.get("messages", [])] or None
        code = code.get("code") if isinstance(code, dict) else code
    else:
        message, detail = str(detail_data if detail_data is not None else exc), None
    if not isinstance(code, str):
        code = "invalid"
    response.data = error_body(code, message, detail)
    return response


class DomainErrorMiddleware:
    """Pages: a domain error becomes a plain page with the right status, never a 500."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, DomainError):
            response = render(
                request,
                "error.html",
                {"status": exception.status, "message": exception.message},
                status=exception.status,
            )
            for name, value in exception.headers.items():
                response[name] = value
            return response
        return None


# Django's own error views, for what no API view sees (a URL no route matches, a request Django
# refuses before any view): the API answers in the one error shape, pages stay friendly pages.
def _api_error_or_page(request, *, status: int, code: str, message: str, page):
    if request.path.startswith("/api/"):
        from django.http import JsonResponse

        return JsonResponse(error_body(code, message), status=status)
    return page()


def page_not_found(request, exception=None):
    from django.views import defaults

    return _api_error_or_page(
        request, status=404, code="not_found", message="Not found.",
        page=lambda: defaults.page_not_found(request, exception),
    )  # fmt: skip


def bad_request(request, exception=None):
    from django.views import defaults

    return _api_error_or_page(
        request, status=400, code="bad_request", message="The request is malformed.",
        page=lambda: defaults.bad_request(request, exception),
    )  # fmt: skip


def permission_denied(request, exception=None):
    from django.views import defaults

    return _api_error_or_page(
        request, status=403, code="forbidden", message="You do not have permission to do this.",
        page=lambda: defaults.permission_denied(request, exception),
    )  # fmt: skip


UNAVAILABLE_RETRY_AFTER_SECONDS = 5  # PostgreSQL restarted in the drill answers again within this
UNAVAILABLE_PAGE = (
    "<!doctype html><html lang=en><meta charset=utf-8><title>Sightline</title>"
    "<h1>Sightline</h1><p>Sightline is briefly unavailable; try again in a few seconds.</p></html>"
)


def server_error(request):
    import sys

    from django.views import defaults

    from core.transient import is_transient

    failure = sys.exc_info()[1]  # Django calls this view while it handles the request's exception
    if failure is not None and is_transient(failure):
        # the database or the broker went away for a moment (a restart, a failover): a 503 the
        # client can retry, never a 500 that reads as the platform's fault with the request
        response = _api_error_or_page(
            request, status=503, code="unavailable",
            message="The service is briefly unavailable; retry in a few seconds.",
            # a plain page: error.html's context processors would ask the database again
            page=lambda: HttpResponse(UNAVAILABLE_PAGE, status=503),
        )  # fmt: skip
        response["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
        return response
    return _api_error_or_page(
        request, status=500, code="server_error", message="Something went wrong on our side.",
        page=lambda: defaults.server_error(request),
    )  # fmt: skip


CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455's "try again later": no HTTP answer can be sent on this server


def websocket_unavailable_guard(app):
    """A WebSocket handshake that meets the database or the broker gone for a moment (its
    authentication reads the database) is refused with the platform's 503 and Retry-After, as an
    HTTP request would be, instead of the ASGI server's bare 500; after the handshake the consumer
    closes with 1012 itself (recognition/consumers.py)."""
    import json

    from core.transient import is_transient

    async def guarded(scope, receive, send):
        accepted = False  # answered already: an accept, a close or an HTTP denial was sent

        async def tracking_send(message):
            nonlocal accepted
            accepted = accepted or message["type"] in (
                "websocket.accept",
                "websocket.close",
                "websocket.http.response.start",
            )
            await send(message)

        try:
            await app(scope, receive, tracking_send)
        except Exception as exc:
            if accepted or not is_transient(exc):
                raise
            if "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
                return
            body = error_body("unavailable", "The service is briefly unavailable; retry in a few seconds.")
            headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", str(UNAVAILABLE_RETRY_AFTER_SECONDS).encode()),
            ]
            await send({"type": "websocket.http.response.start", "status": 503, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": json.dumps(body).encode()})

    return guarded
