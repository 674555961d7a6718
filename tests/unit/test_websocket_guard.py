"""The WebSocket guard (core/errors.py, outermost on the socket route in config/asgi.py): a
handshake that meets the database or the broker gone for a moment is refused with the platform's
503 and Retry-After (or close 1013 where the server cannot send an HTTP answer), never the ASGI
server's bare 500; anything else, and anything after the handshake, is not its business.

The inner application is a stand-in that raises; the send is recorded."""

import asyncio
import json

import pytest
from django.db import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from core.errors import UNAVAILABLE_RETRY_AFTER_SECONDS, websocket_unavailable_guard

LEAKED = "could not connect to server: host=db-primary.internal password=hunter2"
WITH_HTTP_RESPONSE = {"websocket.http.response": {}}


def _failing(error, *, accept_first=False):
    async def inner(scope, receive, send):
        if accept_first:
            await send({"type": "websocket.accept"})
        raise error

    return inner


def _handshake(app, *, extensions=None):
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws/events/", "headers": []}
    if extensions is not None:
        scope["extensions"] = extensions
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("error", [OperationalError(LEAKED), RedisConnectionError(LEAKED)], ids=["db", "broker"])
def test_a_transient_error_in_the_handshake_is_a_503_with_retry_after(error):
    sent = _handshake(websocket_unavailable_guard(_failing(error)), extensions=WITH_HTTP_RESPONSE)
    start, body = sent
    assert start["type"] == "websocket.http.response.start" and start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == str(UNAVAILABLE_RETRY_AFTER_SECONDS).encode()
    assert headers[b"content-type"] == b"application/json"
    assert body["type"] == "websocket.http.response.body"
    assert json.loads(body["body"])["error"]["code"] == "unavailable"
    assert b"hunter2" not in body["body"] and b"db-primary" not in body["body"]


def test_without_the_http_response_extension_the_handshake_closes_with_try_again_later():
    for extensions in (None, {}):
        sent = _handshake(websocket_unavailable_guard(_failing(OperationalError(LEAKED))), extensions=extensions)
        assert sent == [{"type": "websocket.close", "code": 1013}]


def test_a_bug_in_the_handshake_is_not_hidden():
    guarded = websocket_unavailable_guard(_failing(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        _handshake(guarded, extensions=WITH_HTTP_RESPONSE)


def test_after_the_handshake_the_error_is_the_consumers_to_handle():
    guarded = websocket_unavailable_guard(_failing(OperationalError(LEAKED), accept_first=True))
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws/events/", "headers": [], "extensions": WITH_HTTP_RESPONSE}
    with pytest.raises(OperationalError):
        asyncio.run(guarded(scope, receive, send))
    assert sent == [{"type": "websocket.accept"}]  # no 503 after an accept


def test_a_handshake_that_succeeds_passes_through_untouched():
    async def inner(scope, receive, send):
        await send({"type": "websocket.accept"})

    assert _handshake(websocket_unavailable_guard(inner), extensions=WITH_HTTP_RESPONSE) == [
        {"type": "websocket.accept"}
    ]


def test_an_error_after_the_inner_app_began_its_own_http_denial_sends_no_second_answer():
    async def denies_then_fails(scope, receive, send):
        await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
        raise OperationalError(LEAKED)

    with pytest.raises(OperationalError):
        _handshake(websocket_unavailable_guard(denies_then_fails), extensions=WITH_HTTP_RESPONSE)
