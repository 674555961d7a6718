"""Radiograph-like synthetic images for the demo model and the demo data.

These are generated textures, not medical images: a smooth "anatomy" background with film
grain, and, for the positive class, one round opacity of varying size and contrast. They
exist so that the demo model's predictions mean something without shipping patient data.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

LABELS = ("no_finding", "round_opacity")


def _smooth_noise(rng: np.random.Generator, size: int, alpha: float) -> np.ndarray:
    """1/f^alpha noise: large soft structures, like overlapping tissue on a film."""
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    spectrum = np.fft.rfft2(white) / radius**alpha
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(size, size))
    field -= field.min()
    peak = field.max()
    return field / peak if peak > 0 else field


def render(rng: np.random.Generator, size: int, opacity: bool) -> np.ndarray:
    """One grayscale image as uint8 HxW; ``opacity`` adds a round lesion-like blob."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = 0.35 + 0.25 * np.exp(-(((xx - 0.5) / 0.38) ** 2) - ((yy - 0.55) / 0.45) ** 2)
    tissue = _smooth_noise(rng, size, alpha=rng.uniform(1.8, 2.6))
    image = body + rng.uniform(0.15, 0.3) * (tissue - 0.5)
    if opacity:
        cx, cy = rng.uniform(0.22, 0.78, size=2)
        radius = rng.uniform(0.05, 0.14)
        contrast = rng.uniform(0.12, 0.35)
        edge = rng.uniform(0.1, 0.35) * radius
        distance = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        image = image + contrast / (1.0 + np.exp((distance - radius) / edge))
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.04), size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_png(rng: np.random.Generator, size: int, opacity: bool) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(rng, size, opacity)).save(buffer, format="PNG")
    return buffer.getvalue()


def dataset(seed: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, size, size) uint8 and their labels, half of each class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    images = np.stack([render(rng, size, bool(label)) for label in labels])
    return images, labels.astype(np.int64)
