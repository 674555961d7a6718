"""Two lanes, the broker side: the Procfile's two workers against a private Redis. The bulk
worker never takes interactive work; the interactive worker takes interactive messages before
bulk ones, whatever order they came in, and bulk ones once it has been idle; the bulk
worker runs at a lower CPU priority with fewer threads. Events are ordered by the broker (a
worker held on a gate the test opens), never by how long anything takes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.conf import settings

from tests.e2e import lane_probe
from tests.e2e.conftest import (
    STARTUP_SECONDS,
    VENV_BIN,
    Processes,
    database_url,
    free_port,
    redis_server_binary,
    wait_for_line,
    wait_for_port,
)
from workers.celery import worker_torch_threads

# the broker's order between lanes (probe tasks, no database): CI runs this in one pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]
IDLE_SECONDS = 3  # the interactive lane takes bulk work after this long without an interactive message


def procfile() -> dict[str, str]:
    lines = (Path(settings.BASE_DIR) / "platform" / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture
def lanes(transactional_db, tmp_path):
    """Redis on a port of its own, and worker-interactive and worker-bulk as the Procfile runs them."""
    processes = Processes(tmp_path)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": url,
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "PYTHONUNBUFFERED": "1",
        "SIGHTLINE_INTERACTIVE_IDLE_SECONDS": str(IDLE_SECONDS),
    }
    env.pop("SIGHTLINE_WORKER_LANE", None)
    env.pop("SIGHTLINE_TORCH_THREADS", None)
    commands = procfile()
    try:
        server, log = processes.start(
            "redis", [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""], env
        )
        wait_for_port(port, server, log)
        workers = {}
        for name in ("worker-interactive", "worker-bulk"):
            command = f"{commands[name]} --without-mingle --include {lane_probe.__name__}"
            workers[name] = processes.start(name, ["sh", "-c", command], env)
        for process, log in workers.values():
            wait_for_line(" ready.", process, log)
        yield redis.Redis.from_url(url), Celery("lanes-test", broker=url), tmp_path
    finally:
        processes.stop_all()


def entries(client, key: str, count: int, logs: Path) -> list[dict]:
    """The first ``count`` entries of a probe list, once there are that many."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        found = [json.loads(item) for item in client.lrange(key, 0, -1)]
        if len(found) >= count:
            return found[:count]
        time.sleep(0.1)
    worker_logs = "\n".join(log.read_text(errors="replace")[-1500:] for log in sorted(logs.glob("worker-*.log")))
    raise AssertionError(f"{key} has {client.llen(key)} of {count} entries\n{worker_logs}")


def test_each_lane_takes_its_own_work_interactive_first_and_bulk_when_idle(lanes):
    client, app, logs = lanes

    def send(token: str, queue: str, gate: str = "") -> None:
        app.send_task("tests.lane_probe.record", args=[token, gate], queue=queue)

    send("hold-interactive", "interactive", gate="gate:interactive")
    (held,) = entries(client, lane_probe.STARTED, 1, logs)
    assert held["lane"] == "interactive"

    # the interactive worker is busy: the bulk one takes a bulk message and leaves an interactive one
    send("waiting-interactive", "interactive")
    send("bulk-marker", "bulk")
    (marker,) = entries(client, lane_probe.RAN, 1, logs)
    assert (marker["token"], marker["lane"]) == ("bulk-marker", "bulk")
    assert client.llen("interactive") == 1  # the bulk worker polled after it was sent, and left it

    send("hold-bulk", "bulk", gate="gate:bulk")
    held_bulk = entries(client, lane_probe.STARTED, 2, logs)[1]
    assert held_bulk["lane"] == "bulk"

    # bulk messages first, interactive ones after: the interactive worker, freed, takes the
    # interactive ones first, then the bulk ones, since the bulk worker is busy
    send("bulk-1", "bulk")
    send("bulk-2", "bulk")
    send("interactive-1", "interactive")
    send("interactive-2", "interactive")
    client.rpush("gate:interactive", "open")
    ran = entries(client, lane_probe.RAN, 7, logs)[1:]
    assert [entry["token"] for entry in ran] == [
        "hold-interactive",
        "waiting-interactive",
        "interactive-1",
        "interactive-2",
        "bulk-1",
        "bulk-2",
    ]
    assert {entry["lane"] for entry in ran} == {"interactive"}
    # ...but only once it has been idle: the bulk one starts no sooner than IDLE_SECONDS after the
    # interactive lane received its last interactive message (just before that one began); a
    # lower bound only, so a slow machine cannot fail it (workers/bootsteps.py BulkWhenIdle)
    last_interactive, first_bulk = ran[3], ran[4]
    assert first_bulk["began"] - last_interactive["began"] >= IDLE_SECONDS - 0.5, (last_interactive, first_bulk)

    client.rpush("gate:bulk", "open")
    assert entries(client, lane_probe.RAN, 8, logs)[-1]["token"] == "hold-bulk"

    # the bulk lane yields the CPU by its priority, nice 10 above this test's own; both lanes
    # have a thread per core
    cores = len(os.sched_getaffinity(0))
    assert held["nice"] == os.nice(0) and held["threads"] == worker_torch_threads() == cores
    assert held_bulk["nice"] == min(19, os.nice(0) + 10)
    assert held_bulk["threads"] == cores
