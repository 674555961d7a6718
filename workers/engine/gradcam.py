"""Grad-CAM heatmaps for CNN models: which part of the image drove a finding.

For a batch and one class per item: keep the target layer's activations A (forward hook),
take the gradient of each item's selected logit with respect to A, weight each channel by the
mean of its gradient over height and width, and keep the positive part of the weighted sum:
``relu(sum_c mean_hw(dy/dA_c) * A_c)``. The map is upsampled bilinearly to the model's input
size and normalised to 0..1 per item.

Batched: the backward of the sum of the selected logits gives every item its own gradients,
since items do not interact in eval mode (batch norm uses its running statistics).

The model is shared with ``Handler.predict``: the hook is removed and the training mode restored
whatever happens, parameters keep their ``requires_grad`` and get no ``.grad`` (the gradient is
taken with ``torch.autograd.grad`` towards the activations only), and the pass runs in float32
without autocast for stable gradients, on the handler's device.

PyTorch, Pillow and numpy only; no Django.
"""

from __future__ import annotations

import io
import numbers
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.model_package import CHANNELS

from .handler import Handler

# Overlay defaults: heat below OVERLAY_FLOOR is fully transparent, the hottest part is
# OVERLAY_MAX_ALPHA opaque so that the image stays readable under it.
OVERLAY_FLOOR = 0.2
OVERLAY_MAX_ALPHA = 0.6
PALETTE_SIZE = 256  # one colour per 8-bit heat level
HEATMAP_PNG_COMPRESS_LEVEL = 3  # smooth maps: 3 is as small as 6 and faster
_BATCH_DIMS = 4  # images, channels, height, width
_SPATIAL_DIMS = (2, 3)  # height, width of a (N, C, H, W) tensor
_SPAN_FLOOR = 1e-30  # keeps the rounding threshold above zero where a map is zero everywhere
# the "jet" ramp: where red, green and blue peak along 0..1, how wide each band is, how flat its top
_JET_PEAKS = (0.75, 0.5, 0.25)
_JET_SLOPE = 4.0
_JET_PLATEAU = 1.5


