"""The ASGI body cap: a declared or an actual body over the limit gets the 413, and the
application behind it is told the client left (so it stores nothing)."""

import asyncio
import json

from core.body_limit import BodySizeLimit


class Reader:
    """An application that reads the body the way Django's ASGIHandler does (and the headers
    after it, as Django builds the request from the scope once the body is read)."""

    def __init__(self):
        self.called = False
        self.body = b""
        self.aborted = False
        self.headers = None

    async def __call__(self, scope, receive, send):
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.aborted = True
                return
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.headers = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, chunks, headers=()):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs():
    inner = Reader()
    sent = call(BodySizeLimit(inner, limit=100), [b"x" * 10], headers=[(b"content-length", b"101")])
    assert not inner.called
    assert sent[0]["status"] == 413
    assert (b"cache-control", b"no-store") in sent[0]["headers"]  # like every other answer
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_large"


def test_a_chunked_body_that_grows_past_the_limit_is_abandoned_and_refused():
    inner = Reader()
    sent = call(BodySizeLimit(inner, limit=100), [b"x" * 60, b"x" * 60, b"x" * 60])
    assert inner.aborted and inner.body == b"x" * 60  # the app never saw the chunk that crossed it
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413


def test_a_body_within_the_limit_passes_unchanged():
    inner = Reader()
    sent = call(BodySizeLimit(inner, limit=100), [b"x" * 50, b"y" * 50], headers=[(b"content-length", b"100")])
    assert inner.body == b"x" * 50 + b"y" * 50 and not inner.aborted
    assert sent[0]["status"] == 200


def test_websockets_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(BodySizeLimit(app, limit=1)({"type": "websocket"}, None, None))
    assert seen == ["websocket"]


def test_a_chunked_body_within_the_limit_is_given_its_length():
    """Django's and DRF's parsers read no body without a Content-Length; uvicorn passes a
    chunked one with none."""
    inner = Reader()
    sent = call(BodySizeLimit(inner, limit=100), [b"x" * 30, b"y" * 30, b""])
    assert inner.body == b"x" * 30 + b"y" * 30 and sent[0]["status"] == 200
    assert inner.headers[b"content-length"] == b"60"


def test_a_declared_length_and_an_empty_body_are_left_as_they_came():
    inner = Reader()
    call(BodySizeLimit(inner, limit=100), [b"x" * 50], headers=[(b"content-length", b"50")])
    assert list(inner.headers.items()) == [(b"content-length", b"50")]
    inner = Reader()
    call(BodySizeLimit(inner, limit=100), [b""])
    assert inner.headers == {}
