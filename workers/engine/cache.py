"""One model cache per worker process: load once, keep the most recently used few."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from .handler import Handler

# A resnet18 handler holds about 45 MB; a GPU worker rarely serves more than a production and
# a canary version at once.
DEFAULT_CAPACITY = 4


class HandlerCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._handlers: OrderedDict[str, Handler] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Handler]) -> Handler:
        with self._lock:
            handler = self._handlers.get(key)
            if handler is not None:
                self._handlers.move_to_end(key)
                return handler
            handler = load()
            self._handlers[key] = handler
            while len(self._handlers) > self.capacity:
                self._handlers.popitem(last=False)
            return handler

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._handlers)

    def clear(self) -> None:
        with self._lock:
            self._handlers.clear()
