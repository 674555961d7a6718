"""The web process's CPU per image upload: a measurement, not a test.

    .venv/bin/python bench/upload_cost.py [-n 200] [--size 224] [--profile out.prof]

Starts a real uvicorn (the command `config.webserver` names, DEBUG off, SQLite in a temporary
folder, a private redis-server), signs in for a JWT, posts N JPEG uploads of size² one after
another through POST /api/v1/images/, and reads the uvicorn process's user + system CPU time
from /proc before and after: core-ms per upload, with the client's own CPU outside it. No worker
runs, so the reads stay queued: the figure is the web's share alone (validated, stored, recorded,
audited, enqueued). ``--profile FILE`` instead posts the same uploads in this process through
Django's test client (the same middleware, authentication and view, without uvicorn and ASGI:
cProfile sees only the thread it runs in, and uvicorn runs views in other threads), reports
this process's CPU per upload and prints the top costs.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
TENANT = "cost-hospital"
WARM_UP = 10  # first uploads load code paths and open connections: not counted


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing answered on :{port}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its reaped children, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def jpeg(size: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    from workers.engine import synthetic

    buffer = io.BytesIO()
    pixels = synthetic.render(np.random.default_rng(seed), size, seed % 2 == 1)
    Image.fromarray(pixels).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help=f"uploads measured (after {WARM_UP} warm-up ones)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--profile", default="", help="in process, under cProfile: write it here, print the top")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="upload-cost-"))
    redis_port, web_port = free_port(), free_port()
    password = secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
        "DATABASE_URL": f"sqlite:///{workdir / 'cost.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_VAR_DIR": str(workdir),
        "SIGHTLINE_S3_BUCKET": "",
        "JWT_ACCESS_MINUTES": "240",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    processes: list[subprocess.Popen] = []
    try:
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
        )
        processes.append(redis)
        wait_for_port(redis_port, redis)

        import django

        django.setup()
        from django.core.management import call_command

        from accounts.models import Role
        from accounts.services import membership_grant, tenant_create, user_get_or_create
        from workers.registration import model_version_register

        call_command("migrate", verbosity=0, interactive=False)
        tenant = tenant_create(name="Cost Hospital", slug=TENANT)
        user = user_get_or_create(username="cost", password=password)
        membership_grant(tenant=tenant, user=user, role=Role.CLINICIAN)
        package = ROOT / "var" / "test-cache" / "sightline-demo-1.0.0.zip"
        model_version_register(package_path=package)

        pool = [jpeg(args.size, seed) for seed in range(16)]
        if args.profile:
            profile_in_process(args, password, pool)
            return
        from config.webserver import web_server_argv

        with open(workdir / "web.log", "w") as log:
            web = subprocess.Popen(
                web_server_argv(bin_dir=BIN, port=web_port), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        processes.append(web)
        wait_for_port(web_port, web)

        import requests

        base = f"http://127.0.0.1:{web_port}"
        token = requests.post(
            f"{base}/api/v1/auth/token/", json={"username": "cost", "password": password}, timeout=60
        ).json()["access"]
        session = requests.Session()
        session.headers.update({"Authorization": f"Bearer {token}", "X-Tenant": TENANT})

        def post(i: int) -> None:
            answer = session.post(f"{base}/api/v1/images/", files={"file": ("x.jpg", pool[i % 16])}, timeout=60)
            if answer.status_code not in (201, 202):
                raise SystemExit(f"upload answered {answer.status_code}: {answer.text[:300]}")

        for i in range(WARM_UP):
            post(i)
        before, started = cpu_seconds(web.pid), time.perf_counter()
        for i in range(args.n):
            post(i)
        after, wall = cpu_seconds(web.pid), time.perf_counter() - started
        print(
            f"{args.n} uploads of a {args.size}² JPEG ({len(pool[0]):,} bytes) through uvicorn, one at a time: "
            f"web process {1000 * (after - before) / args.n:.1f} core-ms per upload, "
            f"{1000 * wall / args.n:.1f} ms wall per upload"
        )
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def profile_in_process(args, password: str, pool: list[bytes]) -> None:
    import cProfile

    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client
    from rest_framework_simplejwt.tokens import RefreshToken

    token = str(RefreshToken.for_user(get_user_model().objects.get(username="cost")).access_token)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT=TENANT, HTTP_HOST="127.0.0.1")

    def post(i: int) -> None:
        upload = SimpleUploadedFile("x.jpg", pool[i % 16], content_type="application/octet-stream")
        answer = client.post("/api/v1/images/", {"file": upload})
        if answer.status_code not in (201, 202):
            raise SystemExit(f"upload answered {answer.status_code}: {answer.content[:300]!r}")

    for i in range(WARM_UP):
        post(i)
    profiler = cProfile.Profile()
    before = time.process_time()
    profiler.enable()
    for i in range(args.n):
        post(i)
    profiler.disable()
    spent = time.process_time() - before
    print(
        f"{args.n} uploads of a {args.size}² JPEG in process (Django test client, under cProfile): "
        f"{1000 * spent / args.n:.1f} CPU-ms per upload, profiler included"
    )
    profiler.dump_stats(args.profile)
    stats = pstats.Stats(args.profile)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
