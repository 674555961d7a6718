"""Throughput and p99 through nginx, two web replicas against one: a measurement, not a test.

    .venv/bin/python bench/nginx.py [--seconds 8] [--quick]

Starts a private Redis, PostgreSQL's own database for the run (SQLite if no PostgreSQL answers on
127.0.0.1:5432), two uvicorn replicas as they run behind the proxy (``--proxy-headers
--forwarded-allow-ips 127.0.0.2``) and two nginx rendered by platform/nginx/render.sh from the
same template: one in front of replica 1 alone, one in front of both. No worker runs: what is
measured is the web tier (TLS at nginx, the proxy hop, JWT authentication, the view, the database
and the access log). Closed-loop clients over HTTPS (HTTP/1.1 keep-alive connections, one per
client) at concurrency 8 and 32 send, for ``--seconds`` each after a short warm-up:

- ``upload``: POST /api/v1/images/ with a 224² JPEG and a JWT (accepted: 201, queued for a read);
- ``get``: GET /api/v1/images/<id>/ (an audited read of one image's record).

The one- and two-replica runs of a cell follow each other, so their ratio comes from one run on
one machine. Prints a table and writes bench/nginx.json. On a 2-core machine the clients, nginx
and both replicas share the two cores: the ratio says how much a second replica buys when the
replicas, not the cores, are the limit, which is less than on hosts of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from bench.run import Processes, free_port, git_commit, pct, start_redis, wait_for_port  # noqa: E402
from bench.upload_cost import jpeg  # noqa: E402

RENDER = ROOT / "platform" / "nginx" / "render.sh"
PROXY_ADDRESS = "127.0.0.2"
TENANT = "nginx-bench-hospital"
USERNAME = "nginx-bench"
CONCURRENCIES = (8, 32)
WARM_UP_SECONDS = 1.5
MAX_REQUEST_BYTES = 64 * 1024 * 1024
OUTPUT = ROOT / "bench" / "nginx.json"


def postgres_url(name: str) -> str | None:
    """A fresh database on the machine's PostgreSQL, or None when none answers."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 dbname=postgres connect_timeout=3", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.execute(f'CREATE DATABASE "{name}"')
            user = admin.execute("SELECT current_user").fetchone()[0]
    except Exception:  # no PostgreSQL here: SQLite
        return None
    return f"postgres://{user}@127.0.0.1:5432/{name}"


def postgres_drop(name: str) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 dbname=postgres connect_timeout=3", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tls_files(folder: Path) -> tuple[Path, Path, Path]:
    import trustme

    folder.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key_pem))
    return ca_pem, cert_pem, key_pem


