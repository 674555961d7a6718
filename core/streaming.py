"""Responses that leave the server a piece at a time, under ASGI as under WSGI.

Under ASGI (uvicorn) Django reads a *synchronous* iterator given to ``StreamingHttpResponse``
into a list before it sends the first byte (``StreamingHttpResponse.__aiter__``), so an export
of 100,000 rows sat whole in the web process's memory. ``streaming_response`` hands Django an
asynchronous iterator instead: each step runs the synchronous generator on the request's own
thread (``sync_to_async``, thread-sensitive: the thread that holds the request's database
connection, so ``.iterator(chunk_size=...)`` keeps its cursor on the thread that opened it) until
about ``CHUNK_BYTES`` are ready, and hands them to the server, which sends them before asking for
more (uvicorn waits while the client's socket is full). Outside ASGI (WSGI, the test client) the
generator is given to Django as it is, which streams it there.

When the client goes away mid-stream Django closes the response on the same thread, which closes
the generator (its ``finally`` blocks and the database cursor run there, never on another thread).

``multipart_response`` frames parts (``Part``: a content type, headers, bytes or an iterable of
bytes) as a MIME multipart body (RFC 2046) with a random boundary and streams it the same way,
for bodies such as DICOMweb's ``multipart/related; type="application/dicom"``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse

# Bytes gathered on the request's thread per step: each step costs a hop between the event loop
# and that thread; Django's ASGI handler sends at most 64 KiB per message anyway. Measured with
# tests/e2e/test_export_streaming.py (100,000 rows: a 94 MB CSV, a 273 MB JSON; 2 shared cores),
# seconds to download CSV / JSON: 16 KiB 2.8 / 3.4, 64 KiB 2.4 / 2.4, 256 KiB 2.2 / 2.7; the web
# process's peak grew by under 7 MB with each.
CHUNK_BYTES = 64 * 2**10

Piece = str | bytes
_END = object()
BOUNDARY_BYTES = 16  # random bytes in a multipart boundary (32 hex digits)


class ChunkedStream:
    """An asynchronous iterator over a synchronous iterable of str/bytes pieces: each step gathers
    pieces (str encoded with ``charset``) on the caller's thread-sensitive thread until at least
    ``chunk_bytes`` are ready or the pieces end. ``close()`` closes the pieces' generator;
    Django's response calls it (through ``sync_to_async``, so on the same thread) when it is done."""

    def __init__(self, pieces: Iterable[Piece], *, charset: str = "utf-8", chunk_bytes: int = CHUNK_BYTES) -> None:
        self._source = pieces
        self._pieces: Iterator[Piece] = iter(pieces)
        self.charset = charset
        self.chunk_bytes = chunk_bytes
        self._done = False

    def __aiter__(self) -> ChunkedStream:
        return self

    async def __anext__(self) -> bytes:
        if not self._done:
            chunk = await sync_to_async(self._next_chunk, thread_sensitive=True)()
            if chunk:
                return chunk
        raise StopAsyncIteration

    def _next_chunk(self) -> bytes:
        gathered: list[bytes] = []
        size = 0
        while size < self.chunk_bytes:
            piece = next(self._pieces, _END)
            if piece is _END:
                self._done = True
                break
            data = piece.encode(self.charset) if isinstance(piece, str) else bytes(piece)
            gathered.append(data)
            size += len(data)
        return b"".join(gathered)

    def close(self) -> None:
        self._done = True
        for closable in (self._pieces, self._source):
            close = getattr(closable, "close", None)
            if close is not None:
                close()


def _is_asgi(request) -> bool:
    # a DRF Request wraps Django's request
    return isinstance(getattr(request, "_request", request), ASGIRequest)


def streaming_response(
    request, pieces: Iterable[Piece], *, content_type: str, filename: str | None = None, status: int = 200
) -> StreamingHttpResponse:
    """A response streaming ``pieces`` (str or bytes) under the server ``request`` came through.
    ``filename`` makes it a download (``Content-Disposition: attachment``); it must be plain ASCII."""
    if not _is_asgi(request):
        response = StreamingHttpResponse(pieces, content_type=content_type, status=status)
    else:
        stream = ChunkedStream(pieces)
        response = StreamingHttpResponse(stream, content_type=content_type, status=status)
        stream.charset = response.charset
    if filename is not None:
        if not filename.isascii() or any(character in filename for character in '"\\\r\n'):
            raise ValueError(f"a download's name is plain ASCII without quotes: {filename!r}")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- multipart ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One body part: its content type, any further headers, and its content (bytes, or an
    iterable of bytes read only when the part is sent: a file read in blocks)."""

    content_type: str
    content: bytes | Iterable[bytes]
    headers: Mapping[str, str] = field(default_factory=dict)


def _header_line(name: str, value: str) -> bytes:
    if not name.isascii() or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n"):
        raise ValueError(f"not a header a part may carry: {name!r}: {value!r}")
    return f"{name}: {value}\r\n".encode("latin-1")


def multipart_pieces(parts: Iterable[Part], *, boundary: str) -> Iterator[bytes]:
    """The multipart body of ``parts`` (RFC 2046 section 5.1.1), a piece at a time."""
    for part in parts:
        head = [f"--{boundary}\r\n".encode("ascii"), _header_line("Content-Type", part.content_type)]
        head += [_header_line(name, value) for name, value in part.headers.items()]
        yield b"".join(head) + b"\r\n"
        if isinstance(part.content, bytes | bytearray | memoryview):
            yield bytes(part.content)
        else:
            yield from part.content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def multipart_boundary() -> str:
    """32 random hex digits: a body part would have to contain them by chance to end early."""
    return f"sightline-{secrets.token_hex(BOUNDARY_BYTES)}"


def multipart_response(
    request,
    parts: Iterable[Part],
    *,
    subtype: str = "related",
    parameters: Mapping[str, str] | None = None,
    boundary: str | None = None,
    status: int = 200,
) -> StreamingHttpResponse:
    """``parts`` streamed as ``multipart/<subtype>``; ``parameters`` go into the content type
    before the boundary, e.g. ``{"type": "application/dicom"}`` for DICOMweb (values quoted)."""
    boundary = boundary or multipart_boundary()
    params = "".join(f'; {name}="{value}"' for name, value in (parameters or {}).items())
    if any(c in params for c in "\r\n") or any(c in value for value in (parameters or {}).values() for c in '"\\'):
        raise ValueError(f"not a content-type parameter: {parameters!r}")
    content_type = f"multipart/{subtype}{params}; boundary={boundary}"
    return streaming_response(
        request, multipart_pieces(parts, boundary=boundary), content_type=content_type, status=status
    )
