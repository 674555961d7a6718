"""Readiness and Prometheus metrics. Worker heartbeats live in Redis with a short expiry."""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, Sum
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from config.errors import error_body

from .models import InferenceRequest, Result

logger = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "sightline:worker:"
HEARTBEAT_SECONDS = 15
HEARTBEAT_TTL = 45  # three missed beats and the worker counts as gone
QUEUES = ("interactive", "bulk")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)


def heartbeat(models: list[str], device: str) -> None:
    """Called in a worker process: 'alive, serving these model packages'."""
    key = f"{HEARTBEAT_PREFIX}{socket.gethostname()}:{os.getpid()}"
    payload = {"models": models, "device": device, "at": time.time()}
    _redis().set(key, json.dumps(payload), ex=HEARTBEAT_TTL)


def start_heartbeat(read_models) -> None:
    """A daemon thread in the worker process; ``read_models()`` returns (models, device)."""

    def beat():
        while True:
            try:
                heartbeat(*read_models())
            except Exception:  # Redis away: the beat resumes with it; readiness reports it meanwhile
                logger.debug("heartbeat not written", exc_info=True)
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def workers_alive() -> list[dict]:
    client = _redis()
    keys = list(client.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=100))
    return [json.loads(value) for value in client.mget(keys) if value] if keys else []


def readiness() -> tuple[bool, dict]:
    checks: dict[str, dict] = {}
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    try:
        _redis().ping()
        checks["broker"] = {"ok": True}
    except Exception as exc:
        checks["broker"] = {"ok": False, "error": type(exc).__name__}
    from .services.inference import _default_production_version

    production = _default_production_version() if checks["database"]["ok"] else None
    if production is None:
        checks["worker"] = {"ok": False, "error": "no production model is registered"}
    elif not checks["broker"]["ok"]:
        checks["worker"] = {"ok": False, "error": "broker unreachable"}
    else:
        serving = [w for w in workers_alive() if production.weights_sha256 in w.get("models", [])]
        checks["worker"] = {"ok": bool(serving), "workers": len(serving), "model": str(production)}
    return all(check["ok"] for check in checks.values()), checks


class SightlineCollector:
    """Computed at scrape time from Redis and the database, so every web replica reports the
    same numbers and workers need no metrics server of their own."""

    def collect(self):
        depth = GaugeMetricFamily("sightline_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        try:
            client = _redis()
            for queue in QUEUES:
                depth.add_metric([queue], client.llen(queue))
        except redis.RedisError:
            pass
        yield depth

        states = GaugeMetricFamily("sightline_inference_requests", "Inference requests by state", labels=["status"])
        for status, count in InferenceRequest.objects.values_list("status").annotate(n=Count("id")):
            states.add_metric([status], count)
        yield states

        finished = InferenceRequest.objects.filter(finished_at__isnull=False)
        yield self._histogram(
            "sightline_batch_size", "Requests per forward pass", finished, "batch_size", BATCH_BUCKETS
        )
        yield self._histogram(
            "sightline_inference_latency_ms",
            "Claim to stored result, per request (ms)",
            finished,
            "inference_ms",
            LATENCY_BUCKETS_MS,
        )
        yield self._histogram(
            "sightline_queue_wait_ms", "Queued to claimed, per request (ms)", finished, "wait_ms", LATENCY_BUCKETS_MS
        )

        results = CounterMetricFamily(
            "sightline_results", "Results stored, by model version", labels=["model", "version"]
        )
        for model, version, count in (
            Result.objects.values_list("model_version__model__name", "model_version__version")
            .annotate(n=Count("id"))
            .order_by()
        ):
            results.add_metric([model, version], count)
        yield results

    @staticmethod
    def _histogram(name, documentation, queryset, field, buckets):
        aggregates = {f"le_{b}": Count("id", filter=Q(**{f"{field}__lte": b})) for b in buckets}
        row = queryset.filter(**{f"{field}__isnull": False}).aggregate(total=Count("id"), sum=Sum(field), **aggregates)
        family = HistogramMetricFamily(name, documentation)
        family.add_metric(
            [],
            [(str(b), row[f"le_{b}"]) for b in buckets] + [("+Inf", row["total"])],
            sum_value=row["sum"] or 0,
        )
        return family


def live(request):
    return JsonResponse({"status": "ok"})


def ready(request):
    ok, checks = readiness()
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


_registry = CollectorRegistry(auto_describe=False)  # collects at scrape time only, never at import
_registry.register(SightlineCollector())


def metrics(request):
    token = settings.SIGHTLINE_METRICS_TOKEN
    if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
        return JsonResponse(error_body("forbidden", "A metrics token is required."), status=403)
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
