"""Channels groups, on-commit sends and every push message, shared by every app that notifies
browsers.

The messages are defined here and nowhere else: ``PUSHED`` names each one a socket forwards to
its browser and the fields it carries (the consumer, recognition/consumers.py, forwards them all
through one method), and each ``*_on_commit`` below builds one. ``access.revoked`` is the one
message a socket acts on itself (it re-checks its feeds or closes) and never forwards. They carry
ids and small summaries; the database is the truth.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)

# the longest one trip to the channel layer may take on the background loop before it is given
# up (Redis away: the page's re-fetch recovers the notification; the queue behind it moves on)
SEND_TIMEOUT_SECONDS = 10
# trips waiting on the background loop before a sender waits for room (Redis slow or away): a
# worker's batch never waits for its notifications to go out, unless this many are behind
MAX_PENDING_SENDS = 1000
ROOM_WAIT_SECONDS = 10  # the longest a sender waits for that room before it gives its notification up
SESSION_GROUP_DIGITS = 40  # hex digits of a session key's hash naming its sockets' group
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0  # a forked child inherits the loop but not its thread: it makes its own
_in_order: asyncio.Lock | None = None  # the trips on the loop go out one after another, as sent
_room = threading.BoundedSemaphore(MAX_PENDING_SENDS)


def use_background_loop() -> None:
    """For a process with no event loop of its own (a Celery pool process): sends run on one
    long-lived loop in a daemon thread, so the channel layer keeps its Redis connection. Without
    it each send is ``async_to_sync`` on a new loop, which opens and closes a connection (measured
    1.45 core-ms a send against 0.15 on a kept loop). A send hands its trip to the loop and
    returns: the caller (a worker between two forward passes) does not wait for Redis (that wait
    was a tenth of a busy worker's main thread, measured at concurrency 32); the trips go out in
    the order they were sent. ``flush`` waits for them (a worker process shutting down). The web
    process never calls this: its sends go to the server's own loop. Call it after any fork."""
    global _loop, _loop_pid, _in_order, _room
    if _loop is None or _loop.is_closed() or _loop_pid != os.getpid():
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="channel-layer", daemon=True).start()
        _loop, _loop_pid = loop, os.getpid()
        _in_order, _room = asyncio.Lock(), threading.BoundedSemaphore(MAX_PENDING_SENDS)


def _kept_loop() -> asyncio.AbstractEventLoop | None:
    return _loop if _loop is not None and _loop_pid == os.getpid() and not _loop.is_closed() else None


async def _one_after_another(send: Callable[[], Awaitable[None]], room: threading.BoundedSemaphore) -> None:
    try:
        assert _in_order is not None
        async with _in_order:
            await asyncio.wait_for(send(), SEND_TIMEOUT_SECONDS)
    except Exception:  # a lost notification is recovered by the page's re-fetch
        logger.warning("could not notify in time", exc_info=True)
    finally:
        room.release()


def _run(send: Callable[[], Awaitable[None]]) -> None:
    loop = _kept_loop()
    if loop is None:
        async_to_sync(send)()
        return
    room = _room
    if not room.acquire(timeout=ROOM_WAIT_SECONDS):
        raise TimeoutError(f"{MAX_PENDING_SENDS} notifications are still waiting to go out")
    asyncio.run_coroutine_threadsafe(_one_after_another(send, room), loop)


def flush(timeout: float = SEND_TIMEOUT_SECONDS) -> bool:
    """Wait until the trips handed to the background loop so far went out (or were given up);
    False if they had not within ``timeout`` seconds."""
    loop = _kept_loop()
    if loop is None:
        return True

    async def behind_them() -> None:
        assert _in_order is not None
        async with _in_order:
            pass

    try:
        asyncio.run_coroutine_threadsafe(behind_them(), loop).result(timeout=timeout)
    except Exception:
        return False
    return True


# the messages a socket forwards to its browser, each with the fields it carries besides "type"
PUSHED: dict[str, tuple[str, ...]] = {
    "result.ready": ("image", "status", "top_label", "probability"),  # an image's AI read ended
    "heatmap.ready": ("image", "result", "status"),  # a heatmap asked for is made, or cannot be
    "study.updated": ("study",),  # a worklist row changed
    "job.progress": ("job",),  # a bulk job's counts changed
}
ACCESS_REVOKED = "access.revoked"


def pushed(kind: str, **fields) -> dict:
    """One forwarded message, its fields exactly those ``PUSHED`` names for it."""
    if set(fields) != set(PUSHED[kind]):
        raise TypeError(f"{kind} carries {PUSHED[kind]}, not {tuple(fields)}")
    return {"type": kind, **fields}


def tenant_group(tenant_id: int) -> str:
    return f"tenant-{tenant_id}"


def user_group(user_id: int) -> str:
    return f"user-{user_id}"


def session_group(session_key: str) -> str:
    """Sockets opened with one browser session; the key itself never leaves the server."""
    return "session-" + hashlib.sha256(session_key.encode()).hexdigest()[:SESSION_GROUP_DIGITS]


