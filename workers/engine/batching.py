"""Dynamic batching: gather waiting requests into one forward pass.

``collect_batch`` takes whatever is already waiting at once (so a lone request on an idle
worker never waits for company), then keeps taking until the batch is full or
``max_wait_ms`` has passed since it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL_MS = 2
MS_PER_SECOND = 1000.0


def collect_batch(
    take: Callable[[int], list[T]],
    *,
    max_batch_size: int,
    max_wait_ms: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[T]:
    """``take(n)`` returns up to n waiting items (claimed for this batch)."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    batch = list(take(max_batch_size))
    if not batch:
        return batch
    deadline = clock() + max_wait_ms / MS_PER_SECOND
    while len(batch) < max_batch_size:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        sleep(min(remaining, POLL_INTERVAL_MS / MS_PER_SECOND))
        batch.extend(take(max_batch_size - len(batch)))
    return batch
