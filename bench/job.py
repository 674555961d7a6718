"""Bulk-job benchmark: one job of N images (a zip through the API) on the real stack, against the raw
in-process pipeline, with the peak memory of the web and worker processes.

    .venv/bin/python bench/job.py [--images 2000] [--model resnet18|demo] [--json bench/job.json]

A benchmark, not a test: it prints a table and writes JSON. It starts its own Redis, uvicorn and one
Celery worker (queues interactive, bulk and maintenance, as `make run` does) on a temporary SQLite
database. Phases: the limit (decode + forward at the worker's batch size, in this process, on the
stored PNGs); the zip upload (POST, streamed from a file; the archive spooled to disk and stored);
unpacking (a worker task turns entries into images); the job itself (start → every item finished), in
images/s and as a share of the limit. Interactive reads: single uploads, one at a time, from the POST
to their result.ready on the WebSocket, idle and again while the job runs. Memory: the web process's
resident set after start-up and its highest resident set (VmHWM), and the worker's (the Celery main
process and its pool child), read from /proc; flat means the peak does not grow with --images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402  (the stack helpers of the main benchmark)
    BIN,
    Api,
    Events,
    Processes,
    build_packages,
    demo_package,
    free_port,
    redis_server_binary,
    summary,
    wait_for_line,
    wait_for_port,
)

IMAGE_SIZE = 256
BATCH = 16


def peak_rss_mib(pid: int) -> dict[str, float]:
    """VmHWM of a process and of its children (the worker's pool), in MiB."""
    peaks = {}
    for candidate in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{candidate}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            peaks[f"{candidate}"] = round(int(fields["VmHWM"].split()[0]) / 1024, 1)
        except (OSError, KeyError, ValueError):
            continue
    return peaks


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "demo"])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "job.json")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sightline-job-"))
    processes = Processes(workdir / "logs")
    try:
        report = run(args, workdir, processes)
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.write_text(json.dumps(report, indent=2))
    rows = [
        ("limit (in-process, batch 16)", report["limit_images_per_s"], "img/s"),
        ("zip upload (POST)", report["upload_s"], f"s for {report['zip_mib']} MiB"),
        ("unpacking (worker task)", report["unpack_images_per_s"], "img/s"),
        ("job: start → all finished", report["job_images_per_s"], "img/s"),
        ("job / limit", report["job_ratio_to_limit"], "×"),
        ("interactive p50 / p99, idle", _pair(report["interactive_ms"]["idle"]), "ms"),
        ("interactive p50 / p99, during the job", _pair(report["interactive_ms"]["during_job"]), "ms"),
        ("memory, web after start-up", report["web_mib_after_start"], "MiB"),
        ("peak memory, web", report["peak_mib"]["web"], "MiB"),
        ("peak memory, worker (main + pool)", report["peak_mib"]["worker"], "MiB"),
    ]
    print(f"\nBulk job of {report['images']} images ({report['model']}, {IMAGE_SIZE}² PNG in a zip), 2 cores:")
    for name, value, unit in rows:
        print(f"  {name:<36} {value:>10} {unit}")
    print(f"  outcomes: {report['counts']}")
    print(f"\nwritten to {args.json}")
    return 0


def _pair(stats: dict) -> str:
    return f"{stats.get('p50_ms')} / {stats.get('p99_ms')}"


