"""The real ASGI application (config/asgi.py) in this process: a WebSocket handshake whose
session lookup meets the database gone (every query fails, through the connection's own
``execute_wrapper`` hook) is refused with the platform's 503 and Retry-After, not a bare 500."""

import json

import pytest
from django.db import OperationalError, connection

from core.errors import UNAVAILABLE_RETRY_AFTER_SECONDS

LEAKED = "could not connect to server: host=db-primary.internal password=hunter2"


def _database_down(execute, sql, params, many, context):
    raise OperationalError(LEAKED)


@pytest.mark.django_db(transaction=True)
def test_a_websocket_handshake_during_a_database_outage_gets_503_and_retry_after(settings):
    from asgiref.sync import async_to_sync
    from asgiref.testing import ApplicationCommunicator

    from config.asgi import application

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    scope = {
        "type": "websocket",
        "path": "/ws/events/",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"origin", b"http://testserver"),
            (b"cookie", f"{settings.SESSION_COOKIE_NAME}=abcdefghijklmnopqrstuvwxyz012345".encode()),
        ],
        "extensions": {"websocket.http.response": {}},
    }

    async def handshake():
        socket = ApplicationCommunicator(application, scope)
        await socket.send_input({"type": "websocket.connect"})
        start = await socket.receive_output(5)
        body = await socket.receive_output(5)
        await socket.wait(5)
        return start, body

    # async_to_sync from this thread: the session lookup (database_sync_to_async) runs back here,
    # on this thread's connection and its wrapper
    with connection.execute_wrapper(_database_down):
        start, body = async_to_sync(handshake)()
    assert start["type"] == "websocket.http.response.start" and start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == str(UNAVAILABLE_RETRY_AFTER_SECONDS).encode()
    assert json.loads(body["body"])["error"]["code"] == "unavailable"
    assert b"hunter2" not in body["body"]
