"""Health checks and Prometheus metrics. Worker heartbeats live in Redis with a short expiry.

Three checks, for three askers: ``/health/live/`` (the process answers: a liveness probe),
``/health/ready/`` (this web pod can serve: database and broker answer; a readiness probe, which
must not wait on workers, or a cluster whose workers are still pulling a GPU image would take
every web pod out of its Service), ``/health/workers/`` (a worker serves the production model:
for an operator, a deploy script, the ``sightline_workers`` metric's alert). The model-server
protocols keep their own semantics through ``readiness()`` (database, broker and a worker)."""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, Q, Sum
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

from core.errors import error_body

from .models import InferenceRequest

logger = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "sightline:worker:"
HEARTBEAT_SECONDS = 15
HEARTBEAT_TTL = 45  # three missed beats and the worker counts as gone
QUEUES = ("interactive", "bulk", "maintenance")
WORKER_LANES = ("interactive", "bulk", "all")  # SIGHTLINE_WORKER_LANE's values
AUDIT_TAMPERED = "audit.tampered"  # the security event accounts.audit.audit_verify_and_alert records
AUDIT_VERIFIED = "audit.verified"  # ... and the event it records when every chain verifies
Priority = InferenceRequest.Priority
LANES = {Priority.INTERACTIVE: "interactive", Priority.BULK: "bulk"}  # a request's lane, by its priority
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 10000)
Status = InferenceRequest.Status
WAITING_STATES = (Status.QUEUED, Status.RUNNING)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)


def heartbeat(models: list[str], device: str) -> None:
    """Called in a worker process: 'alive, in this lane, serving these model packages'."""
    key = f"{HEARTBEAT_PREFIX}{socket.gethostname()}:{os.getpid()}"
    payload = {"models": models, "device": device, "lane": settings.SIGHTLINE_WORKER_LANE, "at": time.time()}
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


def pod_readiness() -> tuple[bool, dict]:
    """This web process can serve: its database and its broker answer. Never the workers."""
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
    return all(check["ok"] for check in checks.values()), checks


def worker_check(*, database_ok: bool = True, broker_ok: bool = True) -> dict:
    """Whether a live worker (a heartbeat within ``HEARTBEAT_TTL``) serves the production model."""
    from .services.registry import version_for

    production = version_for() if database_ok else None
    if production is None:
        return {"ok": False, "error": "no production model is registered"}
    if not broker_ok:
        return {"ok": False, "error": "broker unreachable"}
    try:
        alive = workers_alive()
    except redis.RedisError as exc:
        return {"ok": False, "error": type(exc).__name__}
    serving = [w for w in alive if production.weights_sha256 in w.get("models", [])]
    return {"ok": bool(serving), "workers": len(serving), "model": str(production)}


def readiness() -> tuple[bool, dict]:
    """Database, broker and a worker serving the production model: the model-server protocols'
    readiness (TF-Serving's ``AVAILABLE`` promises a read can run). Web pods use ``pod_readiness``."""
    _, checks = pod_readiness()
    checks["worker"] = worker_check(database_ok=checks["database"]["ok"], broker_ok=checks["broker"]["ok"])
    return all(check["ok"] for check in checks.values()), checks