def nginx_start(processes: Processes, workdir: Path, name: str, upstreams: list[str], tls) -> tuple[int, int]:
    """Render and run one nginx; its port and its master's pid."""
    _, cert, key = tls
    port, prefix = free_port(), workdir / name
    static = workdir / "static"
    static.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SIGHTLINE_NGINX_LISTEN": f"127.0.0.1:{port}",
        "SIGHTLINE_NGINX_UPSTREAMS": " ".join(upstreams),
        "SIGHTLINE_NGINX_CERT": str(cert),
        "SIGHTLINE_NGINX_KEY": str(key),
        "SIGHTLINE_STATIC_ROOT": str(static),
        "SIGHTLINE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "SIGHTLINE_NGINX_PROXY_BIND": PROXY_ADDRESS,
        "SIGHTLINE_NGINX_USER": os.environ.get("USER") or "root",
    }
    subprocess.run(["sh", str(RENDER), str(prefix)], env=env, check=True, stdout=subprocess.DEVNULL)
    argv = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "logs" / "error.log")]
    process = processes.start(name, [*argv, "-g", "daemon off;"], env)
    wait_for_port(port, process, processes.log(name))
    return port, process.pid


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def closed_loop(*, url: str, context: ssl.SSLContext, token: str, op: str, image_id: int,
                      concurrency: int, seconds: float, pool: list[bytes], meter) -> dict:  # fmt: skip
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, verify=context, limits=limits, headers=headers, timeout=60) as client:

        async def one(number: int) -> int:
            if op == "upload":
                files = {"file": ("scan.jpg", pool[number % len(pool)], "image/jpeg")}
                answer = await client.post("/api/v1/images/", files=files)
            else:
                answer = await client.get(f"/api/v1/images/{image_id}/")
            return answer.status_code

        async def client_loop(offset: int, until: float, measured_from: float) -> None:
            number = offset
            while (started := time.perf_counter()) < until:
                status = await one(number)
                number += concurrency
                if started >= measured_from:  # begun after the warm-up
                    latencies.append(1000 * (time.perf_counter() - started))
                    statuses[str(status)] += 1

        async def sample_after_warm_up() -> dict:
            await asyncio.sleep(WARM_UP_SECONDS)
            return meter()

        now = time.perf_counter()
        measured_from, until = now + WARM_UP_SECONDS, now + WARM_UP_SECONDS + seconds
        cpu_from, *_ = await asyncio.gather(
            sample_after_warm_up(), *(client_loop(i, until, measured_from) for i in range(concurrency))
        )
        cpu_to = meter()  # the last requests begun before the end finish after it: a little more
    return {
        "latencies": latencies,
        "statuses": dict(statuses),
        "cpu": {name: cpu_to[name] - cpu_from[name] for name in cpu_from},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell, after a warm-up")
    parser.add_argument("--quick", action="store_true", help="2 s per cell: a smoke run")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds

    workdir = Path(tempfile.mkdtemp(prefix="nginx-bench-"))
    processes = Processes(workdir / "logs")
    database = f"sightline_nginx_bench_{os.getpid()}"
    database_url = postgres_url(database)
    redis_port = free_port()
    password = secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
        "DATABASE_URL": database_url or f"sqlite:///{workdir / 'bench.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_VAR_DIR": str(workdir),
        "SIGHTLINE_S3_BUCKET": "",
        "SIGHTLINE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "SIGHTLINE_INTERACTIVE_QUEUE_MAX": "0",  # no worker drains the queue here: no admission bound
        "JWT_ACCESS_MINUTES": "240",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    load = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shares its cores
    try:
        start_redis(processes, workdir, redis_port, env)
        import django

        django.setup()
        from django.core.management import call_command

        from accounts.models import Role
        from accounts.services import membership_grant, tenant_create, user_get_or_create
        from config.webserver import web_server_argv
        from workers.registration import model_version_register

        call_command("migrate", verbosity=0, interactive=False)
        tenant = tenant_create(name="nginx bench hospital", slug=TENANT)
        membership_grant(
            tenant=tenant, user=user_get_or_create(username=USERNAME, password=password), role=Role.CLINICIAN
        )
        model_version_register(package_path=ROOT / "var" / "test-cache" / "sightline-demo-1.0.0.zip")
        from django.db import connections

        connections.close_all()

        replicas, replica_pids = [], []
        for number in (1, 2):
            port = free_port()
            argv = web_server_argv(bin_dir=BIN, port=port, forwarded_allow_ips=PROXY_ADDRESS)
            process = processes.start(f"web-{number}", argv, env)
            wait_for_port(port, process, processes.log(f"web-{number}"))
            replicas.append(f"127.0.0.1:{port}")
            replica_pids.append(process.pid)
        tls = tls_files(workdir / "tls")
        fronts = {
            1: nginx_start(processes, workdir, "nginx-one", replicas[:1], tls),
            2: nginx_start(processes, workdir, "nginx-two", replicas, tls),
        }
        context = ssl.create_default_context(cafile=str(tls[0]))

        import httpx

        with httpx.Client(base_url=f"https://127.0.0.1:{fronts[2][0]}", verify=context, timeout=60) as client:
            token = client.post("/api/v1/auth/token/", json={"username": USERNAME, "password": password}).json()[
                "access"
            ]
            pool = [jpeg(224, seed) for seed in range(16)]
            first = client.post(
                "/api/v1/images/",
                headers={"Authorization": f"Bearer {token}"},
                files={"file": ("scan.jpg", pool[0], "image/jpeg")},
            )
            first.raise_for_status()
            image_id = first.json()["id"]

        cells = []
        for op in ("upload", "get"):
            for concurrency in CONCURRENCIES:
                for replica_count in (1, 2):
                    port, master = fronts[replica_count]
                    workers = children(master)

                    def meter(workers=workers) -> dict:
                        return {"nginx": cpu_seconds(workers), "web": cpu_seconds(replica_pids),
                                "client": time.process_time()}  # fmt: skip

                    run = asyncio.run(
                        closed_loop(url=f"https://127.0.0.1:{port}", context=context, token=token, op=op,
                                    image_id=image_id, concurrency=concurrency, seconds=seconds, pool=pool,
                                    meter=meter)
                    )  # fmt: skip
                    latencies = run["latencies"]
                    answers = max(1, sum(run["statuses"].values()))
                    accepted = sum(n for status, n in run["statuses"].items() if status in ("200", "201", "202"))
                    cell = {
                        "op": op,
                        "concurrency": concurrency,
                        "replicas": replica_count,
                        "seconds": seconds,
                        "answers": len(latencies),
                        "statuses": run["statuses"],
                        "accepted_share": round(accepted / answers, 4),
                        "throughput_per_s": round(len(latencies) / seconds, 1),
                        "p50_ms": pct(latencies, 50),
                        "p99_ms": pct(latencies, 99),
                        **{
                            f"{name}_core_ms_per_request": round(1000 * spent / answers, 2)
                            for name, spent in run["cpu"].items()
                        },
                        # cores the replicas kept busy: about 1 per replica at most (one Python
                        # process: its request threads share one interpreter lock)
                        "web_cores_busy": round(run["cpu"]["web"] / seconds, 2),
                    }
                    cells.append(cell)
                    print(
                        f"{op:6} c={concurrency:<3} replicas={replica_count}: {cell['throughput_per_s']:7.1f}/s "
                        f"p50 {cell['p50_ms']} ms p99 {cell['p99_ms']} ms statuses {run['statuses']}; core-ms per "
                        f"answer: nginx {cell['nginx_core_ms_per_request']}, web {cell['web_core_ms_per_request']}, "
                        f"client {cell['client_core_ms_per_request']}; replicas busy {cell['web_cores_busy']} cores",
                        flush=True,
                    )
        ratios = {}
        for op in ("upload", "get"):
            for concurrency in CONCURRENCIES:
                one, two = (
                    next(c for c in cells if (c["op"], c["concurrency"], c["replicas"]) == (op, concurrency, n))
                    for n in (1, 2)
                )
                ratios[f"{op}@{concurrency}"] = {
                    "throughput_two_over_one": round(two["throughput_per_s"] / max(0.1, one["throughput_per_s"]), 2),
                    "p99_two_over_one": round((two["p99_ms"] or 0) / max(0.1, one["p99_ms"] or 0.1), 2),
                }
        result = {
            "what": "through nginx (TLS, HTTP/1.1 keep-alive clients) to uvicorn replicas; no worker",
            "commit": git_commit(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": load},
            "database": "postgresql" if database_url else "sqlite",
            "upload_bytes": len(pool[0]),
            "cells": cells,
            "ratios": ratios,
        }
        OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
        print()
        print(
            f"{'op':8}{'conc':>5}{'1 replica /s':>14}{'2 replicas /s':>15}{'ratio':>7}"
            f"{'p99 1 (ms)':>12}{'p99 2 (ms)':>12}"
        )
        for key, ratio in ratios.items():
            op, concurrency = key.split("@")
            one, two = (
                next(c for c in cells if (c["op"], str(c["concurrency"]), c["replicas"]) == (op, concurrency, n))
                for n in (1, 2)
            )
            print(
                f"{op:8}{concurrency:>5}{one['throughput_per_s']:>14}{two['throughput_per_s']:>15}"
                f"{ratio['throughput_two_over_one']:>7}{one['p99_ms']:>12}{two['p99_ms']:>12}"
            )
        print(f"\nwrote {OUTPUT.relative_to(ROOT)} ({result['database']}, {os.cpu_count()} CPUs)")
    finally:
        processes.stop_all()
        if database_url:
            from django.db import connections

            connections.close_all()
            postgres_drop(database)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
