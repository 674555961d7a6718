"""The protocols' routes, served without Django's sync-only middleware, so that a read waiting
for its worker holds no thread.

Django runs an async view from sync middleware through ``async_to_sync``: the middleware's thread
waits, blocked, for the whole view. Several of the platform's middleware (and whitenoise) are
sync-only, so the protocols' paths get a handler of their own whose chain is async throughout:
``protocol_middleware`` does for these paths what the platform's own middleware do for every
answer that matters here (a request id, the body limit, ``Cache-Control: no-store``, the security
headers); sessions, CSRF and the pages' middleware have nothing to do with a bearer-key protocol.
Each request still lends one pooled thread to its sync steps (authentication, the ORM), returned
to the pool only when the request ends, as for every request: the wait itself runs on the event
loop (``protocols.core._wait``).
"""

from __future__ import annotations

import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import sync_and_async_middleware
from django.utils.module_loading import import_string

from config.asgi_threads import PooledThreadsASGIHandler
from core.body_limit import too_large_body
from core.cache_control import NO_STORE
from core.request_id import _REQUEST_ID

# paths this handler serves: KServe v2, TF Serving REST, TorchServe
PROTOCOL_PATH_PREFIXES = ("/v2", "/v1", "/predictions", "/models", "/ping")
PROTOCOL_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "protocols.asgi.protocol_middleware",
]


def is_protocol_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTOCOL_PATH_PREFIXES)


@sync_and_async_middleware
def protocol_middleware(get_response):
    """Request id, body limit and no-store, as core.request_id, core.body_limit and
    core.cache_control do for the rest of the platform."""

    def before(request: HttpRequest) -> HttpResponse | None:
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex  # type: ignore[attr-defined]
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > settings.SIGHTLINE_MAX_REQUEST_BYTES:
            return JsonResponse(too_large_body(settings.SIGHTLINE_MAX_REQUEST_BYTES), status=413)
        return None

    def after(request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response["X-Request-ID"] = request.request_id  # type: ignore[attr-defined]
        response["Cache-Control"] = NO_STORE
        return response

    if iscoroutinefunction(get_response):

        async def middleware(request):
            refused = before(request)
            return after(request, refused or await get_response(request))

        markcoroutinefunction(middleware)
    else:

        def middleware(request):  # type: ignore[misc]
            refused = before(request)
            return after(request, refused or get_response(request))

    return middleware


class ProtocolASGIHandler(PooledThreadsASGIHandler):
    """Django's ASGI handler (with the platform's pooled threads) over PROTOCOL_MIDDLEWARE only."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list = []
        self._template_response_middleware: list = []
        self._exception_middleware: list = []
        handler = convert_exception_to_response(self._get_response_async)  # type: ignore[attr-defined]
        for path in reversed(PROTOCOL_MIDDLEWARE):
            middleware = import_string(path)
            if not getattr(middleware, "async_capable", False):
                raise RuntimeError(f"{path} must be async-capable: a protocol read must not hold a thread")
            handler = convert_exception_to_response(middleware(handler))
        self._middleware_chain = handler


def protocol_asgi_application() -> ProtocolASGIHandler:
    return ProtocolASGIHandler(settings.SIGHTLINE_WEB_THREADS)
