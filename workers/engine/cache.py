"""One model cache per worker process: load once, keep the most recently used within a memory
budget (the weights and buffers each model holds on its device)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the web process imports the registry, and must not load torch for it
    import torch

    from .handler import Handler

# A resnet18 handler holds about 45 MB, a resnet50 about 100 MB; the default leaves room for a
# production and a canary version of much larger models on one GPU.
DEFAULT_BUDGET_BYTES = 2 * 1024**3


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (TorchScript modules included)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class HandlerCache:
    """LRU by memory: loading a model evicts the least recently used ones until the rest fit.
    The model just loaded always stays, even when it alone exceeds the budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, size_of: Callable[[Handler], int] | None = None):
        self.budget_bytes = budget_bytes
        self._size_of = size_of or (lambda handler: model_bytes(handler.model))
        self._handlers: OrderedDict[str, tuple[Handler, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Handler]) -> Handler:
        with self._lock:
            entry = self._handlers.get(key)
            if entry is not None:
                self._handlers.move_to_end(key)
                return entry[0]
            handler = load()
            self._handlers[key] = (handler, self._size_of(handler))
            evicted = False
            while len(self._handlers) > 1 and self.held_bytes() > self.budget_bytes:
                self._handlers.popitem(last=False)
                evicted = True
            if evicted:
                _release_device_memory()
            return handler

    def held_bytes(self) -> int:
        return sum(size for _, size in self._handlers.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._handlers)

    def clear(self) -> None:
        with self._lock:
            self._handlers.clear()


def _release_device_memory() -> None:
    """Give the evicted weights back to the GPU. torch is imported here, not at module level:
    the web process imports this module (through the registry) and must not load torch."""
    import gc

    import torch

    gc.collect()  # whatever still points at an evicted model in a cycle lets go of it first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
