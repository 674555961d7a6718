"""A task for the lane tests, loaded into real workers with ``--include``: it says which worker
ran it (lane, pid, CPU priority, torch threads) in a Redis list, optionally after holding its
worker until the test opens a gate, so the tests order events by the broker, never by time."""

from __future__ import annotations

import json
import os
import time

import redis
from celery import shared_task
from django.conf import settings

RAN = "lane-probe:ran"
STARTED = "lane-probe:started"
HOLD_LIMIT_SECONDS = 120  # a gate the test never opened (it failed) lets the worker go


@shared_task(name="tests.lane_probe.record")
def record(token: str, gate: str = "") -> None:
    import torch

    client = redis.Redis.from_url(settings.REDIS_URL)
    entry = {
        "token": token,
        "lane": settings.SIGHTLINE_WORKER_LANE,
        "pid": os.getpid(),
        "nice": os.nice(0),
        "threads": torch.get_num_threads(),
        "began": time.time(),
    }
    if gate:
        client.rpush(STARTED, json.dumps(entry))
        client.blpop([gate], timeout=HOLD_LIMIT_SECONDS)
    client.rpush(RAN, json.dumps(entry))
