"""The STOW-RS body parser: parts cut at their boundaries however the body arrives, each bounded."""

from __future__ import annotations

import io

import pytest

from core.errors import Invalid
from dicomnet.dicomweb.multipart import multipart_parts

BOUNDARY = "b0undary"


def body(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{BOUNDARY}--".encode() + epilogue


def reader(data: bytes, step: int):
    """A request that hands the body on ``step`` bytes at a time, whatever is asked."""
    stream = io.BytesIO(data)
    return lambda n: stream.read(min(n, step))


@pytest.mark.parametrize("step", [1, 3, 7, 11, 64 * 1024])
def test_parts_are_cut_at_their_boundaries_however_the_body_arrives(step):
    contents = [b"first\r\n--b0und", b"", b"x" * 5000, b"\r\n\r\n--b0undar"]  # near-delimiters inside parts
    data = body(*contents, preamble=b"ignored preamble\r\n", epilogue=b"\r\nignored epilogue")
    parts = list(multipart_parts(reader(data, step), boundary=BOUNDARY, part_limit=10_000))
    assert [part.data for part in parts] == contents
    assert all(part.content_type == "application/dicom" and not part.too_large for part in parts)


def test_an_oversized_part_is_dropped_and_the_next_still_read():
    data = body(b"y" * 100, b"small")
    parts = list(multipart_parts(reader(data, 9), boundary=BOUNDARY, part_limit=50))
    assert [(part.too_large, part.data) for part in parts] == [(True, b""), (False, b"small")]


@pytest.mark.parametrize(
    "data",
    [b"no boundary at all", body(b"cut")[:-12], f"--{BOUNDARY}\r\nContent-Type: application/dicom".encode()],
)
def test_a_broken_body_is_a_400_in_words(data):
    with pytest.raises(Invalid):
        list(multipart_parts(reader(data, 5), boundary=BOUNDARY, part_limit=1000))


def test_a_part_with_an_unreadable_header_is_reported_not_fatal():
    data = f"--{BOUNDARY}\r\nnot a header\r\n\r\nabc\r\n".encode() + body(b"good")
    parts = list(multipart_parts(reader(data, 4), boundary=BOUNDARY, part_limit=1000))
    assert parts[0].malformed and parts[1].data == b"good"