def target_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The module at dotted path ``layer`` (e.g. ``"layer4"``, ``"features.28"``); ValueError if none."""
    if not isinstance(layer, str) or not layer.strip():
        raise ValueError("Grad-CAM needs the name of a layer of the model, e.g. 'layer4'")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("Grad-CAM needs an eager PyTorch model: TorchScript models take no hooks on their layers")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        top = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"the model has no layer {layer!r} for Grad-CAM (its top-level layers: {top})") from None


def _class_index_tensor(class_indices: Sequence[int] | torch.Tensor, count: int, classes: int) -> torch.Tensor:
    if isinstance(class_indices, torch.Tensor):
        if class_indices.dtype.is_floating_point or class_indices.is_complex() or class_indices.dtype == torch.bool:
            raise ValueError("class indices must be integers")
        indices = class_indices.detach().reshape(-1).to("cpu", torch.int64)
    else:
        values = list(class_indices)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise ValueError("class indices must be integers")
        indices = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if indices.numel() != count:
        raise ValueError(f"{indices.numel()} class indices for {count} images")
    if count and (int(indices.min()) < 0 or int(indices.max()) >= classes):
        raise ValueError(f"class indices must lie in 0..{classes - 1}")
    return indices


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Each map (N, H, W) onto 0..1; a flat map (no variation) becomes all zeros."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    span = high - low
    # a span at the level of float32 rounding is no structure: treat it as flat
    varies = span > torch.finfo(torch.float32).eps * torch.maximum(high.abs(), low.abs()).clamp_min(_SPAN_FLOOR)
    return torch.where(varies, (cam - low) / torch.where(varies, span, torch.ones_like(span)), torch.zeros_like(cam))


def gradcam(
    handler: Handler,
    batch_uint8: torch.Tensor,
    class_indices: Sequence[int] | torch.Tensor,
    layer: str,
) -> np.ndarray:
    """uint8 (N, 3, H, W) and one class index per item → heatmaps (N, H, W) float32 in 0..1.

    ``layer`` is a dotted module path of ``handler.model`` whose output is a feature map
    (N, C, h, w), normally the last convolutional stage (``"layer4"`` for resnets).
    """
    if (
        not isinstance(batch_uint8, torch.Tensor)
        or batch_uint8.dtype != torch.uint8
        or batch_uint8.dim() != _BATCH_DIMS
    ):
        raise ValueError("Grad-CAM takes a uint8 tensor (N, 3, H, W), as Handler.decode makes them")
    count, _, height, width = batch_uint8.shape
    model = handler.model
    module = target_module(model, layer)
    indices = _class_index_tensor(class_indices, count, len(handler.manifest.labels))
    if count == 0:
        return np.zeros((0, height, width), dtype=np.float32)

    device = handler.device
    owner = threading.get_ident()
    captured: list[torch.Tensor] = []

    def keep_activations(_module, _inputs, output):
        # the model is shared: only this thread's pass is recorded, never a concurrent predict
        if threading.get_ident() == owner and torch.is_grad_enabled():
            captured.append(output)

    was_training = model.training
    hook = module.register_forward_hook(keep_activations)
    try:
        model.eval()
        # inference_mode(False) too: enable_grad alone does not lift a caller's inference mode
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            mean = torch.tensor(handler.manifest.mean, device=device, dtype=torch.float32).view(1, CHANNELS, 1, 1)
            std = torch.tensor(handler.manifest.std, device=device, dtype=torch.float32).view(1, CHANNELS, 1, 1)
            x = batch_uint8.to(device).to(torch.float32).div(255.0)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            # the graph exists even if a model's parameters were frozen; no gradient reaches x itself
            x.requires_grad_(True)
            logits = model(x)
            if not captured:
                raise ValueError(f"layer {layer!r} took no part in the forward pass")
            activations = captured[-1]
            if not isinstance(activations, torch.Tensor) or activations.dim() != _BATCH_DIMS:
                shape = tuple(activations.shape) if isinstance(activations, torch.Tensor) else type(activations)
                raise ValueError(
                    f"layer {layer!r} outputs {shape}; Grad-CAM needs a convolutional feature map (N, C, h, w)"
                )
            if logits.dim() != 2 or logits.shape[0] != count:
                raise ValueError(f"the model answers {tuple(logits.shape)} for {count} images")
            # a clone: indices made under the caller's inference mode cannot be saved for backward
            index = indices.to(device).view(-1, 1).clone()
            selected = logits.float().gather(1, index).sum()
            (gradients,) = torch.autograd.grad(selected, activations)
        with torch.no_grad():
            weights = gradients.float().mean(dim=_SPATIAL_DIMS, keepdim=True)
            cam = F.relu((weights * activations.detach().float()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
            cam = _normalise(torch.nan_to_num(cam.squeeze(1), nan=0.0, posinf=0.0, neginf=0.0))
            return cam.cpu().numpy().astype(np.float32, copy=False)
    finally:
        hook.remove()
        captured.clear()
        model.train(was_training)


def heatmaps_for(handler: Handler, items: list[bytes], layer: str) -> list[np.ndarray | None]:
    """One heatmap per input, in order, for the top class ``handler.infer`` gives it; None for an
    input that cannot be decoded (it does not stop the others)."""
    target_module(handler.model, layer)  # an unknown layer fails even for a batch of bad inputs
    batch, errors = handler.preprocess(items)  # Handler.decode, with the errors predict reports
    if batch is None:
        return [None] * len(items)
    top = handler.infer(batch).argmax(dim=1)
    maps = iter(gradcam(handler, batch, top, layer))
    return [None if error else next(maps) for error in errors]


def colormap(values: np.ndarray) -> np.ndarray:
    """0..1 (H, W) → uint8 RGB (H, W, 3), a "jet"-like ramp: blue, cyan, yellow, red."""
    v = np.clip(np.nan_to_num(values.astype(np.float32, copy=False)), 0.0, 1.0)[..., None]
    centres = np.array(_JET_PEAKS, dtype=np.float32)
    rgb = np.clip(_JET_PLATEAU - np.abs(_JET_SLOPE * (v - centres)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay_palette(floor: float = OVERLAY_FLOOR, max_alpha: float = OVERLAY_MAX_ALPHA) -> np.ndarray:
    """The overlay's 256 colours, uint8 RGBA (256, 4): heat level i/255 → colour and opacity."""
    if not 0.0 <= floor < 1.0 or not 0.0 <= max_alpha <= 1.0:
        raise ValueError("floor must lie in [0, 1) and max_alpha in [0, 1]")
    ramp = np.linspace(0.0, 1.0, PALETTE_SIZE, dtype=np.float32)
    alpha = np.clip((ramp - floor) / (1.0 - floor), 0.0, 1.0) * (max_alpha * 255.0)
    return np.concatenate([colormap(ramp[None, :])[0], (alpha + 0.5).astype(np.uint8)[:, None]], axis=1)


def render_overlay_png(
    cam: np.ndarray,
    size: tuple[int, int],
    *,
    floor: float = OVERLAY_FLOOR,
    max_alpha: float = OVERLAY_MAX_ALPHA,
    indexed: bool = False,
) -> bytes:
    """A heatmap as a PNG of ``size`` = (width, height) of the original image, to lay over it.

    Colour-mapped; transparent where the heat is below ``floor``, rising to ``max_alpha`` at 1.
    An RGBA PNG; ``indexed=True`` writes the same pixels as a palette PNG with an alpha per
    palette entry (browsers and ``Image.convert("RGBA")`` give the identical RGBA), which is
    smaller and several times faster to encode at large sizes.
    """
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError("the heatmap must be a non-empty 2-D array")
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"overlay size must be positive, not {size!r}")
    palette = overlay_palette(floor, max_alpha)
    levels = (np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # resize the heat levels, not the colours, so that interpolated pixels keep colours of the ramp
    resized = Image.fromarray(levels).resize((width, height), Image.Resampling.BILINEAR)
    if indexed:
        image = Image.frombytes("P", resized.size, resized.tobytes())
        image.putpalette(palette.tobytes(), rawmode="RGBA")
    else:
        image = Image.fromarray(np.take(palette, np.asarray(resized), axis=0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=HEATMAP_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
