"""The worker's side of a stateless tensor read (protocols.core.tensor_read): the input from the
cache, one forward pass on already-normalised input, the probabilities back through the cache,
the waiting web process told on its channel group. Nothing about it is stored."""

from __future__ import annotations

import logging

import numpy as np
from celery import shared_task
from django.core.cache import cache

from accounts import events
from recognition.models import ERROR_LENGTH, ModelVersion

from .core import TENSOR_KEY_MARGIN_SECONDS, TENSOR_TASK, tensor_cache_keys

logger = logging.getLogger(__name__)


def normalised_infer(handler, array: np.ndarray) -> np.ndarray:
    """Probabilities (N, labels) for input already scaled and normalised with the model's mean
    and std: the engine's forward pass (``Handler.torch_infer``) without its uint8 → normalised
    step, on the eager model (the ONNX runner takes uint8 with the normalisation in its graph)."""
    import torch

    from workers.engine import backends

    if not isinstance(getattr(handler, "model", None), torch.nn.Module):
        # an ONNX graph takes uint8 pixels with its normalisation inside: nothing to feed FP32 to
        raise ValueError(f"{handler.manifest.name} {handler.manifest.version} takes images only (BYTES), not FP32")
    with torch.inference_mode():
        x = torch.from_numpy(array).to(handler.device).contiguous(memory_format=torch.channels_last)
        with (
            backends.GRAPH_LOCK,
            torch.autocast(handler.device.type, dtype=torch.float16, enabled=handler.device.type == "cuda"),
        ):
            logits = handler.model(x)
        if handler.manifest.task == "multi-label":
            return torch.sigmoid(logits.float()).cpu().numpy()
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


@shared_task(name=TENSOR_TASK)
def tensor_read(key: str, version_id: int) -> None:
    from workers.model_cache import model_handler

    input_key, output_key = tensor_cache_keys(key)
    item = cache.get(input_key)
    if item is None:  # already read (a redelivery), or its wait ended long ago
        return
    cache.delete(input_key)
    try:
        version = ModelVersion.objects.select_related("model").get(pk=version_id)
        array = np.frombuffer(item["data"], dtype="<f4").reshape(item["shape"])
        answer: dict = {"probabilities": normalised_infer(model_handler(version), array).tolist()}
    except Exception as exc:  # the waiting client gets the error in words
        logger.exception("tensor read %s failed", key)
        answer = {"error": str(exc)[:ERROR_LENGTH] or type(exc).__name__}
    cache.set(output_key, answer, TENSOR_KEY_MARGIN_SECONDS)
    events.send(events.protocol_tensor_group(key), {"type": events.PROTOCOL_READ_DONE, "request": key})
