"""accounts.events defines every push message; the events consumer forwards each through one
method, with exactly the fields the message carries."""

from __future__ import annotations

import pytest

from accounts import events
from recognition.consumers import CLOSE_UNAUTHENTICATED, EventsConsumer


def test_a_message_carries_exactly_its_fields():
    assert events.pushed("job.progress", job=7) == {"type": "job.progress", "job": 7}
    with pytest.raises(TypeError):
        events.pushed("job.progress")  # a field missing
    with pytest.raises(TypeError):
        events.pushed("study.updated", study=1, tenant=2)  # a field the browser is not to see
    with pytest.raises(KeyError):
        events.pushed("result.readyy", image=1)


def test_the_builders_send_the_messages_as_before(monkeypatch):
    sent: list[list[tuple[str, dict]]] = []
    monkeypatch.setattr(events, "send_many_on_commit", sent.append)
    monkeypatch.setattr(events, "send_on_commit", lambda group, message: sent.append([(group, message)]))
    events.results_ready_on_commit([events.ResultNotice(3, 11, "done", "opacity", 0.9)])
    events.heatmap_ready_on_commit(tenant_id=3, image_id=11, result_id=5, status="unavailable")
    events.studies_updated_on_commit(iter([(3, 21), (4, 22)]))
    events.jobs_progress_on_commit(iter([(3, 31)]))
    assert sent == [
        [
            (
                "tenant-3",
                {"type": "result.ready", "image": 11, "status": "done", "top_label": "opacity", "probability": 0.9},
            )
        ],
        [("tenant-3", {"type": "heatmap.ready", "image": 11, "result": 5, "status": "unavailable"})],
        [("tenant-3", {"type": "study.updated", "study": 21}), ("tenant-4", {"type": "study.updated", "study": 22})],
        [("tenant-3", {"type": "job.progress", "job": 31})],
    ]


class Socket:
    """The consumer's own state, without a channel layer: what it would send, whether it closed."""

    def __init__(self, signed_in: bool):
        self.signed_in, self.sent, self.closed = signed_in, [], None

    def _still_signed_in(self):
        return self.signed_in

    def send_json(self, content):
        self.sent.append(content)

    def close(self, code=None):
        self.closed = code


@pytest.mark.parametrize("kind", sorted(events.PUSHED))
def test_the_consumer_forwards_each_message_with_its_fields_only(kind):
    handler = getattr(EventsConsumer, kind.replace(".", "_"))
    assert handler is EventsConsumer.forward
    fields = {name: f"{name}-value" for name in events.PUSHED[kind]}
    socket = Socket(signed_in=True)
    handler(socket, {"type": kind, **fields, "internal": "not for the browser"})
    assert socket.sent == [{"type": kind, **fields}]
    signed_out = Socket(signed_in=False)
    handler(signed_out, {"type": kind, **fields})
    assert (signed_out.sent, signed_out.closed) == ([], CLOSE_UNAUTHENTICATED)


def forwarding_socket(*, scope: dict, feeds: dict, checked_ago: float = 0.0):
    """An EventsConsumer as connect() leaves it, its server send captured."""
    import time

    consumer = EventsConsumer()
    consumer.scope = scope
    consumer.feeds = feeds
    consumer.session_checked = time.monotonic() - checked_ago
    sent: list[dict] = []

    async def send_here(message):
        sent.append(message)

    consumer._send_here = send_here
    return consumer, sent


def test_a_push_is_forwarded_on_the_servers_loop_when_no_check_needs_the_database(monkeypatch):
    import asyncio
    import json
    import time

    from channels.consumer import SyncConsumer

    from recognition.consumers import SESSION_RECHECK_SECONDS

    threaded: list[str] = []

    async def in_a_thread(self, message):  # the sync consumer's path: one thread hop per message
        threaded.append(message["type"])

    monkeypatch.setattr(SyncConsumer, "dispatch", in_a_thread)
    message = {"type": "result.ready", "image": 7, "status": "done", "top_label": "x", "probability": 0.5, "z": 1}

    token_socket, sent = forwarding_socket(scope={"token_expires": time.time() + 60}, feeds={1: "tenant-1"})
    asyncio.run(token_socket.dispatch(message))
    assert [json.loads(m["text"]) for m in sent] == [
        {"type": "result.ready", "image": 7, "status": "done", "top_label": "x", "probability": 0.5}
    ]
    assert sent[0]["type"] == "websocket.send" and threaded == []

    # each of these needs the thread: an expired token closes, a session is due its re-read, a
    # socket with no feed yet, and a message that is not a push
    for scope, feeds, checked_ago, kind in (
        ({"token_expires": time.time() - 1}, {1: "tenant-1"}, 0, "result.ready"),
        ({"session": object()}, {1: "tenant-1"}, SESSION_RECHECK_SECONDS + 1, "result.ready"),
        ({}, {}, 0, "result.ready"),
        ({}, {1: "tenant-1"}, 0, "access.revoked"),
    ):
        socket, sent = forwarding_socket(scope=scope, feeds=feeds, checked_ago=checked_ago)
        asyncio.run(socket.dispatch({**message, "type": kind}))
        assert sent == []
    assert threaded == ["result.ready", "result.ready", "result.ready", "access.revoked"]
    socket, sent = forwarding_socket(scope={"session": object()}, feeds={1: "tenant-1"}, checked_ago=1)
    asyncio.run(socket.dispatch(message))  # a session socket re-read recently: on the loop
    assert len(sent) == 1 and len(threaded) == 4
