"""Django's ASGI handler, with the threads that run sync views kept from one request to the next.

Django's own handler (5.2) enters a fresh ``ThreadSensitiveContext`` per request, and asgiref
makes a new single-thread executor for each: every request's sync code runs on a thread made for
it and ended after it. Django's database connections belong to the thread that opened them, so
under uvicorn every request opened a new connection (SQLite: open, WAL pragmas; PostgreSQL: a
TCP and auth handshake), whatever ``CONN_MAX_AGE`` says: measured 5% of the web process's time.

This handler lends each request one of ``threads`` long-lived single-thread executors (asgiref's
``ThreadSensitiveContext(executor=...)``): all of a request's sync code still runs on one thread,
as Django requires, and that thread's connection is kept between requests under the usual rules
(``CONN_MAX_AGE``, ``CONN_HEALTH_CHECKS``, closed when it errored). Past ``threads`` concurrent
requests a request gets a thread of its own, as before, so nothing ever waits for a thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import django
from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler


class PooledThreadsASGIHandler(ASGIHandler):
    def __init__(self, threads: int) -> None:
        super().__init__()
        self._idle = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"django-{i}") for i in range(threads)]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        pooled = bool(self._idle)
        executor = self._idle.pop() if pooled else ThreadPoolExecutor(max_workers=1, thread_name_prefix="django-extra")
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            if pooled:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)  # its thread ends once this request's work is done


def pooled_asgi_application() -> PooledThreadsASGIHandler:
    """``django.core.asgi.get_asgi_application`` with the pooled handler: SIGHTLINE_WEB_THREADS."""
    django.setup(set_prefix=False)
    from django.conf import settings

    return PooledThreadsASGIHandler(settings.SIGHTLINE_WEB_THREADS)
