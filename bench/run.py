"""Sightline benchmark: the real stack (uvicorn, two Celery worker lanes, Redis, SQLite) against the raw
eager pipeline a model server's default handler runs, measured in the same run on the same machine.

    .venv/bin/python bench/run.py [--quick] [--models resnet18,resnet50,demo] [--json bench/results.json]
                                  [--settle SECONDS] [--keep]

A benchmark, not a test: it prints issue 12's tables and goals and writes JSON. Every ratio comes from one
run on one machine. A busy machine does not slow everything alike, though (torch's intra-op threads
collapse when another process takes one of their cores), so each phase records the cores other processes
used meanwhile ("noise" in the JSON), rates keep their quiet trials, and a verdict resting on a noisy
phase is starred. The two CPU-per-image goals are absolute (core-ms are robust to a noisy machine).

Per model (torchvision resnet18 and resnet50 with random weights at 224 px, and the demo model), on
224² JPEGs:

- raw: JPEG bytes → Resize 256, CenterCrop 224, normalise (torchvision transforms) → eager fp32 NCHW
  forward → top-5, in this process, at batch 1, 8 and at every batch size the worker ran (bench/raw.py);
  the platform's own Handler (the engine with its default backend) at the same batch sizes;
- full path: closed-loop clients at concurrency 1, 8 and 32 (JWT upload → result.ready on the WebSocket),
  img/s, p50/p99, the worker's batch sizes (InferenceRequest.batch_size), CPU per image of each process;
- during bulk: concurrency 1 and 8 again while the bulk lane works off a backlog;
- linear cost / bulk path: N bulk requests for images already stored (the rows a job's unpacking makes,
  with no web cost per image), one wake-up task, until the last result.ready — at 100, 1,000 (and 10,000
  for the demo model) images;
- queries: one upload through Django's test client and one worker batch of 1 and of 8 run in this
  process (workers.tasks.infer), each under CaptureQueriesContext.

The stack runs two worker processes, as `make run` does: worker-interactive (SIGHTLINE_WORKER_LANE=
interactive, -Q interactive,bulk) and worker-bulk (SIGHTLINE_WORKER_LANE=bulk, -Q maintenance,bulk, under
nice -n 10); their CPU is summed. Everything runs in a temporary folder with a private redis-server;
every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report as reporting  # noqa: E402
from bench.report import QUIET_CORES, batch_median  # noqa: E402

STARTUP_SECONDS = 180
RESULT_TIMEOUT_SECONDS = 120
MAX_RETRY_AFTER_SECONDS = 5.0
IMAGE_SIZE = 224  # the "224² JPEG"
JPEG_QUALITY = 90
TENANT_SLUG = "bench-hospital"
USERNAME = "bench-clinician"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAW_BATCHES = (1, 8)  # besides every batch size the worker ran
CONCURRENCIES = (1, 8, 32)


# ---------------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Plan:
    key: str  # resnet18 | resnet50 | demo
    name: str  # the registry's model name (SIGHTLINE_DEFAULT_MODEL of the stack)
    full_samples: dict[int, int]  # concurrency → samples (each phase also stops at its time cap)
    bulk_samples: dict[int, int]  # concurrency → samples while a bulk backlog runs
    linear_n: tuple[int, ...]  # bulk-path sizes for the linear-cost check (the largest is the bulk goal's)


def plans_for(quick: bool) -> dict[str, Plan]:
    if quick:
        full, during = {1: 8, 8: 32, 32: 64}, {1: 6, 8: 16}
        return {
            "resnet18": Plan("resnet18", "bench-resnet18", full, during, (32, 96)),
            "resnet50": Plan("resnet50", "bench-resnet50", {1: 4, 8: 16, 32: 48}, {1: 4, 8: 8}, (16, 64)),
            "demo": Plan("demo", "sightline-demo", full, during, (100, 500)),
        }
    full, during = {1: 60, 8: 200, 32: 400}, {1: 40, 8: 120}
    return {
        "resnet18": Plan("resnet18", "bench-resnet18", full, during, (100, 1000)),
        "resnet50": Plan("resnet50", "bench-resnet50", {1: 30, 8: 96, 32: 192}, {1: 20, 8: 48}, (100, 1000)),
        "demo": Plan("demo", "sightline-demo", full, during, (100, 1000, 10000)),
    }


@dataclass(frozen=True)
class Limits:
    """Seconds per phase: closed-loop phases stop early at their cap, so a slow machine stays bounded."""

    trial_seconds: float  # one trial of an in-process rate
    rate_trials: int  # trials per rate (more, up to twice, when too few are quiet)
    interactive_cap: float  # one closed-loop phase
    throughput_cap: float  # one bulk-path run


# ---------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Processes:
    """Every process runs in a group of its own (the worker's pool goes with it); stop_all ends them all."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen] = {}
        self.log_paths: dict[str, Path] = {}
        self._starts = itertools.count(1)

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        log = self.logs / f"{next(self._starts):02d}-{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running[name] = process
        self.log_paths[name] = log
        return process

    def log(self, name: str) -> Path:
        return self.log_paths[name]

    def pgids(self) -> set[int]:
        return {p.pid for p in self.running.values() if p.poll() is None}

    def stop(self, name: str, timeout: float = 20) -> None:
        process = self.running.pop(name, None)
        if process is None:
            return
        _terminate_group(process, timeout)

    def stop_all(self) -> None:
        for name in list(reversed(self.running)):
            self.stop(name)


def _terminate_group(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # the group may outlive its leader (the worker's pool process): make sure it is gone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {port}:\n{tail(log)}")


def wait_for_line(text: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{tail(log)}")
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"never saw {text!r}:\n{tail(log)}")


def redis_server_binary() -> str:
    return shutil.which("redis-server") or str(BIN / "redis-server")


class CpuMeter:
    """CPU seconds used by the whole machine and by each of this benchmark's processes (this one, the
    client, and the process groups it started), read from /proc: the rest is other people's load."""

    def __init__(self, processes: Processes):
        self.processes = processes
        self.tick = os.sysconf("SC_CLK_TCK")
        self.available = Path("/proc/stat").exists()

    def snapshot(self) -> tuple[float, float, dict[str, float]]:
        if not self.available:
            return time.monotonic(), 0.0, {}
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        busy = (sum(values) - values[3] - (values[4] if len(values) > 4 else 0)) / self.tick
        names = {p.pid: name.split("-")[0] for name, p in self.processes.running.items() if p.poll() is None}
        me, own = os.getpid(), {"client": 0.0, **dict.fromkeys(names.values(), 0.0)}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            name = "client" if int(entry.name) == me else names.get(int(fields[2]))
            if name is not None:
                own[name] += (int(fields[11]) + int(fields[12])) / self.tick
        return time.monotonic(), busy, own

    @staticmethod
    def between(start: tuple, end: tuple) -> dict:
        """Cores used on average: by the machine, by this benchmark (``client`` is this process: the
        load generator, or the in-process limit), and by everything else."""
        seconds = max(end[0] - start[0], 1e-9)
        busy = (end[1] - start[1]) / seconds
        by_process = {
            name: round(max(end[2][name] - start[2].get(name, 0.0), 0.0) / seconds, 3)
            for name in end[2]
            if name in start[2]
        }
        own = sum(by_process.values())
        return {
            "seconds": round(seconds, 2),
            "machine_busy_cores": round(busy, 2),
            "bench_cores": round(own, 2),
            "others_cores": round(max(busy - own, 0.0), 2),
            "bench_cores_by_process": by_process,
        }


def cpu_per_image(noise: dict, images: int) -> dict:
    """Core-milliseconds each process spent per image over a phase (``client``: the load generator)."""
    if not images or "seconds" not in noise:
        return {}
    per = {
        name: round(cores * noise["seconds"] * 1000 / images, 1)
        for name, cores in noise["bench_cores_by_process"].items()
    }
    per["total"] = round(sum(per.values()), 1)
    return per


# ---------------------------------------------------------------------------------------------------
# Statistics


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 1) if values else None


def median(values: list[float]) -> float | None:
    return pct(values, 50)


def summary(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"n": 0}
    return {
        "n": len(values_ms),
        "p50_ms": pct(values_ms, 50),
        "p90_ms": pct(values_ms, 90),
        "p99_ms": pct(values_ms, 99),
        "mean_ms": round(float(np.mean(values_ms)), 1),
        "max_ms": round(max(values_ms), 1),
    }


# ---------------------------------------------------------------------------------------------------
# Clients: HTTP uploads and one WebSocket that records when each result.ready arrives


def content_type(name: str) -> str:
    return "image/jpeg" if name.lower().endswith((".jpg", ".jpeg")) else "image/png"


class Api:
    def __init__(self, base_url: str, username: str, password: str):
        import requests

        self.base_url = base_url
        response = requests.post(
            f"{base_url}/api/v1/auth/token/", json={"username": username, "password": password}, timeout=60
        )
        response.raise_for_status()
        self.token = response.json()["access"]
        self._local = threading.local()
        self._lock = threading.Lock()
        self.shed = 0  # uploads answered 429 and sent again

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update({"Authorization": f"Bearer {self.token}", "X-Tenant": TENANT_SLUG})
        return session

    def upload(self, data: bytes, name: str) -> tuple[int, float, float]:
        """(image id, wall time the first POST started, wall time its answer arrived). A 429 (the
        interactive backlog is full) is retried after its Retry-After, as a client would: the wait
        counts in the latency, and in ``shed``."""
        started = time.time()
        while True:
            response = self._session().post(
                f"{self.base_url}/api/v1/images/",
                files={"file": (name, data, content_type(name))},
                timeout=RESULT_TIMEOUT_SECONDS,
            )
            if response.status_code != 429:
                break
            with self._lock:
                self.shed += 1
            time.sleep(min(float(response.headers.get("Retry-After") or 1), MAX_RETRY_AFTER_SECONDS))
        answered = time.time()
        if response.status_code != 201:
            raise RuntimeError(f"upload answered {response.status_code}: {response.text[:500]}")
        return int(response.json()["id"]), started, answered


class Events:
    """The hospital's /ws/events/ feed: wall time of each result.ready, by image id."""

    def __init__(self, ws_url: str, token: str):
        from websockets.sync.client import connect

        self._exit = contextlib.ExitStack()
        self.ws = self._exit.enter_context(
            connect(f"{ws_url}/ws/events/?token={token}", open_timeout=60, max_size=2**20)
        )
        hello = json.loads(self.ws.recv(timeout=60))
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello}")
        self.ws.send(json.dumps({"type": "subscribe", "tenant": TENANT_SLUG}))
        answer = json.loads(self.ws.recv(timeout=60))
        if answer.get("type") != "subscribed":
            raise RuntimeError(f"subscription refused: {answer}")
        self.arrivals: dict[int, float] = {}
        self.statuses: dict[int, str] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._listen, name="events", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                raw = self.ws.recv()
            except (ConnectionClosed, OSError, RuntimeError):
                break
            now = time.time()
            message = json.loads(raw)
            if message.get("type") == "result.ready" and isinstance(message.get("image"), int):
                with self.cond:
                    self.arrivals[message["image"]] = now
                    self.statuses[message["image"]] = message.get("status", "")
                    self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, image_id: int, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while image_id not in self.arrivals and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return self.arrivals.get(image_id)

    def count(self, ids: set[int]) -> int:
        with self.cond:
            return sum(1 for i in ids if i in self.arrivals)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._exit.close()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------
