"""The protocols' routes, served without Django's sync-only middleware, so that a read waiting
for its worker holds no thread.

Django runs an async view from sync middleware through ``async_to_sync``: the middleware's thread
waits, blocked, for the whole view. Several of the platform's middleware (and whitenoise) are
sync-only, so the protocols' paths get a handler of their own whose chain is async throughout:
``protocol_middleware`` does for these paths what the platform's own middleware do for every
answer that matters here (a request id, the body limit, ``Cache-Control: no-store``, the security
headers); sessions, CSRF and the pages' middleware have nothing to do with a bearer-key protocol.
The platform's handler lends each request one of its pooled threads for the whole request.
Here a request borrows a thread only for each sync step (authentication, storing the images,
looking at the database: ``run_sync``) and gives it back in between, so a read that waits for its
worker (``protocols.core._wait``, on the event loop) holds no thread at all: a hundred waiting
reads are a hundred coroutines, not a hundred threads. Each step opens and ends like a request
for the database (``close_old_connections``: CONN_MAX_AGE and the health checks hold).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeVar

from asgiref.sync import ThreadSensitiveContext, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import sync_and_async_middleware
from django.utils.module_loading import import_string

from core.body_limit import too_large_body
from core.cache_control import NO_STORE
from core.logging import new_request_id

T = TypeVar("T")
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
        request.request_id = new_request_id(incoming)  # type: ignore[attr-defined]
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


class ThreadLender:
    """Single-thread executors lent for one sync step at a time (``threads`` kept; more are made,
    and ended after their step, when more steps run at once)."""

    def __init__(self, threads: int) -> None:
        self._idle = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"protocol-{i}") for i in range(threads)]

    @asynccontextmanager
    async def thread(self):
        pooled = bool(self._idle)
        executor = self._idle.pop() if pooled else ThreadPoolExecutor(max_workers=1, thread_name_prefix="protocol-x")
        try:
            async with ThreadSensitiveContext(executor=executor):
                yield
        finally:
            if pooled:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


_lender: ContextVar[ThreadLender | None] = ContextVar("protocol_thread_lender", default=None)


def _as_a_request(function: Callable[..., T]) -> Callable[..., T]:
    def step(*args, **kwargs) -> T:
        close_old_connections()  # what request_started does for a request's own thread
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    return step


async def run_sync(function: Callable[..., T], *args, **kwargs) -> T:
    """``function`` on a thread: under ProtocolASGIHandler one borrowed for this call only;
    elsewhere (the test client, WSGI) ``sync_to_async``'s usual thread."""
    lender = _lender.get()
    if lender is None:
        return await sync_to_async(function)(*args, **kwargs)
    async with lender.thread():
        return await sync_to_async(_as_a_request(function))(*args, **kwargs)


class ProtocolASGIHandler(ASGIHandler):
    """Django's ASGI handler over PROTOCOL_MIDDLEWARE only, whose requests borrow a thread per
    sync step (``run_sync``) instead of holding one throughout."""

    def __init__(self, threads: int) -> None:
        super().__init__()
        self.lender = ThreadLender(threads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        _lender.set(self.lender)  # this request's context (and the tasks Django makes from it)
        await self.handle(scope, receive, send)

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
