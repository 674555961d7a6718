"""JPEG bytes → labels with the decode on the device: the path a GPU worker could run.

``torchvision.io.decode_jpeg`` takes the whole batch as a list (nvjpeg on CUDA, libjpeg on the
CPU), the resize to the model's input and the normalisation run on the device as tensor
operations, and the forward pass runs with the model's weights in the chosen dtype (float16 on
CUDA) and ``channels_last``. Only the top-k indices and probabilities come back to the host.

The engine (``workers.engine.handler``) decodes with Pillow on the CPU today; this module is
what ``bench/gpu_check.py`` measures against it. torch and torchvision only: no Django, no
project pins, so it runs on a lent GPU machine with whatever versions it has.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs in favour of torchcodec
    warnings.simplefilter("ignore")
    from torchvision.io import ImageReadMode, decode_jpeg


def byte_tensors(items: Sequence[bytes]) -> list[torch.Tensor]:
    """Encoded files as the 1-D uint8 CPU tensors ``decode_jpeg`` takes (one copy: bytes are read-only)."""
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in items]


class DevicePipeline:
    """``run(list[bytes]) -> (indices, probabilities)``, both (N, k) on the CPU.

    ``model`` is moved to ``device`` in ``dtype`` with ``channels_last``; ``mean``/``std`` are the
    model's normalisation on the 0..1 scale, ``size`` its square input side.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: torch.device,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        dtype: torch.dtype = torch.float16,
        top_k: int = 5,
    ):
        self.device = device
        self.size = size
        self.dtype = dtype
        self.top_k = top_k
        self.model = model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the 0..255 values
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 CPU byte tensors → uint8 (3, H, W) images on the device, one batched call."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) images on the device → normalised (N, 3, size, size) in ``dtype``,
        ``channels_last``. Images of one shape are resized together; mixed shapes one by one."""
        target = (self.size, self.size)
        if len({tuple(image.shape) for image in images}) == 1:
            x = torch.stack(images).float()
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False)
        else:
            x = torch.cat(
                [
                    F.interpolate(
                        image[None].float(), size=target, mode="bilinear", antialias=True, align_corners=False
                    )
                    for image in images
                ]
            )
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) on the 0..255 scale, any dtype, on the device → the model's input."""
        x = x.float().mul_(self._scale).add_(self._shift)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised batch on the device → top-k (indices, probabilities) on the CPU."""
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(x).float(), dim=1)
            values, indices = probabilities.topk(min(self.top_k, probabilities.shape[1]), dim=1)
            return indices.cpu(), values.cpu()

    def run(self, items: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return self.forward(self.preprocess(self.decode(byte_tensors(items))))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overlapped(
    pipeline: DevicePipeline, batches: Sequence[Sequence[bytes]], seconds: float, min_batches: int = 2
) -> tuple[int, float]:
    """Decode and preprocess batch i+1 in a thread (on its own CUDA stream) while batch i runs
    forward, as the worker's pipeline overlaps Pillow decoding with the forward pass on the CPU.
    Returns (images labelled, seconds taken)."""
    device = pipeline.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        index = 0
        try:
            while not stop.is_set():
                items = batches[index % len(batches)]
                index += 1
                context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
                with context, torch.inference_mode():
                    x = pipeline.preprocess(pipeline.decode(byte_tensors(items)))
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                while not stop.is_set():
                    try:
                        ready.put((x, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer, which re-raises it
            failure.append(exc)
            stop.set()

    producer = threading.Thread(target=produce, name="gpu-check-prefetch", daemon=True)
    producer.start()
    done, batches_done = 0, 0
    started = time.perf_counter()
    try:
        while batches_done < min_batches or time.perf_counter() - started < seconds:
            while True:
                if failure:
                    raise failure[0]
                try:
                    x, event = ready.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                x.record_stream(torch.cuda.current_stream(device))
            indices, _ = pipeline.forward(x)
            done += indices.shape[0]
            batches_done += 1
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        producer.join(timeout=10)
    return done, elapsed


def timed(step: Callable[[], int], seconds: float, device: torch.device, min_batches: int = 2) -> tuple[int, float]:
    """Run ``step`` (returns images done) until ``seconds`` pass, at least ``min_batches`` times."""
    synchronize(device)
    done, calls, started = 0, 0, time.perf_counter()
    while calls < min_batches or time.perf_counter() - started < seconds:
        done += step()
        calls += 1
    synchronize(device)
    return done, time.perf_counter() - started
