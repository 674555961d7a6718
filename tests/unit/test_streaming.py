"""core.streaming: a synchronous generator leaves the ASGI server a chunk at a time, each chunk made
on the request's own thread, and is closed there when the client goes away; multipart bodies are
framed by the book."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import threading
import warnings

import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.test import AsyncRequestFactory, RequestFactory, override_settings
from django.urls import path
from rest_framework.request import Request

from core.streaming import CHUNK_BYTES, ChunkedStream, Part, multipart_response, streaming_response

# a response's close() sends request_finished, whose close_old_connections looks at the database
# connection a test before this one may have left open in this thread
pytestmark = pytest.mark.django_db

PIECE = "x" * 1000 + "\n"
PIECES = 2_000  # about 2 MB: 30 chunks


class Source:
    """A generator of PIECES lines that notes how many were taken, on which threads, and whether
    (and on which thread) it was closed."""

    def __init__(self, count: int = PIECES, piece: str | bytes = PIECE):
        self.count, self.piece = count, piece
        self.taken = 0
        self.threads: set[int] = set()
        self.closed_on: int | None = None

    def __iter__(self):
        try:
            for _ in range(self.count):
                self.taken += 1
                self.threads.add(threading.get_ident())
                yield self.piece
        finally:
            self.closed_on = threading.get_ident()


def read_all(response) -> list[bytes]:
    async def consume():
        async with ThreadSensitiveContext():  # what Django's handler enters per request
            chunks = [chunk async for chunk in response]
            await sync_to_async(response.close)()
        return chunks

    return async_to_sync(consume)()


def test_under_asgi_the_pieces_go_out_in_chunks_of_about_chunk_bytes_as_an_async_iterator():
    source = Source()
    response = streaming_response(AsyncRequestFactory().get("/"), iter(source), content_type="text/csv")
    assert response.is_async  # Django would read a synchronous iterator whole here
    chunks = read_all(response)
    assert b"".join(chunks) == (PIECE * PIECES).encode()
    assert len(chunks) > 1 and all(CHUNK_BYTES <= len(chunk) < CHUNK_BYTES + len(PIECE) for chunk in chunks[:-1])


def test_each_chunk_is_made_on_the_requests_thread_not_the_event_loops():
    source = Source()
    response = streaming_response(AsyncRequestFactory().get("/"), iter(source), content_type="text/csv")
    loop_threads = set()

    async def consume():
        async with ThreadSensitiveContext():
            async for _ in response:
                loop_threads.add(threading.get_ident())
            await sync_to_async(response.close)()

    async_to_sync(consume)()
    assert len(source.threads) == 1 and source.threads.isdisjoint(loop_threads)
    assert source.closed_on in source.threads


def test_str_pieces_are_encoded_in_the_responses_charset_and_bytes_pass_as_they_are():
    pieces = ["é;", b"\xff\x00", "ж\n"]
    request = AsyncRequestFactory().get("/")
    latin = streaming_response(request, iter(pieces[:1]), content_type="text/csv; charset=latin-1")
    assert b"".join(read_all(latin)) == "é;".encode("latin-1")
    mixed = streaming_response(request, iter(pieces), content_type="text/plain")
    assert b"".join(read_all(mixed)) == "é;".encode() + b"\xff\x00" + "ж\n".encode()


def test_nothing_is_read_before_the_first_chunk_is_asked_for_and_only_about_a_chunk_then():
    source = Source()
    stream = ChunkedStream(iter(source))

    async def first():
        async with ThreadSensitiveContext():
            return await anext(stream)

    assert source.taken == 0
    async_to_sync(first)()
    assert source.taken == -(-CHUNK_BYTES // len(PIECE))


def test_an_empty_generator_gives_an_empty_body():
    assert read_all(streaming_response(AsyncRequestFactory().get("/"), iter(()), content_type="text/csv")) == []


def test_a_drf_request_is_seen_through_to_the_asgi_request_beneath():
    response = streaming_response(Request(AsyncRequestFactory().get("/")), iter(["a"]), content_type="text/csv")
    assert response.is_async


def test_outside_asgi_the_generator_is_handed_to_django_as_it_is():
    source = Source(count=3)
    response = streaming_response(RequestFactory().get("/"), iter(source), content_type="text/csv")
    assert not response.is_async
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Django warns when it must turn one kind into the other
        assert b"".join(response) == (PIECE * 3).encode()


def test_a_filename_makes_it_an_attachment_and_an_odd_one_is_refused():
    response = streaming_response(RequestFactory().get("/"), iter(()), content_type="text/csv", filename="job-7.csv")
    assert response["Content-Disposition"] == 'attachment; filename="job-7.csv"'
    for odd in ('a".csv', "a\r\nX-Evil: 1", "röntgen.csv"):
        with pytest.raises(ValueError):
            streaming_response(RequestFactory().get("/"), iter(()), content_type="text/csv", filename=odd)


# --- through Django's real ASGI handler -----------------------------------------------------


SOURCES: dict[str, Source] = {}


def export_view(request):
    return streaming_response(request, iter(SOURCES["export"]), content_type="text/csv", filename="export.csv")


urlpatterns = [path("export.csv", export_view)]


def serve(*, disconnect_after_chunks: int | None) -> list[dict]:
    """One GET of /export.csv through Django's ASGIHandler; the client leaves after the given
    number of body messages (or reads to the end)."""
    sent: list[dict] = []
    enough = asyncio.Event()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_after_chunks is None:
            await asyncio.Event().wait()  # the client stays: the handler cancels this when done
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        bodies = sum(m["type"] == "http.response.body" for m in sent)
        if disconnect_after_chunks is not None and bodies >= disconnect_after_chunks:
            enough.set()
            await asyncio.sleep(0.05)  # a slow socket: the disconnect arrives while this waits

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/export.csv",
        "raw_path": b"/export.csv",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    with override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[], ALLOWED_HOSTS=["testserver"]):
        async_to_sync(ASGIHandler())(scope, receive, send)
    return sent


def test_through_djangos_asgi_handler_the_body_goes_out_in_many_messages_and_the_generator_is_closed():
    source = SOURCES["export"] = Source(count=20_000)  # 20 MB
    sent = serve(disconnect_after_chunks=None)
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"Content-Disposition"].startswith(b"attachment")
    assert b"".join(bodies) == (PIECE * 20_000).encode() and len(bodies) > 100
    assert source.closed_on in source.threads


def test_a_client_that_leaves_mid_stream_stops_the_generator_and_it_is_closed_on_its_own_thread():
    source = SOURCES["export"] = Source(count=20_000)
    serve(disconnect_after_chunks=3)
    assert source.taken < 20_000 // 10  # it stopped reading soon after the client left
    assert source.closed_on is not None and source.closed_on in source.threads


# --- multipart ------------------------------------------------------------------------------


def parsed(response) -> email.message.EmailMessage:
    body = b"".join(read_all(response))
    head = f"Content-Type: {response['Content-Type']}\r\n\r\n".encode()
    return email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)


def test_a_multipart_body_carries_each_part_with_its_type_headers_and_exact_bytes():
    dicom = bytes(range(256)) * 300 + b"\r\n--not-the-boundary\r\n"
    blocks = (bytes([n]) * 50_000 for n in range(3))  # a file read in blocks, only when sent
    parts = [
        Part("application/dicom", dicom, {"Content-Location": "/studies/1.2/series/3/instances/4"}),
        Part("application/octet-stream", blocks),
    ]
    response = multipart_response(AsyncRequestFactory().get("/"), parts, parameters={"type": "application/dicom"})
    assert response["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=sightline-')
    message = parsed(response)
    assert message.is_multipart()
    first, second = message.iter_parts()
    assert first.get_content_type() == "application/dicom" and first.get_payload(decode=True) == dicom
    assert first["Content-Location"] == "/studies/1.2/series/3/instances/4"
    assert second.get_payload(decode=True) == b"".join(bytes([n]) * 50_000 for n in range(3))


def test_each_multipart_response_has_a_boundary_of_its_own():
    boundaries = {
        multipart_response(RequestFactory().get("/"), [])["Content-Type"].rpartition("boundary=")[2] for _ in range(5)
    }
    assert len(boundaries) == 5


def test_a_part_header_or_parameter_that_would_break_the_framing_is_refused():
    request = AsyncRequestFactory().get("/")
    with pytest.raises(ValueError):
        b"".join(read_all(multipart_response(request, [Part("text/plain\r\nX-Evil: 1", b"")])))
    with pytest.raises(ValueError):
        b"".join(read_all(multipart_response(request, [Part("text/plain", b"", {"X-A": "1\r\n\r\nbody"})])))
    with pytest.raises(ValueError):
        multipart_response(request, [], parameters={"type": 'a"; boundary=b'})
