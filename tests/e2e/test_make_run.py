"""`make run` as a person runs it: the demo comes up (web, the two lane workers, beat and a Redis of its own),
the page is served, a worker serves the production model, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.conftest import PACKAGE_CACHE
from tests.e2e.conftest import free_port
from tests.screening_fixtures import cached_screening_package

# `make run` always starts on its own SQLite: CI runs this in one pass
pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]


def descendants(pid: int) -> set[int]:
    found, stack = set(), [pid]
    while stack:
        parent = stack.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as handle:
                children = {int(child) for child in handle.read().split()}
        except OSError:
            continue
        found |= children
        stack.extend(children)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return ""
    return " ".join([Path(argv[0].decode()).name, *(part.decode() for part in argv[1:] if part)])


LANES = ("interactive", "bulk")


def niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[16])


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_make_run_serves_the_demo_and_ctrl_c_stops_everything(demo_package, tmp_path):
    var = tmp_path / "var"
    (var / "models").mkdir(parents=True)
    shutil.copy(PACKAGE_CACHE, var / "models" / PACKAGE_CACHE.name)  # the demo model, trained once per machine
    screen = cached_screening_package()  # and the browser's screening model
    shutil.copy(screen, var / "models" / screen.name)
    web_port, redis_port, dicom_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "SIGHTLINE_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'sightline.sqlite3'}",  # its own database, whatever CI points at
        "PYTHONUNBUFFERED": "1",
        "SIGHTLINE_DICOM_PORT": str(dicom_port),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    log = tmp_path / "make-run.log"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"PORT={web_port}", f"REDIS_URL=redis://127.0.0.1:{redis_port}/0"],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's foreground group: Ctrl-C signals all of it
    )
    started: set[int] = set()
    try:
        base = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 240
        ready = None
        while time.monotonic() < deadline and make.poll() is None:
            started |= descendants(make.pid)
            try:
                ready = requests.get(f"{base}/health/workers/", timeout=5)  # and a worker serves the model
                if ready.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        output = log.read_text(errors="replace")
        assert ready is not None and ready.status_code == 200, output[-3000:]
        assert listening(redis_port), "make run did not start a Redis of its own"
        login = requests.get(f"{base}/accounts/login/", timeout=10)
        assert login.status_code == 200 and "Sightline" in login.text
        for line in (f"http://127.0.0.1:{web_port}/", "clinician, viewer, hospital-admin, auditor", "clinician-b"):
            assert line in output
        assert f"Password for all: {settings.SIGHTLINE_DEMO_PASSWORD}" in output
        started |= descendants(make.pid)
        running = {pid: command_line(pid) for pid in started if alive(pid)}
        commands = " ".join(running.values())
        for process in (
            "redis-server",
            "uvicorn",
            "celery --quiet -A workers.celery worker",
            "celery --quiet -A workers.celery beat",
            "manage.py dicom_scp",
        ):
            assert process in commands, (process, commands)
        assert "Processes: redis web worker-interactive worker-bulk beat dicom" in output
        until = time.monotonic() + 30
        while not listening(dicom_port) and time.monotonic() < until:
            time.sleep(0.5)
        assert listening(dicom_port), "make run did not start the DICOM SCP"
        # the two lanes: the bulk worker's processes at a lower CPU priority than the interactive one's
        workers = {
            pid: line
            for pid, line in running.items()
            if "celery --quiet -A workers.celery worker" in line and line.split()[0] not in ("sh", "nice", "env")
        }  # the celery processes, not the shell honcho starts them with
        lanes = {lane: {niceness(pid) for pid, line in workers.items() if f"-n {lane}@" in line} for lane in LANES}
        assert lanes == {"interactive": {niceness(make.pid)}, "bulk": {min(19, niceness(make.pid) + 10)}}, workers

        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C
        make.wait(timeout=60)
        time.sleep(1)
        left = sorted(pid for pid in started | {make.pid} if alive(pid))
        assert not left, f"still running after Ctrl-C: {left}\n{log.read_text(errors='replace')[-2000:]}"
        assert not listening(web_port) and not listening(redis_port) and not listening(dicom_port)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
