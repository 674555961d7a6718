"""The Celery app. Start a worker with ``celery -A workers.celery worker``."""

import faulthandler
import logging
import os
import signal
import sys
import time

import celery.apps.worker as celery_worker_app
from celery import Celery
from celery.signals import (
    before_task_publish,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from django.db import close_old_connections

from core.logging import MS_PER_SECOND, bind_request_id, current_request_id, process_role, unbind_request_id
from workers.bootsteps import BulkWhenIdle, GpuBackPressure

# production by default, like the web process: a worker started bare refuses to start without its
# secrets (the pseudonym key above all) instead of hashing patients with a development key
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
# before torch loads OpenMP: threads that finish a parallel region sleep instead of spinning. With
# two lane workers (and the web) sharing cores, spinning threads steal the core another process's
# forward pass waits for: measured on 2 cores under load, eager resnet18 ran 4.0 img/s passive
# against 0.9 spinning at batch 1 (workers/engine/bench.py --backends)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

NUMPY_SEED_LIMIT = 2**32  # numpy's legacy seed is a 32-bit unsigned integer
REQUEST_ID_HEADER = "sightline_request_id"  # the publishing request's id, for the task's log lines

app = Celery("sightline", include=["workers.tasks", "protocols.tasks", "dicomnet.tasks"])
app.config_from_object("django.conf:settings", namespace="CELERY")
# Celery's Django fixup closes every database connection before and after each task unless this is
# set: each task (a wake-up, then a batch) opened a new connection (SQLite: 6% of a worker's CPU at
# batch 1; PostgreSQL: a TCP and auth handshake and a new server process each time). Connections are
# kept under Django's own rules instead (CONN_MAX_AGE, CONN_HEALTH_CHECKS), checked around each task
# as Django checks them around each request (_task_started, _task_finished); the fixup still closes
# them all once every DB_REUSE_TASKS tasks.
DB_REUSE_TASKS = 10_000
app.conf.CELERY_DB_REUSE_MAX = DB_REUSE_TASKS
# a worker whose GPU stays busy stops taking tasks until it cools down (no-op without a GPU)
app.steps["consumer"].add(GpuBackPressure)
# the interactive lane takes bulk work only after SIGHTLINE_INTERACTIVE_IDLE_SECONDS without a read
app.steps["consumer"].add(BulkWhenIdle)

task_log = logging.getLogger("sightline.task")
# Python warnings (Celery's own, when it starts) become log lines: through LOGGING's handler, not
# bare text on stderr
logging.captureWarnings(True)


def _say_as_a_log_line(message, f=None):
    """Celery prints its shutdown notices ("worker: Warm shutdown") straight to stdout, the one
    text line left in a JSON log; they become log lines. Called from a signal handler: logging's
    handler lock is re-entrant, so a line being written when the signal lands cannot deadlock it."""
    logging.getLogger("celery.apps.worker").info(str(message).strip())


celery_worker_app.safe_say = _say_as_a_log_line


@setup_logging.connect
def _keep_django_logging(**_kwargs):
    """Connected, so Celery leaves the root logger alone: Django's LOGGING (JSON or plain, the
    settings') is every worker's and beat's configuration too."""


@before_task_publish.connect
def _carry_request_id(sender=None, headers=None, **_kwargs):
    """The current request's id (or task's) travels in a message header; beat logs each send."""
    request_id = current_request_id()
    if headers is not None and request_id:
        headers.setdefault(REQUEST_ID_HEADER, request_id)
    if process_role() == "beat":
        task_log.info(
            "task %s sent",
            sender,
            extra={
                "task": sender,
                "task_id": (headers or {}).get("id"),
                "request_id": request_id or (headers or {}).get("id"),
            },
        )


_running: dict[str, tuple[float, object]] = {}


@task_prerun.connect
def _task_started(task_id=None, task=None, **_kwargs):
    if not _eager(task):  # an eager task runs inside its caller's connection and transaction
        close_old_connections()  # one that errored or outlived CONN_MAX_AGE: a new one for this task
    request = task.request if task is not None else None
    request_id = getattr(request, REQUEST_ID_HEADER, None) or (getattr(request, "headers", None) or {}).get(
        REQUEST_ID_HEADER
    )
    _running[task_id] = (time.perf_counter(), bind_request_id(request_id or task_id))


@task_postrun.connect
def _task_finished(task_id=None, task=None, state=None, **_kwargs):
    started, token = _running.pop(task_id, (None, None))
    task_log.info(
        "task %s %s",
        getattr(task, "name", "?"),
        state,
        extra={
            "task": getattr(task, "name", None),
            "task_id": task_id,
            "request_id": current_request_id() or task_id,
            "state": state,
            "runtime_ms": round((time.perf_counter() - started) * MS_PER_SECOND, 1) if started is not None else None,
        },
    )
    if token is not None:
        unbind_request_id(token)
    if not _eager(task):
        close_old_connections()


def _eager(task) -> bool:
    return bool(getattr(getattr(task, "request", None), "is_eager", False))


def worker_torch_threads(threads: int = 0, cores: int | None = None) -> int:
    """Intra-op threads for a worker process: ``threads`` if set (SIGHTLINE_TORCH_THREADS), else
    every core it may run on, in either lane. The bulk lane yields by its CPU priority (``nice
    10``, in the Procfile: about 1/9 of a core's time against a busy interactive thread), not by
    fewer threads: with half the cores it left one of two cores idle whenever no clinician waited.
    Measured on two cores (bench/run.py, resnet18, paired runs): the bulk path moved 51 and 60
    img/s with every core against 45 and 35 with half; interactive p99 during a bulk backlog
    stayed where it was in those pairs (c1 218/274 ms against 211/227, c8 508/554 against
    516/550), though a full run afterwards measured c8 747 (README, "Benchmark"). The
    backends never spin (OMP_WAIT_POLICY above, ONNX Runtime's allow_spinning off), so a bulk
    thread that waits for the CPU costs the interactive pass nothing."""
    if threads:
        return threads
    return cores or len(os.sched_getaffinity(0))


@worker_process_init.connect
def _warm_up(**_kwargs):
    """Each pool process loads the production model before it takes work (≈3.5 s otherwise)."""
    import numpy as np
    import torch
    from django.conf import settings

    from workers.engine.handler import configure_cpu_threads
    from workers.runner import inference_warm_up

    # forked children share the parent's RNG state; none of ours needs it, but keep them apart
    seed = os.getpid()
    torch.manual_seed(seed)
    np.random.seed(seed % NUMPY_SEED_LIMIT)
    configure_cpu_threads(worker_torch_threads(settings.SIGHTLINE_TORCH_THREADS))
    # a pool process that seems stuck: ``kill -USR2 <pid>`` writes every thread's stack to the
    # worker's own stderr (its log) and the process goes on (the main process has SIGUSR1, Celery's)
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    try:
        inference_warm_up()
    except Exception:  # the first task will try again and record the error per request
        import logging

        logging.getLogger(__name__).exception("warm-up failed")
    from accounts.events import use_background_loop
    from recognition.health import start_heartbeat
    from workers.model_cache import loaded_models

    use_background_loop()  # this process's pushes keep one Redis connection

    start_heartbeat(loaded_models)


@worker_process_shutdown.connect
def _flush_pushes(**_kwargs):
    """A pool process leaving (a restart, the pool shrinking) first lets its notifications go out:
    they are handed to the background loop and not waited for (accounts.events)."""
    from accounts.events import flush

    if not flush():
        logging.getLogger(__name__).warning("notifications still waiting at shutdown were dropped")


@worker_ready.connect
def _recover(**_kwargs):
    """After a crash or restart: requests this host's dead processes left running go back to the
    queue (or fail after their last attempt), and every version with waiting work gets a wake-up."""
    from django.db import connections

    from workers.queue_policy import reclaim_orphans, requeue_waiting

    reclaim_orphans()
    requeue_waiting()
    # the main process holds no database connection a pool process forked later could inherit
    connections.close_all()
