"""core.redis_cache: Django keeps a cache object per execution context (under ASGI, per
request); they must share one client, so one connection pool, not open a connection each."""

from __future__ import annotations

import threading

from django.core.cache import caches


def test_every_context_shares_one_client_and_pool():
    seen = []

    def look() -> None:  # a thread starts with a context of its own, as each ASGI request does
        cache = caches["default"]
        seen.append((cache, cache._cache, cache._cache.get_client(write=True)))

    threads = [threading.Thread(target=look) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (first, first_client, first_redis), (second, second_client, second_redis) = seen
    assert first is not second  # Django's own objects, one per context
    assert first_client is second_client
    assert first_redis is second_redis
    assert first_redis.connection_pool is second_redis.connection_pool
