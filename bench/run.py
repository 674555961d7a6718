"""Sightline benchmark: the real stack (Daphne, a Celery worker, Redis, SQLite) against the raw pipeline.

    .venv/bin/python bench/run.py [--quick] [--models resnet18,resnet50,demo] [--json bench/results.json]
                                  [--settle SECONDS] [--keep]

A benchmark, not a test: it prints a table and writes JSON. Every figure comes from one run on one
machine, so that the ratios compare like with like. A busy machine does not slow everything alike,
though (torch's intra-op threads collapse when another process takes one of their cores), so each phase
records the cores other processes used meanwhile ("others" in the notes, ``noise`` in the JSON), the
limit keeps its quiet trials, phases wait a little for a quiet machine (--settle), and a goal verdict
that rests on a noisy phase is starred.

Per model (torchvision resnet18 and resnet50 with random weights at 224 px, and the demo model):

- limit: decode + preprocess + forward in a tight loop in this process (Handler.predict) at the worker's
  batch size, images/s; and one image at a time, ms (the raw single-image pipeline);
- queued: N bulk-priority requests created in this process (no broker messages), then one wake-up;
  worker throughput from the wake-up to the last result.ready;
- bulk: N uploads through POST /api/v1/images/ from a few client threads, from the first upload to the
  last result.ready;
- interactive: upload POST → result.ready latency, p50 and p99, at concurrency 1 and 8, idle and while a
  bulk backlog is being worked off;
- batching gain (resnet18): full-path throughput at concurrency 16 with SIGHTLINE_MAX_BATCH_SIZE 16 and 1.

Everything runs in a temporary folder (SQLite database, media, logs) with a private redis-server on a
free port; every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
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

STARTUP_SECONDS = 180
RESULT_TIMEOUT_SECONDS = 120
IMAGE_SIZE = 512
TENANT_SLUG = "bench-hospital"
USERNAME = "bench-clinician"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QUIET_CORES = 0.3  # other processes using less than this many cores: a quiet phase

GOALS = {
    "bulk_ratio_min": 0.8,
    "bulk_ratio_aim": 0.9,
    "interactive_c8_p99_ms_resnet18": 200.0,
    "c1_overhead_ms": 20.0,
    "during_bulk_p99_factor": 1.5,
}


# ---------------------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class Plan:
    key: str  # resnet18 | resnet50 | demo
    name: str  # the registry's model name (SIGHTLINE_DEFAULT_MODEL of the stack)
    bulk_n: int
    queued_n: int
    idle_samples: dict[int, int]  # concurrency → samples
    bulk_samples: dict[int, int]
    batching_n: int = 0  # images per setting for the batching gain; 0: skipped


def plans_for(quick: bool) -> dict[str, Plan]:
    if quick:
        return {
            "resnet18": Plan("resnet18", "bench-resnet18", 24, 24, {1: 8, 8: 16}, {1: 6, 8: 16}, batching_n=32),
            "resnet50": Plan("resnet50", "bench-resnet50", 12, 12, {1: 5, 8: 8}, {1: 4, 8: 8}),
            "demo": Plan("demo", "sightline-demo", 24, 24, {1: 8, 8: 16}, {1: 6, 8: 16}),
        }
    return {
        "resnet18": Plan("resnet18", "bench-resnet18", 200, 200, {1: 80, 8: 80}, {1: 40, 8: 80}, batching_n=128),
        "resnet50": Plan("resnet50", "bench-resnet50", 64, 64, {1: 40, 8: 48}, {1: 20, 8: 48}),
        "demo": Plan("demo", "sightline-demo", 200, 200, {1: 80, 8: 80}, {1: 40, 8: 80}),
    }


@dataclass(frozen=True)
class Limits:
    """Seconds per phase: closed-loop phases stop early at their cap, so a slow machine stays bounded."""

    trial_seconds: float  # one trial of the in-process limit
    limit_trials: int  # trials before the stack runs (max(2, this - 2) after it; more when too few are quiet)
    interactive_cap: float
    throughput_cap: float


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

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update({"Authorization": f"Bearer {self.token}", "X-Tenant": TENANT_SLUG})
        return session

    def upload(self, data: bytes, name: str) -> tuple[int, float, float]:
        """(image id, wall time the POST started, wall time its answer arrived)."""
        started = time.time()
        response = self._session().post(
            f"{self.base_url}/api/v1/images/", files={"file": (name, data, "image/png")}, timeout=RESULT_TIMEOUT_SECONDS
        )
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
    pool: list[bytes]  # uploaded bytes (generated PNGs)
    stored_pool: list[bytes]  # the same after the upload's re-encoding: what the worker decodes
    meter: CpuMeter
    membership: object = None
    api: Api | None = None
    events: Events | None = None
    settle_budget: float = 0.0  # seconds left for waiting on a quiet machine, the whole run
    worker_starts: itertools.count = field(default_factory=lambda: itertools.count(1))
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
        env = {**self.child_env, "SIGHTLINE_DEFAULT_MODEL": plan.name}
        from config.webserver import web_server_argv

        argv = web_server_argv(bin_dir=BIN, port=self.web_port)
        web = self.processes.start(f"web-{plan.key}", argv, env)
        self._web_name = f"web-{plan.key}"
        wait_for_port(self.web_port, web, self.processes.log(self._web_name))

    def start_worker(self, plan: Plan, max_batch: int) -> None:
        env = {**self.child_env, "SIGHTLINE_DEFAULT_MODEL": plan.name, "SIGHTLINE_MAX_BATCH_SIZE": str(max_batch)}
        name = f"worker-{plan.key}-b{max_batch}"
        argv = [
            str(BIN / "celery"),
            "-A",
            "workers.celery",
            "worker",
            "-P",
            "prefork",
            "-c",
            "1",
            "-Q",
            "interactive,bulk",
            "-n",
            f"bench{os.getpid()}-{next(self.worker_starts)}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "info",
        ]
        worker = self.processes.start(name, argv, env)
        self._worker_name = name
        wait_for_line(" ready.", worker, self.processes.log(name))

    def stop_worker(self) -> None:
        self.processes.stop(self._worker_name)

    def start_stack(self, plan: Plan) -> None:
        self.say(f"{plan.key}: starting uvicorn and a celery worker (SIGHTLINE_DEFAULT_MODEL={plan.name})")
        self.start_web(plan)
        self.start_worker(plan, self.args.batch_size)
        self.api = Api(f"http://127.0.0.1:{self.web_port}", USERNAME, self.password)
        self.events = Events(f"ws://127.0.0.1:{self.web_port}", self.api.token)
        self.warm_up()

    def stop_stack(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        self.processes.stop(getattr(self, "_web_name", ""))
        self.processes.stop(getattr(self, "_worker_name", ""))
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()  # no stale task or group for the next stack

    def warm_up(self) -> None:
        """The first requests load code paths, the model and the batch shapes: not measured."""
        for i in range(3):
            self.round_trip(i, timeout=STARTUP_SECONDS)
        burst = 4 if self.args.quick else 16
        with ThreadPoolExecutor(burst) as executor:
            list(executor.map(lambda i: self.round_trip(i, timeout=STARTUP_SECONDS), range(burst)))

    def round_trip(self, i: int, timeout: float = RESULT_TIMEOUT_SECONDS) -> dict:
        image_id, started, answered = self.api.upload(self.pool[i % len(self.pool)], f"img-{i}.png")
        arrived = self.events.wait(image_id, timeout)
        return {"image": image_id, "t0": started, "t_post": answered, "t_ws": arrived}

    # -- database helpers (main thread only) ------------------------------------------------------

    def request_rows(self, image_ids: list[int]) -> dict[int, dict]:
        from recognition.models import InferenceRequest

        rows = {}
        for start in range(0, len(image_ids), 500):
            chunk = image_ids[start : start + 500]
            for row in InferenceRequest.objects.filter(image_id__in=chunk).values(
                "image_id", "created", "started_at", "finished_at", "batch_size", "status", "priority"
            ):
                rows[row["image_id"]] = row
        return rows

    def drain(self, timeout: float = 180) -> int:
        """Cancel what is still queued, then wait until the worker holds nothing."""
        from django.utils import timezone

        from recognition.models import InferenceRequest

        status = InferenceRequest.Status
        cancelled = InferenceRequest.objects.filter(status=status.QUEUED).update(
            status=status.FAILED, error="cancelled by the benchmark", finished_at=timezone.now()
        )
        deadline = time.monotonic() + timeout
        while InferenceRequest.objects.filter(status=status.RUNNING).exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the worker still holds running requests; see the worker log")
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
                    image_id__in=list(pending), status__in=["queued", "running"]
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
        sizes = [r["batch_size"] for r in rows.values() if r["batch_size"]]
        if not sizes:
            return {}
        histogram: dict[int, int] = {}
        for size in sizes:
            histogram[size] = histogram.get(size, 0) + 1
        return {
            "mean_batch_per_image": round(float(np.mean(sizes)), 2),
            "batches": round(sum(1 / s for s in sizes)),
            "images_by_batch_size": {str(k): v for k, v in sorted(histogram.items())},
        }

    # -- measurements -----------------------------------------------------------------------------

    def measure_limit(
        self, package: Path, sha256: str, *, batch: int, trials: int, single: bool, compile_for: tuple[int, ...] = ()
    ) -> dict:
        """decode + preprocess + forward + postprocess in a tight loop (what Handler.predict does), as the
        worker would run it on its device, with no web, broker or database in the way.

        Measured in short trials, each tagged with the other processes' CPU use: the figure is the
        median of the quiet trials when there are enough of them, else of all (and says so)."""
        from django.conf import settings

        from workers.engine.handler import Handler, choose_device

        device = choose_device(settings.SIGHTLINE_INFERENCE_DEVICE)
        loading = time.perf_counter()
        handler = Handler.initialize(package, sha256, device=device, compile_for=compile_for)
        pool = self.stored_pool
        position = itertools.count()
        seconds = self.limits.trial_seconds
        result: dict = {"device": str(device), "batch_size": batch, "trial_seconds": seconds}
        if compile_for:
            result["compiled"] = handler.compiled
            result["load_and_compile_s"] = round(time.perf_counter() - loading, 1)

        def one_batch() -> tuple[float, float, float]:
            start = next(position) * batch
            items = [pool[(start + k) % len(pool)] for k in range(batch)]
            t0 = time.perf_counter()
            tensor, errors = handler.preprocess(items)
            t1 = time.perf_counter()
            probabilities = handler.infer(tensor)
            t2 = time.perf_counter()
            handler.postprocess(probabilities, errors)
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        def one_image() -> float:
            t0 = time.perf_counter()
            handler.predict([pool[next(position) % len(pool)]])
            return time.perf_counter() - t0

        result["settle"] = self.settle()
        with self.measured(result):
            one_batch()  # this shape's first pass
            runs = self.trials(one_batch, trials, seconds)
            chosen, result["quiet_trials"], enough = self.pick_quiet(runs)
            result["noisy"] = not enough
            rates = [batch * len(r["times"]) / sum(sum(t) for t in r["times"]) for r in chosen]
            result["images_per_s"] = round(float(np.median(rates)), 2)
            result["trials"] = [
                {
                    "images_per_s": round(batch * len(r["times"]) / sum(sum(t) for t in r["times"]), 2),
                    "others_cores": r["others_cores"],
                    "bench_cores": r["bench_cores"],
                }
                for r in runs
            ]
            result["cpu_ms_per_image"] = round(
                float(np.median([r["bench_cores"] / r["images_per_s"] * 1000 for r in result["trials"]])), 1
            )
            times = [t for r in chosen for t in r["times"]]
            result["decode_ms_per_image"] = median([t[0] * 1000 / batch for t in times])
            result["forward_ms_per_batch"] = median([t[1] * 1000 for t in times])
            if single:
                one_image()
                runs = self.trials(one_image, max(2, trials // 2), seconds)
                chosen, quiet, enough = self.pick_quiet(runs)
                result["single"] = summary([t * 1000 for r in chosen for t in r["times"]])
                result["single"]["quiet_trials"] = quiet
                result["single"]["noisy"] = not enough
                result["single"]["samples_ms"] = [round(t * 1000, 2) for r in runs for t in r["times"]]
        return result  # the handler goes with the closures

    def trials(self, call, count: int, seconds: float) -> list[dict]:
        """``count`` trials; on a noisy machine up to ``count`` more, until enough of them are quiet."""
        runs: list[dict] = []
        while len(runs) < count or (len(runs) < 2 * count and not self.pick_quiet(runs)[2]):
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
        deadline = time.monotonic() + cap + result["settle"]["waited_s"] + 0.5
        with self.measured(result), ThreadPoolExecutor(concurrency) as executor:
            for future in [executor.submit(client, k) for k in range(concurrency)]:
                future.result()
        done = [r for r in records if r["t_ws"] is not None]
        latencies = [(r["t_ws"] - r["t0"]) * 1000 for r in done]
        result.update(summary(latencies))
        result["lost"] = len(records) - len(done)
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

    def bulk_http(self, n: int) -> dict:
        """N uploads from a few client threads as fast as they go; first POST → last result.ready."""
        threads = self.args.client_threads
        result: dict = {"images": n, "client_threads": threads, "settle": self.settle()}
        deadline = time.monotonic() + self.limits.throughput_cap
        with self.measured(result):
            with ThreadPoolExecutor(threads) as executor:
                uploads = list(
                    executor.map(
                        lambda i: self.api.upload(self.pool[i % len(self.pool)], f"bulk-{i}.png"),
                        range(n),
                    )
                )
            ids = [u[0] for u in uploads]
            first = min(u[1] for u in uploads)
            last_post = max(u[2] for u in uploads)
            outcome = self.wait_results(ids, deadline)
        self._finish_throughput(result, outcome, first)
        result["uploads_per_s"] = round(n / (last_post - first), 2)
        result["post_ms"] = summary([(u[2] - u[1]) * 1000 for u in uploads])
        result["source_images"] = ids
        return result

    def queued(self, n: int) -> dict:
        """N bulk-priority requests created in this process with no broker message, then one wake-up:
        the worker's own throughput, without the web process competing."""
        from unittest import mock

        from django.core.files.uploadedfile import SimpleUploadedFile

        from recognition.models import InferenceRequest
        from recognition.services import images as image_services
        from recognition.services import inference

        create_bulk = functools.partial(inference.inference_request_create, priority=InferenceRequest.Priority.BULK)
        ids, started = [], time.perf_counter()
        with (
            mock.patch.object(inference, "_enqueue", lambda *a, **k: None),
            mock.patch.object(image_services, "inference_request_create", create_bulk),
        ):
            for i in range(n):
                upload = SimpleUploadedFile(f"queued-{i}.png", self.pool[i % len(self.pool)], content_type="image/png")
                ids.append(image_services.image_upload(membership=self.membership, upload=upload).pk)
        created_seconds = time.perf_counter() - started
        result: dict = {
            "images": n,
            "in_process_upload_ms_per_image": round(created_seconds * 1000 / n, 1),
        }
        result["settle"] = self.settle()
        deadline = time.monotonic() + self.limits.throughput_cap
        with self.measured(result):
            woken = time.time()
            inference.inference_requeue_waiting()  # the stack's REDIS_URL: one wake-up task
            outcome = self.wait_results(ids, deadline)
        rows = outcome["rows"]
        first_claim = min((r["started_at"].timestamp() for r in rows.values() if r["started_at"]), default=None)
        result["wake_to_first_claim_ms"] = round((first_claim - woken) * 1000, 1) if first_claim else None
        self._finish_throughput(result, outcome, woken)
        return result

    def _finish_throughput(self, result: dict, outcome: dict, start: float) -> None:
        rows = outcome.pop("rows")
        span = (outcome["end"] - start) if outcome["end"] else None
        result.update({k: v for k, v in outcome.items() if k != "end"})
        result["seconds"] = round(span, 2) if span else None
        result["images_per_s"] = round(outcome["completed"] / span, 2) if span else None
        result.update(self.batch_stats(rows))
        result["cpu_ms_per_image"] = cpu_per_image(result.get("noise", {}), outcome["completed"])

    def during_bulk(self, plan: Plan, version, source_ids: list[int], rate_hint: float) -> dict:
        """A bulk backlog big enough to outlast the interactive phases, woken once; interactive
        latency measured while the worker works it off (and how fast the backlog moved meanwhile)."""
        from recognition.services import inference

        phases = plan.bulk_samples
        span = (self.limits.interactive_cap + min(self.args.settle, self.settle_budget) + 1) * len(phases) + 20
        count = int(min(max(rate_hint * span * 1.3, 64), 8000))
        backlog = self.clone_backlog(source_ids, count, version)
        backlog_set = set(backlog)
        result: dict = {"backlog": count}
        inference.inference_requeue_waiting()
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

    def clone_backlog(self, source_ids: list[int], count: int, version, status: str = "queued") -> list[int]:
        """Bulk-priority requests for new image rows that reuse stored files (the bytes the worker
        reads are real uploads; only the rows are cloned, so a big backlog costs no upload time)."""
        from recognition.models import Image, InferenceRequest

        sources = list(Image.objects.filter(id__in=source_ids[:32]))
        images = []
        for i in range(count):
            src = sources[i % len(sources)]
            images.append(
                Image(
                    tenant_id=src.tenant_id,
                    study_id=src.study_id,
                    series_id=src.series_id,
                    file=src.file.name,
                    sha256=src.sha256,
                    width=src.width,
                    height=src.height,
                    format=src.format,
                    byte_size=src.byte_size,
                    uploaded_by_id=src.uploaded_by_id,
                )
            )
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

    def micro(self, version, source_ids: list[int]) -> dict:
        """Costs of single hops, measured in this process against the stack's Redis and database while
        the worker is idle (nothing here sends it a task)."""
        from unittest import mock

        from celery import current_app
        from django.core.files.base import ContentFile
        from django.core.files.uploadedfile import SimpleUploadedFile
        from django.test import Client
        from django.utils import timezone

        from accounts.events import send, tenant_group
        from recognition.models import InferenceRequest
        from recognition.services import inference
        from recognition.services.images import image_validate
        from workers.engine.handler import ItemResult
        from workers.tasks import infer

        def timed(call, repeat: int) -> float | None:
            timings = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                call()
                timings.append((time.perf_counter() - t0) * 1000)
            return median(timings)

        result: dict = {}
        with self.measured(result):
            uploads = iter(itertools.cycle(self.pool))
            result["upload_validate_reencode_ms"] = timed(lambda: image_validate(ContentFile(next(uploads))), 16)
            group = tenant_group(self.membership.tenant_id)
            message = {"type": "result.ready", "image": -1, "status": "done", "top_label": "", "probability": None}
            # what the worker does once per result, after commit
            result["channels_group_send_ms"] = timed(lambda: send(group, message), 30)
            assert current_app.conf.broker_url == self.redis_url, current_app.conf.broker_url
            # a queue nobody consumes
            result["celery_enqueue_ms"] = timed(lambda: infer.apply_async(args=[0], queue="bench-probe"), 30)

            # the upload view through Django's whole stack (middleware, JWT, DRF, multipart, service), in
            # this process with no server: the rest of the web process's time per upload is Daphne/ASGI
            client = Client(
                HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {self.api.token}", HTTP_X_TENANT=TENANT_SLUG
            )

            def post() -> None:
                upload = SimpleUploadedFile("probe.png", next(uploads), content_type="image/png")
                response = client.post("/api/v1/images/", {"file": upload})
                if response.status_code != 201:
                    raise RuntimeError(f"in-process upload answered {response.status_code}: {response.content[:300]}")

            with mock.patch.object(inference, "_enqueue", lambda *a, **k: None):  # the worker stays idle
                post()
                result["django_upload_view_ms"] = timed(post, 12)
            InferenceRequest.objects.filter(status="queued").update(
                status="failed", error="benchmark probe", finished_at=timezone.now()
            )

            # the worker's claim (window query + update) with 16 and with 2,000 bulk requests waiting
            for waiting in (16, 2000):
                clones = self.clone_backlog(source_ids, waiting, version)
                result[f"claim_16_of_{waiting}_waiting_ms"] = timed(
                    lambda: inference._claim(model_version_id=version.pk, limit=16), 1 if waiting == 16 else 5
                )
                InferenceRequest.objects.filter(image_id__in=clones).update(
                    status="failed", error="benchmark probe", finished_at=timezone.now()
                )

            # storing outcomes: one UPDATE and one Result row per request, then one group_send each
            outcome = ItemResult(probabilities={"a": 0.5, "b": 0.5}, top_label="a", top_probability=0.5)
            for size in (1, 16):
                timings = []
                for _ in range(3):
                    clones = self.clone_backlog(source_ids, size, version, status="running")
                    ids = list(InferenceRequest.objects.filter(image_id__in=clones).values_list("id", flat=True))
                    rows = inference._rows(ids)
                    t0 = time.perf_counter()
                    inference._store_outcomes(rows, [outcome] * size)
                    timings.append((time.perf_counter() - t0) * 1000)
                result[f"store_outcomes_batch_{size}_ms"] = median(timings)
        import redis

        redis.Redis.from_url(self.redis_url).delete("bench-probe", "_kombu.binding.bench-probe")
        return result

    # -- one model --------------------------------------------------------------------------------

    def model_section(self, plan: Plan, package: Path, version, first: bool) -> dict:
        from django.conf import settings

        settings.SIGHTLINE_DEFAULT_MODEL = plan.name  # for the in-process uploads of the queued variant
        section: dict = {"model": plan.name, "package": package.name, "plan": plan.__dict__}
        manifest = version.manifest
        section["architecture"] = f"{manifest['architecture']} @ {manifest['input_size']} px"
        trials = self.limits.limit_trials

        self.say(f"{plan.key}: limit (in-process Handler.predict, batch {self.args.batch_size} and 1)")
        section["limit_before"] = self.measure_limit(
            package, version.weights_sha256, batch=self.args.batch_size, trials=trials, single=True
        )
        if plan.key in self.args.compile.split(","):
            self.say(f"{plan.key}: limit with torch.compile (SIGHTLINE_TORCH_COMPILE), batch {self.args.batch_size}")
            section["limit_compiled"] = self.measure_limit(
                package,
                version.weights_sha256,
                batch=self.args.batch_size,
                trials=trials,
                single=True,
                compile_for=(1, self.args.batch_size),
            )
        self.start_stack(plan)
        try:
            section["interactive_idle"] = {}
            for concurrency, samples in plan.idle_samples.items():
                self.say(f"{plan.key}: interactive, idle, concurrency {concurrency} ({samples} samples)")
                section["interactive_idle"][f"c{concurrency}"] = self.closed_loop(
                    concurrency, samples, self.limits.interactive_cap
                )
            self.drain()

            self.say(f"{plan.key}: queued bulk ({plan.queued_n} requests created in-process, then one wake-up)")
            section["queued"] = self.queued(plan.queued_n)
            section["queued"]["cancelled_after"] = self.drain()

            self.say(f"{plan.key}: bulk through the API ({plan.bulk_n} uploads, {self.args.client_threads} threads)")
            section["bulk"] = self.bulk_http(plan.bulk_n)
            source_ids = section["bulk"].pop("source_images")
            section["bulk"]["cancelled_after"] = self.drain()
            if first:
                self.say(f"{plan.key}: single hops, in-process")
                section["micro"] = self.micro(version, source_ids)

            rate = section["queued"].get("images_per_s") or section["limit_before"]["images_per_s"]
            self.say(f"{plan.key}: interactive during a bulk backlog")
            section["interactive_during_bulk"] = self.during_bulk(plan, version, source_ids, rate)

            if plan.batching_n:
                section["batching"] = self.batching(plan)
        finally:
            with contextlib.suppress(Exception):
                self.drain(timeout=30)
            self.stop_stack()
        self.say(f"{plan.key}: limit again (batch {self.args.batch_size})")
        section["limit_after"] = self.measure_limit(
            package, version.weights_sha256, batch=self.args.batch_size, trials=max(2, trials - 2), single=False
        )
        # one figure from the trials before and after the stack ran: the quiet ones when there are enough
        runs = section["limit_before"]["trials"] + section["limit_after"]["trials"]
        chosen, section["limit_quiet_trials"], enough = self.pick_quiet(runs)
        section["limit_noisy"] = not enough
        section["limit_images_per_s"] = round(float(np.median([r["images_per_s"] for r in chosen])), 2)
        for key in ("queued", "bulk"):
            rate = section[key].get("images_per_s")
            section[key]["ratio_to_limit"] = round(rate / section["limit_images_per_s"], 3) if rate else None
        return section

    def batching(self, plan: Plan) -> dict:
        n, result = plan.batching_n, {"concurrency": 16, "images": plan.batching_n}
        for max_batch in (self.args.batch_size, 1):
            if max_batch != self.args.batch_size:
                self.say(f"{plan.key}: restarting the worker with SIGHTLINE_MAX_BATCH_SIZE={max_batch}")
                self.stop_worker()
                self.start_worker(plan, max_batch)
                self.warm_up()
            self.say(f"{plan.key}: batching gain, concurrency 16, SIGHTLINE_MAX_BATCH_SIZE={max_batch}")
            result[f"max_batch_{max_batch}"] = self.closed_loop(16, n, self.limits.throughput_cap)
            self.drain()
        with_batching = result[f"max_batch_{self.args.batch_size}"].get("images_per_s")
        without = result["max_batch_1"].get("images_per_s")
        result["gain"] = round(with_batching / without, 2) if with_batching and without else None
        return result


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

    built = ROOT / "var" / "models" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip"
    if built.exists():
        return built
    bench.say("the demo model is not built (var/models/): training it here, about 40 s on two cores")
    path = bench.workdir / "models" / built.name
    training.train_demo_model(path)
    return path


