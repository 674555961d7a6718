"""A worker process sends its pushes from one kept event loop (accounts.events.use_background_loop):
they reach the group on the real Redis channel layer, over one connection, and a forked child
does not use its parent's loop."""

from __future__ import annotations

import asyncio

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
