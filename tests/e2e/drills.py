"""The real stack as separate processes, with its parts stopped and started at will, for the
fault drills: ``RedisDrill`` (tests/e2e/test_redis_outage_live.py; a later deployment drill
reuses it) and a WebSocket client that reconnects the way the pages' feed.js does."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from django.conf import settings
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from config.webserver import web_server_argv
from tests.e2e.conftest import (
    VENV_BIN,
    Processes,
    database_url,
    free_port,
    redis_server_binary,
    wait_for_line,
    wait_for_port,
    worker_argv,
)

RECONCILE_SECONDS = 2  # beat's reconciliation here; production runs it every minute


class RedisDrill:
    """Redis, a worker, beat and the web process, with Redis stopped and started at will."""

    def __init__(self, logs: Path):
        self.processes = Processes(logs)
        self.logs = logs
        self.redis_port, self.web_port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.web_port}"
        self.ws_url = f"ws://127.0.0.1:{self.web_port}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": database_url(),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
            "SIGHTLINE_MAX_WAIT_MS": "10",
            "SIGHTLINE_RECONCILE_SECONDS": str(RECONCILE_SECONDS),
            "PYTHONUNBUFFERED": "1",
        }
        self.redis = None

    def start(self, *, beat: bool = True) -> None:
        self.redis_start()
        worker, worker_log = self.processes.start("worker", worker_argv("drill"), self.env)
        if beat:
            self.beat_start()
        web, web_log = self.processes.start("web", web_server_argv(bin_dir=VENV_BIN, port=self.web_port), self.env)
        wait_for_port(self.web_port, web, web_log)
        wait_for_line(" ready.", worker, worker_log)

    def beat_start(self) -> None:
        """Beat, whose reconciliation sends what waits in the database every RECONCILE_SECONDS."""
        celery = str(worker_argv("x")[0])
        beat = [celery, "-A", "workers.celery", "beat", "-l", "info", "-s", str(self.logs / "beat-schedule")]
        self.processes.start("beat", beat, self.env)

    def redis_start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        self.redis, log = self.processes.start("redis", [*argv, "--save", "", "--appendonly", "no"], self.env)
        wait_for_port(self.redis_port, self.redis, log)

    def redis_stop(self) -> None:
        """Really stopped: killed, its port closed (nothing kept: it saves nothing to disk)."""
        self.redis.send_signal(signal.SIGKILL)
        self.redis.wait()
        self.processes.running.remove(self.redis)

    def stop(self) -> None:
        self.processes.stop_all()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@contextmanager
def subscribed_socket(drill: RedisDrill, access: str, tenant: str, *, timeout: float = 60):
    """A socket subscribed to ``tenant``, connecting again with feed.js's backoff (0.5 s, doubling)
    until the web process accepts and subscribes it."""
    deadline, delay = time.monotonic() + timeout, 0.5
    while True:
        with ExitStack() as opened:
            try:
                socket = opened.enter_context(connect(f"{drill.ws_url}/ws/events/?token={access}", open_timeout=10))
                assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
                socket.send(json.dumps({"type": "subscribe", "tenant": tenant}))
                assert json.loads(socket.recv(timeout=10)) == {"type": "subscribed", "tenant": tenant}
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
                if time.monotonic() > deadline:
                    raise
            else:
                yield socket
                return
        time.sleep(delay)
        delay = min(delay * 2, 15)