def render_pool(count: int) -> list[bytes]:
    from workers.engine import synthetic

    rng = np.random.default_rng(1234)
    return [synthetic.render_png(rng, IMAGE_SIZE, i % 2 == 1) for i in range(count)]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def run(args: argparse.Namespace, workdir: Path, processes: Processes) -> dict:
    started = time.monotonic()
    limits = (
        Limits(trial_seconds=0.3, limit_trials=3, interactive_cap=6.0, throughput_cap=30.0)
        if args.quick
        else Limits(trial_seconds=0.6, limit_trials=6, interactive_cap=30.0, throughput_cap=120.0)
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
        "JWT_ACCESS_MINUTES": "240",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(common)
    os.environ["LOG_LEVEL"] = "WARNING"  # this process; the servers log as they would in production
    child_env = {**os.environ, **common, "LOG_LEVEL": "INFO"}

    redis_log_dir = workdir / "redis"
    redis_log_dir.mkdir()
    argv = [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(redis_log_dir)]
    redis_process = processes.start("redis", argv, child_env)
    wait_for_port(redis_port, redis_process, processes.log("redis"))

    import django

    django.setup()
    import torch
    from django.conf import settings
    from django.core.management import call_command

    from accounts.models import Role
    from accounts.services import membership_grant, tenant_create, user_get_or_create
    from recognition.services.images import image_validate
    from recognition.services.registry import model_version_register
    from workers.engine.handler import configure_cpu_threads

    threads = configure_cpu_threads(int(os.environ.get("SIGHTLINE_TORCH_THREADS", "0")) or None)
    call_command("migrate", verbosity=0, interactive=False)
    tenant = tenant_create(name="Bench Hospital", slug=TENANT_SLUG)
    user = user_get_or_create(username=USERNAME, password=password)
    membership = membership_grant(tenant=tenant, user=user, role=Role.CLINICIAN)

    cuda = torch.cuda.is_available()
    pool = render_pool(64 if cuda else 32)
    from django.core.files.base import ContentFile

    stored_pool = [image_validate(ContentFile(data)).content for data in pool]
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
        stored_pool=stored_pool,
        meter=CpuMeter(processes),
        membership=membership,
        settle_budget=args.settle_budget,
    )
    bench.say(f"set-up in {workdir} (redis :{redis_port}, web :{web_port}); building model packages")
    packages = build_packages(bench, keys)
    versions = {key: model_version_register(package_path=packages[key])[0] for key in keys}

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
            "cuda": torch.cuda.get_device_name(0) if cuda else None,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": {
            "quick": args.quick,
            "models": keys,
            "SIGHTLINE_MAX_BATCH_SIZE": args.batch_size,
            "SIGHTLINE_MAX_WAIT_MS": settings.SIGHTLINE_MAX_WAIT_MS,
            "SIGHTLINE_DECODE_THREADS": settings.SIGHTLINE_DECODE_THREADS,
            "SIGHTLINE_MAX_BATCHES_PER_TASK": settings.SIGHTLINE_MAX_BATCHES_PER_TASK,
            "SIGHTLINE_INFERENCE_DEVICE": settings.SIGHTLINE_INFERENCE_DEVICE,
            "torch_threads": threads,
            "worker": "celery -P prefork -c 1 -Q interactive,bulk",
            "web": "uvicorn (one process), config.settings.local with DJANGO_DEBUG=false",
            "database": "SQLite (WAL) in a temporary folder",
            "broker": "private redis-server",
            "image": f"{IMAGE_SIZE}x{IMAGE_SIZE} grayscale PNG (workers.engine.synthetic.render_png), "
            f"{len(pool)} distinct, {round(np.mean([len(p) for p in pool]) / 1024)} KiB on average",
            "client_threads_bulk": args.client_threads,
            "settle_seconds_per_phase": args.settle,
            "settle_budget_seconds": args.settle_budget,
            "quiet_means_others_below_cores": QUIET_CORES,
            "limits": limits.__dict__,
            "plans": {key: all_plans[key].__dict__ for key in keys},
        },
        "goals": GOALS,
        "models": {},
    }
    for index, key in enumerate(keys):
        report["models"][key] = bench.model_section(all_plans[key], packages[key], versions[key], first=index == 0)
    if cuda:
        report["cuda"] = cuda_section(bench, packages, versions)
    report["meta"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    report["goal_checks"] = goal_checks(report)
    return report


def cuda_section(bench: Bench, packages: dict[str, Path], versions: dict) -> dict:
    """Engine only, on the GPU: decode + forward and forward alone, by batch size."""
    import torch

    from workers.engine.handler import Handler

    section = {}
    for key, package in packages.items():
        handler = Handler.initialize(package, versions[key].weights_sha256, device=torch.device("cuda"))
        rows = []
        for batch in (1, 16, 64):
            items = [bench.stored_pool[k % len(bench.stored_pool)] for k in range(batch)]
            handler.predict(items)
            tensor, _ = handler.preprocess(items)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < bench.limits.trial_seconds * 2 or count == 0:
                handler.predict(items)
                count += batch
            full = count / (time.perf_counter() - started)
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < bench.limits.trial_seconds * 2 or count == 0:
                handler.infer(tensor)  # returns on the CPU: synchronised
                count += batch
            forward = count / (time.perf_counter() - started)
            rows.append(
                {"batch_size": batch, "images_per_s": round(full, 1), "forward_only_images_per_s": round(forward, 1)}
            )
        section[key] = {"device": torch.cuda.get_device_name(0), "rows": rows}
        del handler
        gc.collect()
        torch.cuda.empty_cache()
    return section


# ---------------------------------------------------------------------------------------------------
# Goals and output


def _noisy(result: dict) -> bool:
    return (result.get("noise", {}).get("others_cores") or 0.0) >= QUIET_CORES


def goal_checks(report: dict) -> list[dict]:
    """Each goal of the issue against this run; ``noisy``: a phase behind the figure ran while other
    processes used the CPUs (or the limit found too few quiet trials), so the verdict is not to be trusted."""
    checks = []

    def check(model: str, goal: str, measured, passed: bool, noisy: bool) -> None:
        checks.append({"model": model, "goal": goal, "measured": measured, "passed": passed, "noisy": noisy})

    for key, section in report["models"].items():
        for variant in ("bulk", "queued"):
            ratio = section[variant].get("ratio_to_limit")
            check(
                key,
                f"{variant} ≥ {GOALS['bulk_ratio_min']} × limit (aim {GOALS['bulk_ratio_aim']})"
                + ("" if variant == "bulk" else " [worker only, not the issue's goal]"),
                ratio,
                ratio is not None and ratio >= GOALS["bulk_ratio_min"],
                section["limit_noisy"] or _noisy(section[variant]),
            )
        single = section["limit_before"]["single"]
        idle = section["interactive_idle"]
        if idle.get("c1", {}).get("p50_ms") is not None:
            overhead = round(idle["c1"]["p50_ms"] - single["p50_ms"], 1)
            check(
                key,
                f"c1 p50 within {GOALS['c1_overhead_ms']:.0f} ms of the raw single image ({single['p50_ms']} ms)",
                overhead,
                overhead <= GOALS["c1_overhead_ms"],
                single["noisy"] or _noisy(idle["c1"]),
            )
        if key == "resnet18" and idle.get("c8", {}).get("p99_ms") is not None:
            p99 = idle["c8"]["p99_ms"]
            check(
                key,
                f"interactive c8 p99 < {GOALS['interactive_c8_p99_ms_resnet18']:.0f} ms",
                p99,
                p99 < GOALS["interactive_c8_p99_ms_resnet18"],
                _noisy(idle["c8"]),
            )
        during = section["interactive_during_bulk"]
        for name in ("c1", "c8"):
            if during.get(name, {}).get("p99_ms") is None or idle.get(name, {}).get("p99_ms") is None:
                continue
            factor = round(during[name]["p99_ms"] / idle[name]["p99_ms"], 2)
            check(
                key,
                f"{name} p99 during bulk ≤ {GOALS['during_bulk_p99_factor']} × idle p99",
                factor,
                factor <= GOALS["during_bulk_p99_factor"],
                _noisy(during[name]) or _noisy(idle[name]),
            )
    return checks


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cpu(result: dict, section: dict) -> str:
    cpu = result.get("cpu_ms_per_image") or {}
    if not cpu:
        return ""
    parts = " + ".join(f"{name} {cpu[name]:.0f}" for name in ("web", "worker", "redis", "client") if name in cpu)
    limit = section["limit_before"].get("cpu_ms_per_image")
    return f"; CPU/img {parts} = {cpu['total']:.0f} core-ms (limit {_fmt(limit, 0)})"


def _noise(result: dict) -> str:
    others = result.get("noise", {}).get("others_cores")
    return f"; others used {others:.1f} cores" if others and others >= 0.25 else ""


def table_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for key, s in report["models"].items():
        lb, la = s["limit_before"], s["limit_after"]
        limit = s["limit_images_per_s"]
        rows.append(
            (
                key,
                f"limit, batch {lb['batch_size']} (decode+forward)",
                _fmt(limit),
                "img/s",
                ("NOISY: too few quiet trials, " if s["limit_noisy"] else "")
                + f"quiet trials {s['limit_quiet_trials']} (before {_fmt(lb['images_per_s'])}, after "
                f"{_fmt(la['images_per_s'])}); decode {_fmt(lb['decode_ms_per_image'])} ms/img, forward "
                f"{_fmt(lb['forward_ms_per_batch'])} ms/batch; {_fmt(lb.get('cpu_ms_per_image'), 0)} core-ms/img",
            )
        )
        compiled = s.get("limit_compiled")
        if compiled:
            gain = compiled["images_per_s"] / lb["images_per_s"] if lb["images_per_s"] else None
            single_gain = lb["single"]["p50_ms"] / compiled["single"]["p50_ms"] if compiled.get("single") else None
            rows.append(
                (
                    key,
                    f"limit with torch.compile, batch {compiled['batch_size']}",
                    _fmt(compiled["images_per_s"]),
                    "img/s",
                    ("NOT COMPILED (fell back to eager); " if not compiled.get("compiled") else "")
                    + f"{_fmt(gain, 2)} × eager; single image p50 {_fmt(compiled['single']['p50_ms'])} ms "
                    f"({_fmt(single_gain, 2)} × faster); load + compile {_fmt(compiled['load_and_compile_s'])} s"
                    + (" NOISY" if compiled.get("noisy") else ""),
                )
            )
        single = lb["single"]
        rows.append(
            (
                key,
                "limit, single image p50",
                _fmt(single["p50_ms"]),
                "ms",
                f"p99 {_fmt(single['p99_ms'])}, n={single['n']}, quiet trials {single['quiet_trials']}",
            )
        )
        q = s["queued"]
        rows.append(
            (
                key,
                "queued bulk (worker only)",
                _fmt(q.get("images_per_s")),
                "img/s",
                f"{_fmt(q.get('ratio_to_limit'), 2)} × limit; n={q['images']}, mean batch "
                f"{_fmt(q.get('mean_batch_per_image'))}; wake→claim {_fmt(q.get('wake_to_first_claim_ms'))} ms; "
                f"in-process upload {_fmt(q['in_process_upload_ms_per_image'])} ms/img" + _cpu(q, s) + _noise(q),
            )
        )
        b = s["bulk"]
        rows.append(
            (
                key,
                "bulk via API (full path)",
                _fmt(b.get("images_per_s")),
                "img/s",
                f"{_fmt(b.get('ratio_to_limit'), 2)} × limit (goal ≥ 0.8); n={b['images']}, "
                f"{b['client_threads']} threads; uploads {_fmt(b['uploads_per_s'])} img/s, "
                f"POST p50 {_fmt(b['post_ms'].get('p50_ms'))} ms; mean batch {_fmt(b.get('mean_batch_per_image'))}"
                + _cpu(b, s)
                + _noise(b),
            )
        )
        for label, group in (("idle", s["interactive_idle"]), ("during bulk", s["interactive_during_bulk"])):
            for name in ("c1", "c8"):
                r = group.get(name)
                if not r or not r.get("n"):
                    continue
                extra, p50_note = "", ""
                if label == "during bulk":
                    extra = f"; bulk moved {_fmt(r['bulk_images_per_s_meanwhile'])} img/s meanwhile"
                    idle_p99 = s["interactive_idle"].get(name, {}).get("p99_ms")
                    if idle_p99:
                        extra += f"; {r['p99_ms'] / idle_p99:.2f} × idle p99 (goal ≤ {GOALS['during_bulk_p99_factor']})"
                    if r.get("bulk_ran_out"):
                        extra += "; BACKLOG RAN OUT"
                elif name == "c1":
                    over = r["p50_ms"] - s["limit_before"]["single"]["p50_ms"]
                    p50_note = f"; {over:+.1f} ms over the raw single image (goal ≤ {GOALS['c1_overhead_ms']:.0f})"
                elif key == "resnet18":
                    extra = f" (goal p99 < {GOALS['interactive_c8_p99_ms_resnet18']:.0f} ms)"
                conc = name[1:]
                rows.append(
                    (
                        key,
                        f"interactive c{conc} {label} p50",
                        _fmt(r["p50_ms"]),
                        "ms",
                        f"n={r['n']}, lost {r['lost']}" + ("; capped" if r.get("capped") else "") + p50_note,
                    )
                )
                rows.append(
                    (
                        key,
                        f"interactive c{conc} {label} p99",
                        _fmt(r["p99_ms"]),
                        "ms",
                        f"{_fmt(r.get('images_per_s'))} img/s, mean batch {_fmt(r.get('mean_batch_per_image'))}"
                        + extra
                        + _noise(r),
                    )
                )
        if "batching" in s:
            bt = s["batching"]
            for setting in (f"max_batch_{report['settings']['SIGHTLINE_MAX_BATCH_SIZE']}", "max_batch_1"):
                r = bt[setting]
                rows.append(
                    (
                        key,
                        f"c16 full path, {setting.replace('_', ' ')}",
                        _fmt(r.get("images_per_s")),
                        "img/s",
                        f"p50 {_fmt(r.get('p50_ms'))} ms, p99 {_fmt(r.get('p99_ms'))} ms, mean batch "
                        f"{_fmt(r.get('mean_batch_per_image'))}, n={r.get('n')}" + _noise(r),
                    )
                )
            rows.append((key, "batching gain (16 vs 1)", _fmt(bt.get("gain"), 2), "×", ""))
    for key, section in report.get("cuda", {}).items():
        for row in section["rows"]:
            rows.append(
                (
                    key,
                    f"CUDA engine, batch {row['batch_size']}",
                    _fmt(row["images_per_s"]),
                    "img/s",
                    f"forward only {_fmt(row['forward_only_images_per_s'])} img/s ({section['device']})",
                )
            )
    return rows


def print_report(report: dict) -> None:
    rows = table_rows(report)
    headers = ("model", "measurement", "value", "unit", "ratio / notes")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:4])]
    line = "  ".join(h.ljust(w) for h, w in zip(headers[:4], widths, strict=True)) + "  " + headers[4]
    meta, cfg = report["meta"], report["settings"]
    print()
    print(
        f"Sightline benchmark, {meta['started']}, commit {meta['git_commit'][:12]}, {meta['cpu_affinity']} cores, "
        f"torch {meta['torch']} ({cfg['torch_threads']} threads), "
        f"{'CUDA ' + meta['cuda'] if meta['cuda'] else 'CPU'}; max batch {cfg['SIGHTLINE_MAX_BATCH_SIZE']}, "
        f"max wait {cfg['SIGHTLINE_MAX_WAIT_MS']} ms; {'QUICK run, tiny N' if cfg['quick'] else 'full run'}"
    )
    print(line)
    print("-" * len(line))
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            print()
        previous = row[0]
        print(
            "  ".join(
                [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].ljust(widths[3])]
            )
            + "  "
            + row[4]
        )
    print()
    print("Where the time goes, interactive uploads (medians, ms, from client clocks and the request rows):")
    print(
        f"  {'model':<9} {'phase':<14} {'POST ans.':>9} {'POST→row':>9} {'row→claim':>9} {'claim→done':>10} "
        f"{'done→msg':>9}  {'p50':>7}"
    )
    print(
        f"  {'':<9} {'':<14} {'':>9} {'(upload)':>9} {'(broker)':>9} {'(fwd)':>10} {'(notify)':>9}"
        "  (row→claim: commit, enqueue, worker pick-up, claim; claim→done: read, decode, forward)"
    )
    for key, s in report["models"].items():
        for label, group, name in (
            ("idle c1", "interactive_idle", "c1"),
            ("idle c8", "interactive_idle", "c8"),
            ("bulk c1", "interactive_during_bulk", "c1"),
        ):
            r = s[group].get(name, {})
            b = r.get("breakdown_ms", {})
            print(
                f"  {key:<9} {label:<14} {_fmt(b.get('post_answer')):>9} {_fmt(b.get('post_to_row')):>9} "
                f"{_fmt(b.get('row_to_claim')):>9} {_fmt(b.get('claim_to_finish')):>10} "
                f"{_fmt(b.get('finish_to_message')):>9}  {_fmt(r.get('p50_ms')):>7}"
                + (f"   (raw single image {_fmt(s['limit_before']['single']['p50_ms'])})" if label == "idle c1" else "")
            )
    first = next(iter(report["models"].values()), {})
    if "micro" in first:
        m = first["micro"]
        print(
            f"  single hops in-process: upload validate+re-encode {_fmt(m['upload_validate_reencode_ms'])} ms; "
            f"whole upload view in-process (Django test client) {_fmt(m.get('django_upload_view_ms'))} ms; "
            f"celery enqueue {_fmt(m['celery_enqueue_ms'])} ms; "
            f"channels group_send {_fmt(m['channels_group_send_ms'])} ms"
        )
        print(
            f"  worker claim of 16: {_fmt(m['claim_16_of_16_waiting_ms'])} ms with 16 waiting, "
            f"{_fmt(m['claim_16_of_2000_waiting_ms'])} ms with 2,000 waiting; store outcomes + notify: "
            f"{_fmt(m['store_outcomes_batch_1_ms'])} ms for 1, {_fmt(m['store_outcomes_batch_16_ms'])} ms for 16"
        )
    print()
    print("Goals (from the issue)")
    for check in report["goal_checks"]:
        state = ("PASS" if check["passed"] else "FAIL") + ("*" if check["noisy"] else " ")
        print(f"  {state} {check['model']:<9} {check['goal']}: measured {_fmt(check['measured'], 2)}")
    if any(check["noisy"] for check in report["goal_checks"]):
        print(
            f"  * other processes used ≥ {QUIET_CORES} cores during a phase behind this figure (or the limit found "
            "too few quiet trials): run again on a quiet machine before trusting it"
        )
    print(
        f"\nload average {meta['load_average_at_start']} at start, {meta['load_average_at_end']} at end; "
        f"{meta['seconds']} s in all"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run with tiny N")
    parser.add_argument("--models", default="resnet18,resnet50,demo", help="comma-separated: resnet18,resnet50,demo")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json", help="where to write results")
    parser.add_argument("--batch-size", type=int, default=16, help="SIGHTLINE_MAX_BATCH_SIZE of the worker and limit")
    parser.add_argument(
        "--compile",
        default="resnet18",
        help="models whose limit is measured again with torch.compile (comma-separated; empty: none)",
    )
    parser.add_argument("--client-threads", type=int, default=4, help="upload threads of the bulk-through-API phase")
    parser.add_argument(
        "--settle",
        type=float,
        help="before each phase, wait up to this many seconds for other processes to leave the CPUs "
        "(default 10, 0 with --quick)",
    )
    parser.add_argument("--settle-budget", type=float, default=60.0, help="most seconds of settling in the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, logs)")
    args = parser.parse_args()
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
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