# The platform seams: the few names of the platform the bench calls, in one place.


def platform_handler(version):
    """The engine as the worker loads it (its model cache, its default backend and compile
    settings), once its backend is chosen: the worker serves eager while it chooses."""
    from workers.model_cache import model_handler

    handler = model_handler(version)
    handler.wait_for_backend(timeout=STARTUP_SECONDS)
    return handler


def register(package: Path):
    """Submit and validate a model package in this process; its version."""
    from workers.registration import model_version_register

    return model_version_register(package_path=package)[0]


def wake(request_id: int, queue: str = "bulk") -> None:
    """One task by its stable name: the worker claims this request, then keeps batching what waits."""
    from workers.celery import app

    app.send_task("workers.tasks.infer", args=[request_id], queue=queue)


def infer_in_process(request_id: int) -> None:
    """workers.tasks.infer run in this process (one claim → batch → store), not through the broker."""
    from workers.tasks import infer

    infer.apply(args=[request_id], throw=True)


# ---------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    limits: Limits
    workdir: Path
    processes: Processes
    child_env: dict
    redis_url: str
    web_port: int
    password: str
    pool: list[bytes]  # 224² JPEGs: what the clients upload and the raw pipeline decodes
    meter: CpuMeter
    membership: object = None
    api: Api | None = None
    events: Events | None = None
    settle_budget: float = 0.0  # seconds left for waiting on a quiet machine, the whole run
    worker_starts: itertools.count = field(default_factory=lambda: itertools.count(1))
    source_ids: list[int] = field(default_factory=list)  # uploaded images, reused by the bulk backlogs
    log: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        self.log.append(line)
        print(line, flush=True)

    @contextlib.contextmanager
    def measured(self, result: dict):
        """Records how busy the machine was meanwhile into ``result['noise']``."""
        start = self.meter.snapshot()
        try:
            yield
        finally:
            result["noise"] = CpuMeter.between(start, self.meter.snapshot())

    # -- stack ------------------------------------------------------------------------------------

    def start_web(self, plan: Plan) -> None:
        from config.webserver import web_server_argv

        env = {**self.child_env, "SIGHTLINE_DEFAULT_MODEL": plan.name}
        self._web_name = f"web-{plan.key}"
        web = self.processes.start(self._web_name, web_server_argv(bin_dir=BIN, port=self.web_port), env)
        wait_for_port(self.web_port, web, self.processes.log(self._web_name))

    def start_workers(self, plan: Plan) -> None:
        """The two lanes of `make run`: started together, then waited for (their start-ups overlap)."""
        lanes = (("interactive", "interactive,bulk", []), ("bulk", "maintenance,bulk", ["nice", "-n", "10"]))
        self._worker_names = []
        for lane, queues, prefix in lanes:
            env = {**self.child_env, "SIGHTLINE_DEFAULT_MODEL": plan.name, "SIGHTLINE_WORKER_LANE": lane}
            name = f"worker-{lane}-{plan.key}"
            argv = [*prefix, str(BIN / "celery"), "-A", "workers.celery", "worker", "-P", "prefork", "-c", "1"]
            argv += ["-Q", queues, "-n", f"bench{os.getpid()}-{lane}-{next(self.worker_starts)}@%h"]
            argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"]
            self.processes.start(name, argv, env)
            self._worker_names.append(name)
        for name in self._worker_names:
            wait_for_line(" ready.", self.processes.running[name], self.processes.log(name))
        # each worker chooses its backend in a background thread (ONNX export, timing; compile
        # where asked) while eager serves: measure what runs afterwards, not that start-up work
        for name in self._worker_names:
            wait_for_line("backends settled:", self.processes.running[name], self.processes.log(name))

    def start_stack(self, plan: Plan) -> None:
        self.say(f"{plan.key}: starting uvicorn and two worker lanes (SIGHTLINE_DEFAULT_MODEL={plan.name})")
        self.start_web(plan)
        self.start_workers(plan)
        self.api = Api(f"http://127.0.0.1:{self.web_port}", USERNAME, self.password)
        self.events = Events(f"ws://127.0.0.1:{self.web_port}", self.api.token)
        self.warm_up()

    def stop_stack(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        self.processes.stop(getattr(self, "_web_name", ""))
        for name in getattr(self, "_worker_names", []):
            self.processes.stop(name)
        self.flush_broker()

    def flush_broker(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()  # no stale task or group for the next stack

    def warm_up(self) -> None:
        """The first requests load code paths, the model and the batch shapes: not measured."""
        for i in range(2 if self.args.quick else 3):
            self.round_trip(i, timeout=STARTUP_SECONDS)
        burst = 8 if self.args.quick else 16
        with ThreadPoolExecutor(burst) as executor:
            list(executor.map(lambda i: self.round_trip(i, timeout=STARTUP_SECONDS), range(burst)))

    def round_trip(self, i: int, timeout: float = RESULT_TIMEOUT_SECONDS) -> dict:
        image_id, started, answered = self.api.upload(self.pool[i % len(self.pool)], f"img-{i}.jpg")
        arrived = self.events.wait(image_id, timeout)
        return {"image": image_id, "t0": started, "t_post": answered, "t_ws": arrived}

    # -- database helpers (main thread only) ------------------------------------------------------

    def request_rows(self, image_ids: list[int]) -> dict[int, dict]:
        from recognition.models import InferenceRequest

        rows = {}
        for start in range(0, len(image_ids), 500):
            chunk = image_ids[start : start + 500]
            for row in InferenceRequest.objects.filter(image_id__in=chunk).values(
                "id", "image_id", "created", "started_at", "finished_at", "batch_size", "status", "priority"
            ):
                rows[row["image_id"]] = row
        return rows

    def drain(self, timeout: float = 180) -> int:
        """Cancel what is still queued, then wait until the workers hold nothing."""
        from django.utils import timezone

        from recognition.models import InferenceRequest

        status = InferenceRequest.Status
        cancelled = InferenceRequest.objects.filter(status=status.QUEUED).update(
            status=status.FAILED, error="cancelled by the benchmark", finished_at=timezone.now()
        )
        deadline = time.monotonic() + timeout
        while InferenceRequest.objects.filter(status=status.RUNNING).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("a worker still holds running requests; see the worker logs")
            time.sleep(0.2)
        time.sleep(0.3)  # the last result.ready messages
        return cancelled

    def wait_results(self, ids: list[int], deadline: float) -> dict:
        """Wait for a result.ready per image (the database decides when a message is late)."""
        from recognition.models import InferenceRequest

        pending, id_set = set(ids), set(ids)
        terminal_since, checked = None, time.monotonic()
        while pending and time.monotonic() < deadline:
            with self.events.cond:
                self.events.cond.wait(0.25)
                pending = {i for i in pending if i not in self.events.arrivals}
            if pending and terminal_since is None and time.monotonic() - checked > 1:
                checked = time.monotonic()
                busy = InferenceRequest.objects.filter(
                    image_id__in=list(pending)[:900], status__in=["queued", "running"]
                ).exists()
                if not busy:
                    terminal_since = time.monotonic()
            if terminal_since is not None and time.monotonic() - terminal_since > 3:
                break  # the rows are done, a message went missing
        arrivals = [self.events.arrivals[i] for i in id_set if i in self.events.arrivals]
        rows = self.request_rows(ids)
        finished = [r["finished_at"].timestamp() for r in rows.values() if r["finished_at"] is not None]
        done = [r for r in rows.values() if r["status"] in ("done", "failed")]
        return {
            "completed": len(done),
            "failed": sum(1 for r in done if r["status"] == "failed"),
            "missing_messages": len(id_set) - len(arrivals),
            "end": max(arrivals + finished) if (arrivals or finished) else None,
            "timed_out": bool(pending) and time.monotonic() >= deadline,
            "rows": rows,
        }

    @staticmethod
    def batch_stats(rows: dict) -> dict:
        """The batch sizes the worker ran (InferenceRequest.batch_size), per image."""
        sizes = [r["batch_size"] for r in rows.values() if r["batch_size"]]
        if not sizes:
            return {}
        histogram: dict[int, int] = {}
        for size in sizes:
            histogram[size] = histogram.get(size, 0) + 1
        return {
            "mean_batch_per_image": round(float(np.mean(sizes)), 2),
            "median_batch": batch_median(sizes),
            "batches": round(sum(1 / s for s in sizes)),
            "images_by_batch_size": {str(k): v for k, v in sorted(histogram.items())},
        }

    # -- in-process rates -------------------------------------------------------------------------

    def trials(self, call, count: int, seconds: float) -> list[dict]:
        """``count`` trials; on a noisy machine up to ``count`` more, until enough of them are quiet."""
        runs: list[dict] = []
        until = time.monotonic() + 3 * count * seconds  # a busy machine gets more trials, within bounds
        while len(runs) < count or (
            len(runs) < 2 * count and time.monotonic() < until and not self.pick_quiet(runs)[2]
        ):
            start, times = self.meter.snapshot(), []
            until = time.perf_counter() + seconds
            while time.perf_counter() < until or not times:
                times.append(call())
            use = CpuMeter.between(start, self.meter.snapshot())
            runs.append({"times": times, "others_cores": use["others_cores"], "bench_cores": use["bench_cores"]})
        return runs

    @staticmethod
    def pick_quiet(runs: list[dict]) -> tuple[list[dict], str, bool]:
        """The quiet trials when there are enough of them (else all), "quiet/all", and whether enough."""
        quiet = [r for r in runs if r["others_cores"] < QUIET_CORES]
        enough = len(quiet) >= max(2, (len(runs) + 2) // 3)
        return (quiet if enough else runs), f"{len(quiet)}/{len(runs)}", enough

    def settle(self) -> dict:
        """Wait (a bounded while) for other processes to leave the CPUs alone before a phase."""
        waited, others = 0.0, None
        limit = min(self.args.settle, self.settle_budget)
        if limit <= 0:
            return {"waited_s": 0.0, "others_cores": None}
        while True:
            start = self.meter.snapshot()
            time.sleep(0.5)
            others = CpuMeter.between(start, self.meter.snapshot())["others_cores"]
            if others < QUIET_CORES or waited >= limit:
                break
            waited += 0.5
        self.settle_budget -= waited
        return {"waited_s": waited, "others_cores": others}

    def measure_rate(self, predict, batch: int, earlier: dict | None = None) -> dict:
        """``predict(list of JPEG bytes)`` in a tight loop at ``batch``, images/s and core-ms per image,
        in short trials each tagged with the other processes' CPU use; ``earlier``: a result of the
        same pipeline and batch whose trials count too (measured before the stack ran)."""
        position = itertools.count()

        def one_batch() -> float:
            start = next(position) * batch
            items = [self.pool[(start + k) % len(self.pool)] for k in range(batch)]
            t0 = time.perf_counter()
            predict(items)
            return time.perf_counter() - t0

        one_batch()  # this shape's first pass
        settle = self.settle()
        runs = self.trials(one_batch, self.limits.rate_trials, self.limits.trial_seconds)
        trials = [
            {
                "images_per_s": round(batch * len(r["times"]) / sum(r["times"]), 2),
                "cpu_ms_per_image": round(r["bench_cores"] * sum(r["times"]) * 1000 / (batch * len(r["times"])), 1),
                "others_cores": r["others_cores"],
                "times_ms": [round(t * 1000, 2) for t in r["times"]],
            }
            for r in runs
        ]
        trials = (earlier or {}).get("trials", []) + trials
        chosen, quiet, enough = self.pick_quiet(trials)
        return {
            "batch_size": batch,
            "images_per_s": round(float(np.median([t["images_per_s"] for t in chosen])), 2),
            "cpu_ms_per_image": round(float(np.median([t["cpu_ms_per_image"] for t in chosen])), 1),
            "quiet_trials": quiet,
            "noisy": not enough,
            "settle": settle,
            "trials": trials,
        }

    def measure_rates(
        self, section: dict, package: Path, version, batches: dict[str, set[int]], *, again: set[int]
    ) -> None:
        """Raw and engine rates at ``batches[kind]`` (those already measured only when in ``again``,
        their earlier trials pooled with the new ones)."""
        import gc

        from bench.raw import RawPipeline

        pipelines = (
            ("raw", lambda: RawPipeline(package, version.weights_sha256)),
            ("engine", lambda: platform_handler(version).predict),
        )
        for kind, make in pipelines:
            todo = sorted(b for b in batches[kind] if str(b) not in section[kind] or b in again)
            if not todo:
                continue
            predict = make()
            for batch in todo:
                self.say(f"{section['key']}: {kind} pipeline in-process, batch {batch}")
                section[kind][str(batch)] = self.measure_rate(predict, batch, earlier=section[kind].get(str(batch)))
            del predict
            gc.collect()
        single = section["raw"].get("1")
        if single:
            chosen, quiet, enough = self.pick_quiet(single["trials"])
            section["raw_single"] = summary([t for r in chosen for t in r["times_ms"]])
            section["raw_single"].update(quiet_trials=quiet, noisy=not enough)

    # -- the full path ----------------------------------------------------------------------------

    def closed_loop(self, concurrency: int, samples: int, cap: float) -> dict:
        """``concurrency`` clients, each: upload, wait for its result.ready, again."""
        counter = itertools.count()
        records: list[dict] = []
        lock = threading.Lock()
        errors: list[str] = []

        def client(_: int) -> None:
            while True:
                i = next(counter)
                if i >= samples or time.monotonic() > deadline:
                    return
                try:
                    record = self.round_trip(i)
                except Exception as exc:  # recorded; the phase goes on
                    with lock:
                        errors.append(str(exc)[:300])
                    continue
                with lock:
                    records.append(record)

        result: dict = {"concurrency": concurrency, "samples_wanted": samples, "cap_seconds": cap}
        result["settle"] = self.settle()
        shed_before = self.api.shed
        deadline = time.monotonic() + cap + result["settle"]["waited_s"] + 0.5
        with self.measured(result), ThreadPoolExecutor(concurrency) as executor:
            for future in [executor.submit(client, k) for k in range(concurrency)]:
                future.result()
        done = [r for r in records if r["t_ws"] is not None]
        latencies = [(r["t_ws"] - r["t0"]) * 1000 for r in done]
        result.update(summary(latencies))
        result["lost"] = len(records) - len(done)
        result["shed_429"] = self.api.shed - shed_before
        result["errors"] = errors[:5]
        result["capped"] = len(records) + len(errors) < samples
        if done:
            span = max(r["t_ws"] for r in done) - min(r["t0"] for r in done)
            result["images_per_s"] = round(len(done) / span, 2) if span > 0 else None
        rows = self.request_rows([r["image"] for r in done])
        result["cpu_ms_per_image"] = cpu_per_image(result.get("noise", {}), len(done))
        result["breakdown_ms"] = self.breakdown(done, rows)
        result.update(self.batch_stats(rows))
        result["latencies_ms"] = [round(v, 1) for v in latencies]
        self.source_ids += [r["image"] for r in done]
        return result

    @staticmethod
    def breakdown(records: list[dict], rows: dict) -> dict:
        """Medians of each hop, from client clocks and the request row's timestamps (one machine)."""
        parts: dict[str, list[float]] = {
            "post_answer": [],
            "post_to_row": [],
            "row_to_claim": [],
            "claim_to_finish": [],
            "finish_to_message": [],
        }
        for record in records:
            row = rows.get(record["image"])
            parts["post_answer"].append((record["t_post"] - record["t0"]) * 1000)
            if row is None or row["started_at"] is None or row["finished_at"] is None:
                continue
            created, started, finished = (row[k].timestamp() for k in ("created", "started_at", "finished_at"))
            parts["post_to_row"].append((created - record["t0"]) * 1000)
            parts["row_to_claim"].append((started - created) * 1000)
            parts["claim_to_finish"].append((finished - started) * 1000)
            parts["finish_to_message"].append((record["t_ws"] - finished) * 1000)
        return {name: median(values) for name, values in parts.items()}

    # -- the bulk path ----------------------------------------------------------------------------

    def clone_backlog(self, count: int, version, status: str = "queued") -> list[int]:
        """Bulk-priority requests for new image rows that reuse stored uploads (the bytes the worker
        reads are real uploads; only the rows are cloned, as a job's unpacking makes them, so a big
        backlog costs no web time per image). Every stored field is copied, whatever the image's state."""
        from recognition.models import Image, InferenceRequest

        sources = list(Image.objects.filter(id__in=self.source_ids[-32:]))
        names = [f.attname for f in Image._meta.concrete_fields if not f.primary_key]
        images = [Image(**{name: getattr(sources[i % len(sources)], name) for name in names}) for i in range(count)]
        Image.objects.bulk_create(images, batch_size=500)
        InferenceRequest.objects.bulk_create(
            [
                InferenceRequest(
                    tenant_id=image.tenant_id,
                    image=image,
                    model_version=version,
                    priority=InferenceRequest.Priority.BULK,
                    status=status,
                )
                for image in images
            ],
            batch_size=500,
        )
        return [image.pk for image in images]

    def first_request(self, image_ids: list[int]) -> int:
        from recognition.models import InferenceRequest

        return (
            InferenceRequest.objects.filter(image_id__in=image_ids[:100]).order_by("id").values_list("id", flat=True)[0]
        )

    def bulk_path(self, n: int, version) -> dict:
        """N bulk requests for stored images, one wake-up, until the last result.ready."""
        backlog = self.clone_backlog(n, version)
        first = self.first_request(backlog)
        result: dict = {"images": n, "settle": self.settle()}
        deadline = time.monotonic() + self.limits.throughput_cap
        with self.measured(result):
            woken = time.time()
            wake(first)
            outcome = self.wait_results(backlog, deadline)
        rows = outcome["rows"]
        first_claim = min((r["started_at"].timestamp() for r in rows.values() if r["started_at"]), default=None)
        result["wake_to_first_claim_ms"] = round((first_claim - woken) * 1000, 1) if first_claim else None
        self._finish_throughput(result, outcome, woken)
        result["capped"] = outcome["timed_out"]
        rate = result.get("images_per_s")
        result["ms_per_image"] = round(1000 / rate, 2) if rate else None
        result["core_ms_per_image"] = result["cpu_ms_per_image"].get("total")
        return result

    def _finish_throughput(self, result: dict, outcome: dict, start: float) -> None:
        rows = outcome.pop("rows")
        span = (outcome["end"] - start) if outcome["end"] else None
        result.update({k: v for k, v in outcome.items() if k != "end"})
        result["seconds"] = round(span, 2) if span else None
        result["images_per_s"] = round(outcome["completed"] / span, 2) if span else None
        result.update(self.batch_stats(rows))
        result["cpu_ms_per_image"] = cpu_per_image(result.get("noise", {}), outcome["completed"])

    def during_bulk(self, plan: Plan, version, rate_hint: float) -> dict:
        """A bulk backlog big enough to outlast the interactive phases, woken once; interactive
        latency measured while the bulk lane works it off (and how fast the backlog moved meanwhile)."""
        phases = plan.bulk_samples
        span = (self.limits.interactive_cap + min(self.args.settle, self.settle_budget) + 1) * len(phases) + 20
        count = int(min(max(rate_hint * span * 1.3, 64), 8000))
        backlog = self.clone_backlog(count, version)
        backlog_set = set(backlog)
        result: dict = {"backlog": count}
        wake(self.first_request(backlog))
        first = time.monotonic()
        while self.events.count(backlog_set) == 0:
            if time.monotonic() - first > STARTUP_SECONDS:
                raise RuntimeError("the bulk backlog never started")
            time.sleep(0.05)
        for concurrency, samples in phases.items():
            before, t0 = self.events.count(backlog_set), time.monotonic()
            phase = self.closed_loop(concurrency, samples, self.limits.interactive_cap)
            moved = self.events.count(backlog_set) - before
            phase["bulk_images_per_s_meanwhile"] = round(moved / (time.monotonic() - t0), 2)
            phase["bulk_left"] = count - self.events.count(backlog_set)
            phase["bulk_ran_out"] = phase["bulk_left"] <= 0
            result[f"c{concurrency}"] = phase
        result["cancelled_after"] = self.drain()
        return result

    # -- query counts (stack stopped: nothing else touches the database) ---------------------------

    def query_counts(self) -> dict:
        """One upload through Django's whole stack (middleware, JWT, DRF, service) in this process, and
        worker batches of 1 and 8 (workers.tasks.infer in this process), each under
        CaptureQueriesContext. Queries made on other threads (a decode pool) are not seen."""
        from django.core.files.uploadedfile import SimpleUploadedFile
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext

        client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {self.api.token}", HTTP_X_TENANT=TENANT_SLUG)
        counts: list[int] = []

        def upload(i: int) -> int:
            data = SimpleUploadedFile(f"q-{i}.jpg", self.pool[i % len(self.pool)], content_type="image/jpeg")
            with CaptureQueriesContext(connection) as queries:
                response = client.post("/api/v1/images/", {"file": data})
            if response.status_code != 201:
                raise RuntimeError(f"in-process upload answered {response.status_code}: {response.content[:300]}")
            counts.append(len(queries))
            return self.first_request([response.json()["id"]])

        def batch(request_id: int) -> int:
            with CaptureQueriesContext(connection) as queries:
                infer_in_process(request_id)
            return len(queries)

        infer_in_process(upload(0))  # first upload and batch: code paths and the model load, not counted
        counts.clear()
        one = batch(upload(1))
        eight_ids = [upload(2 + k) for k in range(8)]
        eight = batch(eight_ids[0])
        from recognition.models import InferenceRequest

        sizes = set(InferenceRequest.objects.filter(id__in=eight_ids).values_list("batch_size", flat=True))
        self.flush_broker()  # the uploads' own messages: nobody consumes them
        return {
            "upload": int(np.median(counts)),
            "upload_samples": counts,
            "upload_how": "POST /api/v1/images/ through Django's test client in this process",
            "batch_1": one,
            "batch_8": eight,
            "batch_8_size": max(sizes) if sizes else None,
            "batch_how": "workers.tasks.infer run in this process, CaptureQueriesContext",
        }

    # -- one model --------------------------------------------------------------------------------

    def model_section(self, plan: Plan, package: Path, version) -> dict:
        from django.conf import settings

        settings.SIGHTLINE_DEFAULT_MODEL = plan.name  # for the in-process uploads of the query counts
        manifest = version.manifest
        section: dict = {
            "key": plan.key,
            "model": plan.name,
            "package": package.name,
            "plan": plan.__dict__,
            "architecture": f"{manifest['architecture']} @ {manifest['input_size']} px",
            "raw": {},
            "engine": {},
            "full": {},
        }
        if not self.args.quick:  # the full run measures before and after the stack, and pools the trials
            before = set(RAW_BATCHES)
            self.measure_rates(section, package, version, {"raw": before, "engine": before}, again=set())
        self.source_ids = []
        self.start_stack(plan)
        try:
            for concurrency, samples in plan.full_samples.items():
                self.say(f"{plan.key}: full path, concurrency {concurrency} (≤ {samples} samples)")
                section["full"][f"c{concurrency}"] = self.closed_loop(concurrency, samples, self.limits.interactive_cap)
                self.drain()
            runs = []
            for n in plan.linear_n:
                self.say(f"{plan.key}: bulk path, {n:,} requests for stored images, one wake-up")
                runs.append(self.bulk_path(n, version))
                runs[-1]["cancelled_after"] = self.drain()
            section["linear"] = {"path": "bulk path: requests for stored images, one wake-up task", "runs": runs}
            rate = (reporting.bulk_run(section) or {}).get("images_per_s") or 10.0
            self.say(f"{plan.key}: interactive c1 and c8 during a bulk backlog")
            section["during_bulk"] = self.during_bulk(plan, version, rate)
        finally:
            with contextlib.suppress(Exception):
                self.drain(timeout=30)
            self.stop_stack()
        self.say(f"{plan.key}: query counts, in-process")
        section["queries"] = self.query_counts()
        bulk = reporting.bulk_run(section) or {}
        ran = {reporting.worker_batch(p) for p in section["full"].values()} | {bulk.get("median_batch")}
        ran = {b for b in ran if b}
        # --quick: the engine only where a ratio or a CPU figure reads it (the worker's batch sizes)
        engine = ran | ({1} if self.args.quick else set(RAW_BATCHES))
        again = set() if self.args.quick else set(RAW_BATCHES)
        self.measure_rates(section, package, version, {"raw": ran | set(RAW_BATCHES), "engine": engine}, again=again)
        return section


# ---------------------------------------------------------------------------------------------------
# Set-up


def build_packages(bench: Bench, keys: list[str]) -> dict[str, Path]:
    import torch
    import torchvision

    from workers.engine.package import write_package

    packages = {}
    for key in keys:
        if key == "demo":
            packages[key] = demo_package(bench)
            continue
        torch.manual_seed(0)
        model = torchvision.models.get_model(key, weights=None, num_classes=2)
        path = bench.workdir / "models" / f"bench-{key}-1.0.0.zip"
        write_package(
            path,
            model.state_dict(),
            name=f"bench-{key}",
            version="1.0.0",
            architecture=key,
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            labels=("a", "b"),
            description="benchmark only: random weights",
        )
        packages[key] = path
    return packages


def demo_package(bench: Bench) -> Path:
    from workers.engine import training

    for built in (
        ROOT / "var" / "models" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip",
        ROOT / "var" / "test-cache" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip",
    ):
        if built.exists():
            return built
    bench.say("the demo model is not built (var/models/): training it here, about 40 s on two cores")
    path = bench.workdir / "models" / built.name
    training.train_demo_model(path)
    return path


def render_pool(count: int) -> list[bytes]:
    """Distinct 224² RGB JPEGs of the synthetic textures (what the clients upload)."""
    from PIL import Image

    from workers.engine import synthetic

    rng = np.random.default_rng(1234)
    pool = []
    for i in range(count):
        buffer = io.BytesIO()
        gray = Image.fromarray(synthetic.render(rng, IMAGE_SIZE, i % 2 == 1))
        gray.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        pool.append(buffer.getvalue())
    return pool


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def start_redis(processes: Processes, workdir: Path, port: int, env: dict) -> None:
    folder = workdir / "redis"
    folder.mkdir()
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    redis_process = processes.start("redis", [*argv, "--appendonly", "no", "--dir", str(folder)], env)
    wait_for_port(port, redis_process, processes.log("redis"))


def run(args: argparse.Namespace, workdir: Path, processes: Processes) -> dict:
    started = time.monotonic()
    limits = (
        Limits(trial_seconds=0.3, rate_trials=2, interactive_cap=4.0, throughput_cap=20.0)
        if args.quick
        else Limits(trial_seconds=0.6, rate_trials=5, interactive_cap=30.0, throughput_cap=180.0)
    )
    all_plans = plans_for(args.quick)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in all_plans]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(all_plans)}")

    redis_port, web_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    password = secrets.token_urlsafe(16)
    common = {
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DJANGO_DEBUG": "false",  # DEBUG keeps every SQL query in memory: not what production runs
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
        "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",
        "REDIS_URL": redis_url,
        "SIGHTLINE_VAR_DIR": str(workdir),
        "SIGHTLINE_S3_BUCKET": "",  # local files in the temporary folder
        "SIGHTLINE_MAX_BATCH_SIZE": str(args.batch_size),
        "JWT_ACCESS_MINUTES": "240",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(common)
    os.environ["LOG_LEVEL"] = "WARNING"  # this process; the servers log as they would in production
    child_env = {**os.environ, **common, "LOG_LEVEL": "INFO"}
    start_redis(processes, workdir, redis_port, child_env)

    import django

    django.setup()
    import torch
    from django.conf import settings
    from django.core.management import call_command

    from accounts.models import Role
    from accounts.services import membership_grant, tenant_create, user_get_or_create
    from workers.engine.handler import configure_cpu_threads

    threads = configure_cpu_threads(int(os.environ.get("SIGHTLINE_TORCH_THREADS", "0")) or None)
    call_command("migrate", verbosity=0, interactive=False)
    tenant = tenant_create(name="Bench Hospital", slug=TENANT_SLUG)
    user = user_get_or_create(username=USERNAME, password=password)
    membership = membership_grant(tenant=tenant, user=user, role=Role.CLINICIAN)

    pool = render_pool(32)
    bench = Bench(
        args=args,
        limits=limits,
        workdir=workdir,
        processes=processes,
        child_env=child_env,
        redis_url=redis_url,
        web_port=web_port,
        password=password,
        pool=pool,
        meter=CpuMeter(processes),
        membership=membership,
        settle_budget=args.settle_budget,
    )
    bench.say(f"set-up in {workdir} (redis :{redis_port}, web :{web_port}); building model packages")
    packages = build_packages(bench, keys)
    versions = {key: register(packages[key]) for key in keys}

    report: dict = {
        "meta": {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "host": platform.node(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {
            "quick": args.quick,
            "models": keys,
            "SIGHTLINE_MAX_BATCH_SIZE": args.batch_size,
            "SIGHTLINE_MAX_WAIT_MS": settings.SIGHTLINE_MAX_WAIT_MS,
            "SIGHTLINE_INFERENCE_DEVICE": settings.SIGHTLINE_INFERENCE_DEVICE,
            "torch_threads": threads,
            "workers": "worker-interactive (-Q interactive,bulk) and worker-bulk (-Q maintenance,bulk, nice 10), "
            "celery -P prefork -c 1 each",
            "web": "uvicorn (one process), config.settings.local with DJANGO_DEBUG=false",
            "database": "SQLite (WAL) in a temporary folder",
            "broker": "private redis-server",
            "image": f"{IMAGE_SIZE}² RGB JPEG q{JPEG_QUALITY}, {len(pool)} distinct, "
            f"{round(np.mean([len(p) for p in pool]) / 1024)} KiB on average",
            "settle_seconds_per_phase": args.settle,
            "settle_budget_seconds": args.settle_budget,
            "quiet_means_others_below_cores": QUIET_CORES,
            "limits": limits.__dict__,
            "plans": {key: all_plans[key].__dict__ for key in keys},
        },
        "goals": reporting.GOALS,
        "models": {},
    }
    for key in keys:
        report["models"][key] = bench.model_section(all_plans[key], packages[key], versions[key])
    report["meta"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    report["goal_checks"] = reporting.goal_checks(report)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny N (under 5 minutes)")
    parser.add_argument("--models", default="resnet18,resnet50,demo", help="comma-separated: resnet18,resnet50,demo")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write results")
    parser.add_argument("--batch-size", type=int, default=16, help="SIGHTLINE_MAX_BATCH_SIZE of the workers")
    parser.add_argument(
        "--settle",
        type=float,
        help="before each phase, wait up to this many seconds for other processes to leave the CPUs "
        "(default 10, 0 with --quick)",
    )
    parser.add_argument("--settle-budget", type=float, default=60.0, help="most seconds of settling in the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, logs)")
    parser.add_argument(
        "--print", type=Path, metavar="JSON", help="print the tables of an earlier run's JSON, run nothing"
    )
    args = parser.parse_args()
    if args.print:
        report = json.loads(args.print.read_text())
        report["goal_checks"] = reporting.goal_checks(report)  # today's goals against that run's figures
        reporting.print_report(report)
        return 0
    if args.settle is None:
        args.settle = 0.0 if args.quick else 10.0

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    workdir = Path(tempfile.mkdtemp(prefix="sightline-bench-"))
    processes = Processes(workdir / "logs")
    keep = args.keep
    try:
        report = run(args, workdir, processes)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        keep = True
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        processes.stop_all()
        if keep:
            print(f"database and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    reporting.print_report(report)
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
