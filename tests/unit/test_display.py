"""The display copy: the upload's pixels alone, re-encoded, in the mode the viewer shows."""

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from recognition.display import display_copy

GREY = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) % 251).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **params) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return Image.open(io.BytesIO(buffer.getvalue()))


def opened(content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(content))


def test_a_png_with_text_chunks_and_an_icc_profile_loses_both_and_keeps_its_pixels():
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "DOE^JANE")
    source = encoded(Image.fromarray(GREY), "PNG", pnginfo=info, icc_profile=b"ICC-PROFILE-BYTES" * 8)
    source.load()
    assert source.info.get("PatientName") == "DOE^JANE"

    copy = display_copy(source, "PNG")

    assert copy.extension == "png" and b"DOE^JANE" not in copy.content and b"ICC-PROFILE" not in copy.content
    shown = opened(copy.content)
    assert shown.format == "PNG" and "icc_profile" not in shown.info and "PatientName" not in shown.info
    assert np.array_equal(np.asarray(shown), GREY)
    assert source.info.get("PatientName") == "DOE^JANE"  # the caller's image is left as it was


def test_a_jpeg_becomes_a_jpeg_without_its_exif_or_comment():
    exif = Image.Exif()
    exif[0x013B] = "DOE^JANE"  # Artist
    source = encoded(Image.fromarray(GREY).convert("RGB"), "JPEG", exif=exif, comment=b"MRN 12345")
    source.load()

    copy = display_copy(source)  # the format Pillow opened it as

    assert copy.extension == "jpg"
    assert b"DOE^JANE" not in copy.content and b"MRN 12345" not in copy.content and b"Exif" not in copy.content
    shown = opened(copy.content)
    assert shown.format == "JPEG" and shown.mode == "RGB" and shown.size == (64, 48)
    assert not shown.getexif() and "comment" not in shown.info


def test_sixteen_bit_grey_stays_sixteen_bit():
    deep = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    source = encoded(Image.fromarray(deep), "PNG")
    source.load()

    shown = opened(display_copy(source, "PNG").content)

    assert shown.mode in ("I", "I;16") and np.array_equal(np.asarray(shown).astype(np.uint16), deep)


@pytest.mark.parametrize(
    ("mode", "kept"),
    [("LA", "L"), ("P", "RGB"), ("RGBA", "RGB"), ("1", "L"), ("CMYK", "RGB")],
)
def test_other_modes_become_grey_or_rgb(mode, kept):
    source = Image.fromarray(GREY).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    copy = display_copy(encoded(source, fmt), fmt)
    assert opened(copy.content).mode == kept


def test_the_digest_is_of_the_stored_bytes():
    import hashlib

    copy = display_copy(Image.fromarray(GREY), "PNG")
    assert copy.sha256 == hashlib.sha256(copy.content).hexdigest()
