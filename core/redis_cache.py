"""Django's Redis cache with one connection pool per process.

Django keeps a cache object per execution context (``CacheHandler`` is not thread-critical), and
under ASGI every request is a new context: each request built a new ``RedisCacheClient``, so a new
connection pool and a new TCP connection to Redis (redis-py also reads its own package metadata
for each new connection). Measured on the upload: 8% of the web process's CPU, ~1.6 core-ms per
upload, for one ``SET NX``. Here the client, which holds the pools and is thread-safe (redis-py's
pools are, and start afresh in a forked child), is shared by every cache object of the process
with the same servers and options, and so is the ``redis.Redis`` object per pool (Django builds
a new one for every command: 3% of the upload's CPU for two commands).
"""

from __future__ import annotations

import threading

from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.utils.functional import cached_property

_clients: dict[tuple, object] = {}
_lock = threading.Lock()


class _SharedClient(RedisCacheClient):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._redis_of_pool: dict[int, object] = {}

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = self._redis_of_pool.get(id(pool))
        if client is None:
            client = self._redis_of_pool[id(pool)] = self._client(connection_pool=pool)
        return client


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._class = _SharedClient

    @cached_property
    def _cache(self):
        key = (tuple(self._servers), repr(sorted(self._options.items())))
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = self._class(self._servers, **self._options)
        return client