def run(args, workdir: Path, processes: Processes) -> dict:
    redis_port, web_port, password = free_port(), free_port(), secrets.token_urlsafe(12)
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_VAR_DIR": str(workdir),
        "SIGHTLINE_S3_BUCKET": "",
        "JWT_ACCESS_MINUTES": "240",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    child_env = {**os.environ, **env}
    argv = [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    redis_process = processes.start("redis", [*argv, "--appendonly", "no", "--dir", str(workdir)], child_env)
    wait_for_port(redis_port, redis_process, processes.log("redis"))

    import django

    django.setup()
    import numpy as np
    import requests
    import torch
    from django.core.files.base import ContentFile
    from django.core.management import call_command

    from accounts.models import Role
    from accounts.services import membership_grant, tenant_create, user_get_or_create
    from recognition.services.images import image_validate
    from workers.engine import synthetic
    from workers.engine.handler import Handler, configure_cpu_threads
    from workers.registration import model_version_register

    configure_cpu_threads()
    call_command("migrate", verbosity=0, interactive=False)
    tenant = tenant_create(name="Bench Hospital", slug="bench-hospital")
    membership_grant(tenant=tenant, user=user_get_or_create(username="bench", password=password), role=Role.CLINICIAN)
    helper = SimpleNamespace(workdir=workdir, say=print)
    package = demo_package(helper) if args.model == "demo" else build_packages(helper, [args.model])[args.model]
    version, _ = model_version_register(package_path=package)
    child_env["SIGHTLINE_DEFAULT_MODEL"] = version.model.name

    rng = np.random.default_rng(7)
    distinct = [synthetic.render_png(rng, IMAGE_SIZE, i % 2 == 1) for i in range(64)]
    stored = [image_validate(ContentFile(data)).content for data in distinct]

    handler = Handler.initialize(package, version.weights_sha256, device=torch.device("cpu"))
    handler.predict(stored[:BATCH])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < 10:
        handler.predict([stored[(done + k) % len(stored)] for k in range(BATCH)])
        done += BATCH
    limit = done / (time.perf_counter() - started)
    del handler

    archive_path = workdir / "night.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_STORED) as zipped:  # PNGs do not compress further
        for number in range(args.images):
            zipped.writestr(f"night/{number:05d}.png", distinct[number % len(distinct)])

    from config.webserver import web_server_argv

    web = processes.start("web", web_server_argv(bin_dir=BIN, port=web_port), child_env)
    wait_for_port(web_port, web, processes.log("web"))
    worker_argv = [str(BIN / "celery"), "-A", "workers.celery", "worker", "-P", "prefork", "-c", "1", "-Q"]
    worker_argv += ["interactive,maintenance,bulk", "-n", f"job{os.getpid()}@%h", "--without-gossip", "-l", "info"]
    worker = processes.start("worker", worker_argv, child_env)
    wait_for_line(" ready.", worker, processes.log("worker"))

    base = f"http://127.0.0.1:{web_port}/api/v1"
    api = Api(f"http://127.0.0.1:{web_port}", "bench", password)
    headers = {"Authorization": f"Bearer {api.token}"}
    events = Events(f"ws://127.0.0.1:{web_port}", api.token)
    probes = [distinct[k] for k in range(8)]
    interactive_latencies(api, events, probes, until=lambda: False, most=2)  # warm-up, not counted
    idle = interactive_latencies(api, events, probes, until=lambda: False, most=20)
    web_after_start = rss_mib(web.pid)
    job = requests.post(f"{base}/batches/", json={"name": "bench"}, headers=headers, timeout=30).json()

    t0 = time.perf_counter()
    with MultipartFile(archive_path, field="archive", filename="night.zip") as body:
        response = requests.post(
            f"{base}/batches/{job['id']}/items/",
            data=body,
            headers={**headers, "Content-Type": body.content_type},
            timeout=1800,
        )
    response.raise_for_status()
    t1 = time.perf_counter()
    while requests.get(f"{base}/batches/{job['id']}/", headers=headers, timeout=30).json()["uploads_pending"]:
        time.sleep(0.5)
    t2 = time.perf_counter()
    requests.post(f"{base}/batches/{job['id']}/start/", headers=headers, timeout=60).raise_for_status()

    def job_running() -> bool:
        return requests.get(f"{base}/batches/{job['id']}/", headers=headers, timeout=30).json()["state"] == "running"

    time.sleep(2)  # the job under way before the first probe
    during = interactive_latencies(api, events, probes, until=lambda: not job_running(), most=40, pause=1.0)
    while job_running():
        time.sleep(0.5)
    t3 = time.perf_counter()
    status = requests.get(f"{base}/batches/{job['id']}/", headers=headers, timeout=30).json()
    events.close()
    worker_peaks = peak_rss_mib(worker.pid)
    web_peaks = peak_rss_mib(web.pid)
    job_rate = args.images / (t3 - t2)
    return {
        "model": args.model,
        "images": args.images,
        "zip_mib": round(archive_path.stat().st_size / 2**20, 1),
        "limit_images_per_s": round(limit, 1),
        "upload_s": round(t1 - t0, 2),
        "unpack_images_per_s": round(args.images / (t2 - t1), 1),
        "job_images_per_s": round(job_rate, 1),
        "job_ratio_to_limit": round(job_rate / limit, 2),
        "counts": status["counts"],
        "interactive_ms": {"idle": summary(idle), "during_job": summary(during)},
        "web_mib_after_start": web_after_start,
        "peak_mib": {"web": max(web_peaks.values(), default=None), "worker": sum(worker_peaks.values())},
        "peak_mib_by_process": {"web": web_peaks, "worker": worker_peaks},
    }


def interactive_latencies(api, events, probes, *, until, most: int, pause: float = 0.2) -> list[float]:
    """One upload at a time: ms from the POST to its result.ready (a clinician's read)."""
    latencies = []
    for number in range(most):
        if until():
            break
        image_id, started, _ = api.upload(probes[number % len(probes)], f"probe-{number}.png")
        arrived = events.wait(image_id, timeout=120)
        if arrived is not None:
            latencies.append((arrived - started) * 1000)
        time.sleep(pause)
    return latencies


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return round(int(fields["VmRSS"].split()[0]) / 1024, 1)
    except (OSError, KeyError, ValueError):
        return None


class MultipartFile(io.RawIOBase):
    """A multipart/form-data body of one file part, read from disk as it is sent (requests then
    sends a Content-Length and never holds the archive in memory)."""

    def __init__(self, path: Path, *, field: str, filename: str):
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        self._parts = [io.BytesIO(head), path.open("rb"), io.BytesIO(tail)]
        self._length = len(head) + path.stat().st_size + len(tail)
        self._sent = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # requests reads the length as len() - tell()
        return self._sent

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while self._parts:
            chunk = self._parts[0].read(size)
            if chunk:
                self._sent += len(chunk)
                return chunk
            self._parts.pop(0).close()
        return b""

    def close(self) -> None:
        for part in self._parts:
            part.close()
        super().close()


if __name__ == "__main__":
    sys.exit(main())
