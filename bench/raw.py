"""The raw baseline: what a model server's default image handler runs, with no platform in the way.

JPEG bytes → PIL → Resize(256) → CenterCrop(224) → ToTensor → Normalize (torchvision transforms) →
eager fp32 forward in NCHW (contiguous) memory format → softmax → top-5. The model's weights come from the
same package the platform serves; only torch, torchvision, numpy and Pillow are used, never the
platform's Handler (whose own figure is reported beside this one, to show the engine's backend gain).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms

from workers.engine.package import read_weights

TOP_K = 5


def raw_transform(input_size: int, mean, std) -> transforms.Compose:
    """Resize 256 / CenterCrop 224 at 224 px, the same proportions at another input size."""
    return transforms.Compose(
        [
            transforms.Resize(round(input_size * 256 / 224)),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class RawPipeline:
    def __init__(self, package: Path, sha256: str):
        manifest, state_dict = read_weights(package, sha256)
        model = torchvision.models.get_model(manifest.architecture, weights=None, num_classes=len(manifest.labels))
        model.load_state_dict(state_dict, strict=True)
        self.model = model.eval()  # fp32, NCHW: torchvision's defaults
        self.transform = raw_transform(manifest.input_size, manifest.mean, manifest.std)
        self.k = min(TOP_K, len(manifest.labels))

    def __call__(self, items: list[bytes]) -> list[list[tuple[int, float]]]:
        batch = torch.stack([self.transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in items])
        with torch.inference_mode():
            top = torch.softmax(self.model(batch), dim=1).topk(self.k)
        return [list(zip(i.tolist(), p.tolist(), strict=True)) for i, p in zip(top.indices, top.values, strict=True)]