class SightlineCollector:
    """Computed at scrape time from Redis and the database, so every web replica reports the
    same numbers and workers need no metrics server of their own.

    A scrape costs six indexed queries, however large the tables grow: counts of the states
    work waits in, by lane (queued, running: a range of the ``status`` index); aggregates per
    lane over the requests finished in the last ``SIGHTLINE_METRICS_WINDOW_SECONDS`` (a range of
    the ``finished_at`` index); results per model version over the same range; PACS deliveries
    retrying or failed, with the newest failure's time (a range of the ``delivery_due`` index:
    failures are the rare rows); the
    newest ``audit.tampered`` event and the newest ``audit.verified`` one (one row each off the
    platform chain's ``tenant, action, -created`` index).
    Worker presence comes from the heartbeats in Redis, no query. A request's lane
    is its priority (interactive read or bulk job), whichever worker ran it. Nothing scans the
    history: the windowed figures are gauges (a gauge histogram for batch sizes and latencies),
    which Prometheus keeps over time itself."""

    def collect(self):
        depth = GaugeMetricFamily("sightline_queue_depth", "Messages waiting in a broker queue", labels=["queue"])
        try:
            client = _redis()
            for queue in QUEUES:
                depth.add_metric([queue], client.llen(queue))
        except redis.RedisError:
            pass
        yield depth

        present = GaugeMetricFamily(
            "sightline_workers",
            f"Worker processes whose heartbeat is younger than {HEARTBEAT_TTL} s, by lane",
            labels=["lane"],
        )
        try:
            alive = workers_alive()
        except redis.RedisError:
            alive = None  # absent, not zero: an unreachable broker is its own alert
        if alive is not None:
            for lane in WORKER_LANES:
                present.add_metric([lane], sum(1 for w in alive if w.get("lane", "all") == lane))
        yield present

        counts = {
            (status, priority): n
            for status, priority, n in InferenceRequest.objects.filter(status__in=WAITING_STATES)
            .values_list("status", "priority")
            .annotate(n=Count("id"))
            .order_by()
        }
        states = GaugeMetricFamily(
            "sightline_inference_requests", "Inference requests waiting or running now", labels=["status"]
        )
        for status in WAITING_STATES:
            states.add_metric([status], sum(n for (s, _), n in counts.items() if s == status))
        yield states
        lanes = GaugeMetricFamily(
            "sightline_lane_requests",
            "Inference requests waiting or running now, by lane (interactive reads, bulk jobs)",
            labels=["lane", "status"],
        )
        for priority, lane in LANES.items():
            for status in WAITING_STATES:
                lanes.add_metric([lane, status], counts.get((status, priority), 0))
        yield lanes
        yield GaugeMetricFamily(
            "sightline_interactive_queue_max",
            "Queued interactive reads at which uploads answer 429 (0: no bound)",
            value=settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX,
        )

        window = settings.SIGHTLINE_METRICS_WINDOW_SECONDS
        recent = InferenceRequest.objects.filter(finished_at__gte=timezone.now() - timedelta(seconds=window))
        histograms = {
            "batch_size": BATCH_BUCKETS,
            "inference_ms": LATENCY_BUCKETS_MS,
            "wait_ms": LATENCY_BUCKETS_MS,
        }
        aggregates = {
            f"status_{status}": Count("id", filter=Q(status=status)) for status in (Status.DONE, Status.FAILED)
        }
        for field, buckets in histograms.items():
            aggregates[f"{field}_total"] = Count(field)
            aggregates[f"{field}_sum"] = Sum(field)
            aggregates.update({f"{field}_le_{b}": Count("id", filter=Q(**{f"{field}__lte": b})) for b in buckets})
        # one row per lane, from the same range of the window's index
        by_lane = {row["priority"]: row for row in recent.values("priority").annotate(**aggregates).order_by()}
        empty = dict.fromkeys(aggregates, 0)

        finished = GaugeMetricFamily(
            "sightline_inference_finished",
            f"Inference requests finished in the last {window} s, by outcome",
            labels=["status"],
        )
        for status in (Status.DONE, Status.FAILED):
            finished.add_metric([status], sum(row[f"status_{status}"] for row in by_lane.values()))
        yield finished
        for name, field, documentation in (
            ("sightline_batch_size", "batch_size", "Requests per forward pass"),
            ("sightline_inference_latency_ms", "inference_ms", "Claim to stored result, per request (ms)"),
            ("sightline_queue_wait_ms", "wait_ms", "Queued to claimed, per request (ms)"),
        ):
            family = GaugeHistogramMetricFamily(
                name, f"{documentation}, by lane, requests finished in the last {window} s", labels=["lane"]
            )
            for priority, lane in LANES.items():
                row = by_lane.get(priority, empty)
                family.add_metric(
                    [lane],
                    [(str(b), row[f"{field}_le_{b}"]) for b in histograms[field]] + [("+Inf", row[f"{field}_total"])],
                    gsum_value=row[f"{field}_sum"] or 0,
                )
            yield family

        results = GaugeMetricFamily(
            "sightline_results_recent",
            f"Results stored in the last {window} s, by model version",
            labels=["model", "version"],
        )
        for model, version, count in (
            # the outcome is counted, not filtered on: the window's index is the only one to read
            recent.values_list("model_version__model__name", "model_version__version")
            .annotate(n=Count("id", filter=Q(status=Status.DONE)))
            .order_by()
        ):
            if count:
                results.add_metric([model, version], count)
        yield results

        from accounts.models import AccessEvent
        from dicomnet.models import Delivery

        delivery_states = (Delivery.Status.RETRYING, Delivery.Status.FAILED)
        by_status = {
            status: (n, newest)
            for status, n, newest in Delivery.objects.filter(status__in=delivery_states)
            .values_list("status")
            .annotate(n=Count("id"), newest=Max("updated"))
            .order_by()
        }
        deliveries = GaugeMetricFamily(
            "sightline_deliveries", "Findings sent to a PACS that are retrying or failed for good", labels=["status"]
        )
        for status in delivery_states:
            deliveries.add_metric([status], by_status.get(status, (0, None))[0])
        yield deliveries
        # a count nets out (a resend leaves failed as a new failure joins it): the newest failure's
        # time does not. A failed row's ``updated`` is when it failed; it leaves the state on a resend
        newest_failure = by_status.get(Delivery.Status.FAILED, (0, None))[1]
        yield GaugeMetricFamily(
            "sightline_delivery_failed_last_timestamp_seconds",
            "When the newest delivery still failed for good failed (0: none is)",
            value=newest_failure.timestamp() if newest_failure else 0,
        )

        for action, name, documentation in (
            (AUDIT_TAMPERED, "sightline_audit_tampered_last_timestamp_seconds",
             "When the access log's chain check last failed (an audit.tampered event; 0: never)"),
            (AUDIT_VERIFIED, "sightline_audit_verified_last_timestamp_seconds",
             "When beat's chain check last found every chain intact (an audit.verified event; 0: never)"),
        ):  # fmt: skip
            last = (
                AccessEvent.objects.filter(tenant__isnull=True, action=action)
                .order_by("-created", "-id")
                .values_list("created", flat=True)
                .first()
            )
            yield GaugeMetricFamily(name, documentation, value=last.timestamp() if last else 0)
        yield GaugeMetricFamily(
            "sightline_audit_verify_interval_seconds",
            "How often beat verifies the access log's hash chains (SIGHTLINE_AUDIT_VERIFY_MINUTES)",
            value=settings.CELERY_BEAT_SCHEDULE["verify-audit-log"]["schedule"],
        )


def live(request):
    return JsonResponse({"status": "ok"})


def ready(request):
    ok, checks = pod_readiness()
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503)


def workers(request):
    _, checks = pod_readiness()
    check = worker_check(database_ok=checks["database"]["ok"], broker_ok=checks["broker"]["ok"])
    return JsonResponse(
        {"status": "ok" if check["ok"] else "unavailable", "checks": {"worker": check}},
        status=200 if check["ok"] else 503,
    )


_registry = CollectorRegistry(auto_describe=False)  # collects at scrape time only, never at import
_registry.register(SightlineCollector())


def metrics(request):
    token = settings.SIGHTLINE_METRICS_TOKEN
    if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
        return JsonResponse(error_body("forbidden", "A metrics token is required."), status=403)
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
