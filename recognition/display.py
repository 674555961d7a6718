"""The sanitised display copy of an uploaded PNG or JPEG: the only copy a browser is ever sent.

The upload itself (the image's ``original``) keeps whatever metadata its sender put in it (EXIF
with a device serial or a date, ICC profiles, PNG text chunks that may name a patient); it is
never served. ``display_copy`` re-encodes the pixels alone. Pillow and numpy only: the worker's
runner calls it with the image it decoded for the model, so the pixels are decoded once.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Modes stored as they are; everything else becomes RGB (or L when it has no colour).
KEPT_MODES = {"L", "RGB", "I;16", "I;16B", "I;16L"}

# Encoder per original format, measured (Pillow 13, 2 shared cores, synthetic radiograph texture,
# CPU ms per encode / bytes):
#   224² RGB: PNG level 1 3.1 / 51 KB, level 0 1.7 / 151 KB, level 6 12.1 / 48 KB; JPEG q95 0.28 / 17 KB
#   512² RGB: PNG level 1 17.6 / 289 KB, level 0 8.5 / 787 KB;                     JPEG q95 1.24 / 106 KB
#   224² L:   PNG level 1 2.0 / 33 KB, level 1 + Z_RLE 1.5 / 29 KB, level 6 3.1 / 29 KB; JPEG q95 0.18 / 17 KB
#   512² L:   PNG level 1 11.0 / 184 KB, level 1 + Z_RLE 7.9 / 169 KB, level 0 5.1 / 263 KB; JPEG q95 0.95
# A JPEG is already lossy: its copy is JPEG q95, 10x cheaper than any PNG, at no visible loss. A PNG
# stays lossless: level 1 (level 0 halves the time but triples the bytes every page view fetches),
# with zlib's RLE strategy for 8-bit grey, where it is both faster and smaller (not for RGB or 16 bits).
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1
_UINT16_LIMIT = 1 << 16  # a 32-bit grey PNG whose values fit 16 bits is stored as 16 bits


@dataclass(frozen=True)
class DisplayCopy:
    content: bytes
    sha256: str
    extension: str  # "png" or "jpg": the stored name's suffix, which display_content_type reads


def display_content_type(image) -> str:
    """The Content-Type of a stored image's display copy (``recognition.models.Image``)."""
    return "image/jpeg" if image.file.name.endswith(".jpg") else "image/png"


def display_mode(image: Image.Image) -> Image.Image:
    """``image`` in a mode the display copy keeps: L, RGB, or 16-bit grey (which stays 16-bit)."""
    if image.mode in KEPT_MODES:
        return image
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode == "I":  # 16-bit PNGs open as 32-bit grey: store them back as 16 bits
        pixels = np.asarray(image)
        if pixels.min() >= 0 and pixels.max() < _UINT16_LIMIT:
            return Image.fromarray(pixels.astype(np.uint16))
        return image.convert("L")
    return image.convert("RGB")


def display_copy(image: Image.Image, original_format: str | None = None) -> DisplayCopy:
    """Re-encode the decoded ``image`` with no metadata (no EXIF, ICC profile, text chunks or
    comments): JPEG q95 for a JPEG original (``original_format``, else the format Pillow opened
    ``image`` as) in 8-bit L or RGB, PNG otherwise. The caller's image is not changed. Raises what
    Pillow raises on pixels it cannot encode."""
    original_format = original_format or image.format or "PNG"
    clean = display_mode(image)
    if clean is image:
        clean = image.copy()  # its info is cleared below; the caller's stays as it was
    clean.info = {}  # Pillow's encoders would copy an ICC profile, comment or transparency from here
    buffer = io.BytesIO()
    if original_format == "JPEG" and clean.mode in ("L", "RGB"):
        clean.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        extension = "jpg"
    else:
        strategy = zlib.Z_RLE if clean.mode == "L" else zlib.Z_DEFAULT_STRATEGY
        clean.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=strategy)
        extension = "png"
    content = buffer.getvalue()
    return DisplayCopy(content=content, sha256=hashlib.sha256(content).hexdigest(), extension=extension)
