"""The engine's batch API: read, decode and preprocess the next batch in a thread pool while
the current batch runs its forward pass.

    pipeline = BatchPipeline(handler, pool)
    prepared = pipeline.prepare([Item(read=...), Item(read=..., keep_image=True)])  # a Future
    results = pipeline.run(prepared.result())       # one ItemResult per item, in order

An item whose bytes cannot be read or decoded gets an error of its own and the rest of the
batch runs; a read's exception is kept (``Prepared.read_failures``) for the caller to judge
(a transient storage error sends the request back to the queue rather than failing it). An
item with ``on_decoded`` is decoded once at full resolution, and the hook is called with that
decode in the pool's thread (the caller's display copy: encoded while the previous batch runs
its forward pass, from the pixels the model reads, so nothing is decoded twice); what it returns
is kept in ``Prepared.decoded``, what it raises in ``Prepared.decoded_failures``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .handler import DECODE_ERRORS, Handler, open_image
from .results import ItemResult

READ_FAILED = "the stored image could not be read"


@dataclass(frozen=True)
class Item:
    read: Callable[[], bytes]
    on_decoded: Callable[[Image.Image], Any] | None = None


@dataclass
class Prepared:
    batch: torch.Tensor | None  # uint8 (N, 3, H, W) of the decodable items, in order
    errors: list[str]  # one per item: "" when it decoded
    read_failures: dict[int, BaseException] = field(default_factory=dict)  # position → the read's error
    decoded: dict[int, Any] = field(default_factory=dict)  # position → what on_decoded returned
    decoded_failures: dict[int, Exception] = field(default_factory=dict)  # position → what it raised


class BatchPipeline:
    def __init__(self, handler: Handler, pool: Executor):
        self.handler = handler
        self.pool = pool

    def prepare(self, items: list[Item]) -> Future[Prepared]:
        return self.pool.submit(self.prepare_now, items)

    def prepare_now(self, items: list[Item]) -> Prepared:
        tensors, prepared = [], Prepared(batch=None, errors=[])
        for position, item in enumerate(items):
            try:
                data = item.read()
            except Exception as exc:
                prepared.read_failures[position] = exc
                prepared.errors.append(READ_FAILED)
                continue
            try:
                if item.on_decoded is not None:
                    with open_image(data) as image:
                        image.load()  # the one full decode: the display copy and the model share it
                        tensors.append(self.handler.from_image(image))
                        try:
                            prepared.decoded[position] = item.on_decoded(image)
                        except Exception as exc:  # the caller's step fails alone; the read goes on
                            prepared.decoded_failures[position] = exc
                else:
                    tensors.append(self.handler.decode(data))
            except DECODE_ERRORS as exc:
                prepared.errors.append(f"the image could not be decoded: {exc}")
                continue
            prepared.errors.append("")
        prepared.batch = torch.stack(tensors) if tensors else None
        return prepared

    def run(self, prepared: Prepared) -> list[ItemResult]:
        """The forward pass and one result per item (errors kept in place)."""
        probabilities = self.handler.infer(prepared.batch) if prepared.batch is not None else None
        return self.handler.postprocess(probabilities, prepared.errors)
