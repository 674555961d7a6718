"""A worker process sends its pushes from one kept event loop (accounts.events.use_background_loop):
they reach the group on the real Redis channel layer, over one connection, and a forked child
does not use its parent's loop; a send hands its trip over without waiting for it, the trips go
out in order, and a slow or absent Redis neither blocks the sender for long nor loses order."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

from accounts import events


@pytest.fixture
def kept_loop(monkeypatch):
    monkeypatch.setattr(events, "_loop", None)
    monkeypatch.setattr(events, "_loop_pid", 0)
    events.use_background_loop()
    loop = events._loop
    yield loop
    loop.call_soon_threadsafe(loop.stop)


def connections_made() -> int:
    return redis.Redis.from_url(settings.REDIS_URL).info("stats")["total_connections_received"]


def receive_after(group: str, send) -> tuple[list[dict], int]:
    """Join ``group`` on this test's own loop, ``send()`` from a plain thread, collect what came;
    and how many connections Redis accepted while ``send()`` ran."""
    layer = get_channel_layer()

    async def run() -> tuple[list[dict], int]:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        try:
            before = connections_made()
            await asyncio.get_running_loop().run_in_executor(None, send)
            opened = connections_made() - before - 1  # less the one connections_made() opens itself
            got = [await asyncio.wait_for(layer.receive(channel), 10)]
            while True:
                try:
                    got.append(await asyncio.wait_for(layer.receive(channel), 0.5))
                except TimeoutError:
                    return got, opened
        finally:
            await layer.group_discard(group, channel)

    return async_to_sync(run)()


def test_sends_from_the_kept_loop_reach_the_group_over_one_connection(kept_loop):
    assert "RedisChannelLayer" in settings.CHANNEL_LAYERS["default"]["BACKEND"]
    group = events.tenant_group(987_001)
    first, _ = receive_after(group, lambda: events.send(group, {"type": "result.ready", "image": 1}))
    assert [m["image"] for m in first] == [1]
    many = [(group, {"type": "result.ready", "image": i}) for i in range(2, 12)]
    got, opened = receive_after(group, lambda: [events.send_many(many) for _ in range(3)])
    assert sorted(m["image"] for m in got) == sorted([i for i in range(2, 12)] * 3)
    assert opened == 0  # 30 messages in 3 trips over the connection the first send opened


def test_without_the_kept_loop_each_trip_opens_a_connection(monkeypatch):
    """The contrast that makes the test above mean something (the web process's path)."""
    monkeypatch.setattr(events, "_loop", None)
    group = events.tenant_group(987_003)
    many = [(group, {"type": "result.ready", "image": i}) for i in range(3)]
    got, opened = receive_after(group, lambda: [events.send_many(many) for _ in range(3)])
    assert len(got) == 9 and opened >= 3


def test_a_forked_child_does_not_use_its_parents_loop(kept_loop, monkeypatch):
    monkeypatch.setattr(events, "_loop_pid", -1)  # as if this process were a fork of the loop's owner
    sent = []
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", lambda *a: sent.append(a))
    group = events.tenant_group(987_002)
    got, _ = receive_after(group, lambda: events.send(group, {"type": "result.ready", "image": 7}))
    assert [m["image"] for m in got] == [7] and sent == []  # async_to_sync on a loop of its own


class HeldLayer:
    """A channel layer whose trips wait for ``opened`` and take a random moment each: what a slow
    Redis looks like to the sender. Records what went out, in order."""

    def __init__(self):
        self.opened = threading.Event()
        self.out: list[int] = []

    async def group_send(self, group, message):
        while not self.opened.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(random.random() / 100)
        self.out.append(message["image"])


def test_a_send_does_not_wait_for_redis_and_the_trips_go_out_in_order(kept_loop, monkeypatch):
    layer = HeldLayer()
    monkeypatch.setattr(events, "get_channel_layer", lambda: layer)
    started = time.monotonic()
    for image in range(20):
        events.send("tenant-1", {"type": "result.ready", "image": image})
    events.send_many([("tenant-1", {"type": "result.ready", "image": image}) for image in range(20, 25)])
    assert time.monotonic() - started < 1  # handed over, not sent: Redis has not answered yet
    assert layer.out == [] and events.flush(timeout=0.2) is False
    layer.opened.set()
    assert events.flush() is True
    assert layer.out == list(range(25))


def test_when_too_many_wait_a_sender_waits_for_room_then_gives_up_in_words(kept_loop, monkeypatch, caplog):
    layer = HeldLayer()
    monkeypatch.setattr(events, "get_channel_layer", lambda: layer)
    monkeypatch.setattr(events, "_room", threading.BoundedSemaphore(2))
    monkeypatch.setattr(events, "ROOM_WAIT_SECONDS", 0.3)
    for image in range(3):
        events.send("tenant-1", {"type": "result.ready", "image": image})  # the third finds no room
    assert "could not notify tenant-1" in caplog.text
    layer.opened.set()
    assert events.flush(timeout=5) is True
    assert layer.out == [0, 1]
    events.send("tenant-1", {"type": "result.ready", "image": 3})  # room again
    assert events.flush(timeout=5) is True and layer.out == [0, 1, 3]


def test_a_trip_that_hangs_is_given_up_and_the_next_ones_go_out(kept_loop, monkeypatch, caplog):
    layer = HeldLayer()
    monkeypatch.setattr(events, "get_channel_layer", lambda: layer)
    monkeypatch.setattr(events, "SEND_TIMEOUT_SECONDS", 0.3)
    events.send("tenant-1", {"type": "result.ready", "image": 0})  # hangs past its timeout
    time.sleep(0.5)
    layer.opened.set()
    events.send("tenant-1", {"type": "result.ready", "image": 1})
    assert events.flush(timeout=5) is True
    assert layer.out == [1] and "could not notify in time" in caplog.text
