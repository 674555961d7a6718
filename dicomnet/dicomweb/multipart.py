"""A STOW-RS body (``multipart/related``, RFC 2387 over RFC 2046 framing) read as a stream.

The body is read a block at a time from the request and cut at each boundary; one part is held
in memory at a time, and no more of it than ``part_limit`` bytes: a part that grows past it is
read to its end and dropped (reported as too large), so one oversized or broken part does not
lose the parts after it. The request as a whole is capped where it enters (core/body_limit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from core.errors import Invalid

READ_BYTES = 64 * 2**10  # per read from the request: the size Django's ASGI handler hands on
HEADER_LIMIT = 16 * 2**10  # a part's headers: a few lines; anything longer is not a STOW part
# RFC 2046 allows 70 characters; Orthanc's DICOMweb client sends 73 (two UUIDs): be lenient
BOUNDARY_MAX = 256


@dataclass
class BodyPart:
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    data: bytes = b""
    too_large: bool = False
    malformed: str = ""  # why the part's headers could not be read

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def multipart_parts(read: Callable[[int], bytes], *, boundary: str, part_limit: int) -> Iterator[BodyPart]:
    """The body parts of a multipart body read through ``read(n)``, one at a time."""
    if not boundary or len(boundary) > BOUNDARY_MAX:
        raise Invalid("The multipart body has no usable boundary parameter.", code="bad_multipart")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    # a CRLF in front lets the first delimiter (which may open the body) match like the others
    buffer = bytearray(b"\r\n")
    ended = False

    def fill() -> bool:
        nonlocal ended
        if ended:
            return False
        block = read(READ_BYTES)
        if not block:
            ended = True
            return False
        buffer.extend(block)
        return True

    # the preamble, up to the first delimiter, is ignored
    while (start := buffer.find(delimiter)) < 0:
        del buffer[: max(0, len(buffer) - len(delimiter))]
        if not fill():
            raise Invalid("The multipart body holds no part (its boundary never appears).", code="bad_multipart")
    del buffer[: start + len(delimiter)]
    while True:
        while len(buffer) < 2 and fill():
            pass
        if buffer[:2] == b"--":  # the close delimiter: the epilogue is ignored
            return
        # transport padding, then the line break that ends the delimiter line
        while (line_end := buffer.find(b"\r\n")) < 0:
            if len(buffer) > HEADER_LIMIT or not fill():
                raise Invalid("The multipart body ends inside a delimiter line.", code="bad_multipart")
        del buffer[: line_end + 2]
        part = BodyPart()
        # headers (an empty header block starts the content at once)
        if buffer[:2] == b"\r\n":
            del buffer[:2]
        else:
            while (head_end := buffer.find(b"\r\n\r\n")) < 0:
                if len(buffer) > HEADER_LIMIT:
                    raise Invalid("A part's headers are longer than a STOW part's can be.", code="bad_multipart")
                if not fill():
                    raise Invalid("The multipart body ends inside a part's headers.", code="bad_multipart")
            try:
                part.headers = _headers(bytes(buffer[:head_end]))
            except ValueError as exc:
                part.malformed = str(exc)
            del buffer[: head_end + 4]
        # the content, up to the next delimiter; kept while within the limit
        kept: list[bytes] = []
        size = 0
        while (end := buffer.find(delimiter)) < 0:
            keep = len(buffer) - len(delimiter) + 1  # the rest may be the start of a delimiter
            if keep > 0:
                size += keep
                if size <= part_limit:
                    kept.append(bytes(buffer[:keep]))
                else:
                    part.too_large, kept = True, []
                del buffer[:keep]
            if not fill():
                raise Invalid("The multipart body ends before its closing boundary.", code="bad_multipart")
        size += end
        if size <= part_limit and not part.too_large:
            kept.append(bytes(buffer[:end]))
            part.data = b"".join(kept)
        else:
            part.too_large = True
        del buffer[: end + len(delimiter)]
        yield part