def send(group: str, message: dict) -> None:
    async def send_one():
        await get_channel_layer().group_send(group, message)

    try:
        _run(send_one)
    except Exception:  # a lost notification is recovered by the page's re-fetch
        logger.warning("could not notify %s", group, exc_info=True)


def send_on_commit(group: str, message: dict) -> None:
    transaction.on_commit(lambda: send(group, message), robust=True)


def send_many(messages: list[tuple[str, dict]]) -> None:
    """Several group messages from one trip into the event loop (a batch's results)."""

    async def send_all():
        layer = get_channel_layer()
        for group, message in messages:
            try:
                await layer.group_send(group, message)
            except Exception:  # a lost notification is recovered by the page's re-fetch
                logger.warning("could not notify %s", group, exc_info=True)

    if messages:
        try:
            _run(send_all)
        except Exception:  # no room on the loop (Redis slow or away): the page's re-fetch recovers it
            logger.warning("could not notify %d groups in time", len(messages), exc_info=True)


def send_many_on_commit(messages: list[tuple[str, dict]]) -> None:
    if messages:
        transaction.on_commit(lambda: send_many(messages), robust=True)


def access_revoked_on_commit(*, user_id: int, tenant_id: int | None) -> None:
    """Close the user's sockets for one hospital (``tenant_id``) or for all (None)."""
    send_on_commit(user_group(user_id), {"type": ACCESS_REVOKED, "tenant": tenant_id})


def hospital_access_changed_on_commit(*, tenant_id: int) -> None:
    """Every socket subscribed to the hospital re-checks its access (e.g. the hospital was closed)."""
    send_on_commit(tenant_group(tenant_id), {"type": ACCESS_REVOKED, "tenant": tenant_id})


def session_ended(session_key: str | None) -> None:
    """Close the sockets of a browser session that signed out or expired."""
    if session_key:
        send_on_commit(session_group(session_key), {"type": ACCESS_REVOKED, "tenant": None})


def api_key_group(api_key_id: int) -> str:
    """Sockets opened with one service-account API key."""
    return f"api-key-{api_key_id}"


def api_key_revoked_on_commit(*, api_key_id: int) -> None:
    """Close the sockets a revoked key opened (the account's other keys keep theirs)."""
    send_on_commit(api_key_group(api_key_id), {"type": ACCESS_REVOKED, "tenant": None})


# --- the hospital's feed ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultNotice:
    tenant_id: int
    image_id: int
    status: str
    top_label: str
    probability: float | None


def results_ready_on_commit(notices: list[ResultNotice]) -> None:
    """One ``result.ready`` message per image, all sent from one callback after commit."""
    send_many_on_commit(
        [
            (
                tenant_group(notice.tenant_id),
                pushed(
                    "result.ready",
                    image=notice.image_id,
                    status=notice.status,
                    top_label=notice.top_label,
                    probability=notice.probability,
                ),
            )
            for notice in notices
        ]
    )


def heatmap_ready_on_commit(*, tenant_id: int, image_id: int, result_id: int, status: str = "ready") -> None:
    """``heatmap.ready``: a heatmap asked for is made (``status`` "ready") or cannot be
    (``"unavailable"``); the viewer fetches it again. The hospital's feed only."""
    send_on_commit(tenant_group(tenant_id), pushed("heatmap.ready", image=image_id, result=result_id, status=status))


def studies_updated_on_commit(studies: Iterable[tuple[int, int]]) -> None:
    """``study.updated`` for each (tenant id, study id): the open worklists re-render the row."""
    send_many_on_commit(
        [(tenant_group(tenant_id), pushed("study.updated", study=study_id)) for tenant_id, study_id in studies]
    )


def jobs_progress_on_commit(jobs: Iterable[tuple[int, int]]) -> None:
    """``job.progress`` for each (tenant id, job id): the jobs page fetches the job."""
    send_many_on_commit([(tenant_group(tenant_id), pushed("job.progress", job=job_id)) for tenant_id, job_id in jobs])


# --- protocol reads (protocols/) ---------------------------------------------------------------
# Never forwarded to a browser: the web process that answers a model-server protocol request
# waits on its read's group and then reads the database (the push is a notification only).
PROTOCOL_READ_DONE = "protocol.read_done"


def protocol_read_group(request_id: int) -> str:
    """The one waiter on an inference request that came by a model-server protocol."""
    return f"protocol-read-{request_id}"


def protocol_tensor_group(key: str) -> str:
    """The one waiter on a stateless tensor read (its cache key's random part)."""
    return f"protocol-tensor-{key}"


def protocol_reads_done_on_commit(request_ids: Iterable[int]) -> None:
    """``protocol.read_done`` to each protocol read's waiter, after the outcome is committed."""
    send_many_on_commit([(protocol_read_group(pk), {"type": PROTOCOL_READ_DONE, "request": pk}) for pk in request_ids])
