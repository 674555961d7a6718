"""Celery side of GPU back-pressure: a consumer bootstep that stops consuming while the GPU is busy.

Registered in ``workers.celery`` with ``app.steps["consumer"].add(GpuBackPressure)``. Every
``SIGHTLINE_GPU_SAMPLE_SECONDS`` the step reads the worker's GPU utilisation and feeds it to a
``BackPressurePolicy`` (``SIGHTLINE_GPU_BUSY_PERCENT``). On "pause" the worker cancels consuming
from every queue it consumes (as ``celery control cancel_consumer`` does); tasks it already holds
finish, new ones stay in the broker for other workers. On "resume" it consumes them again.

The queue changes run in the consumer's own loop (``consumer.call_soon``), never in a timer
thread. A reconnection keeps the pause: the cancelled queues are deselected in
``app.amqp.queues``, so the new task consumer does not take them up again until resume. Without a
GPU (or NVML) the step starts no timer and changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import bootsteps
from celery.signals import task_received

from workers.engine.backpressure import (
    DEFAULT_BUSY_PERCENT,
    BackPressurePolicy,
    Decision,
    UtilisationSampler,
    nvml_device,
    nvml_sampler,
)

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_SECONDS = 1.0


def _setting(app: Any, name: str, default: Any) -> Any:
    """Django settings first (where Sightline keeps them), then the Celery app's config."""
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return app.conf.get(name, default)
    try:
        return getattr(settings, name)
    except (AttributeError, ImproperlyConfigured):
        return app.conf.get(name, default)


def gpu_sampler(device: int | str | None) -> UtilisationSampler | None:
    """The sampler for this worker's GPU, None when it has none; tests replace this."""
    return None if device is None else nvml_sampler(device)


class _TimedStep(bootsteps.StartStopStep):
    """A consumer step with one repeating timer, started once and cancelled on stop (a reconnection
    runs start again)."""

    _timer_entry: Any = None

    def repeat(self, c: Any, seconds: float, fun: Any) -> None:
        if self._timer_entry is None:
            self._timer_entry = c.timer.call_repeatedly(seconds, fun, (c,))

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            c.timer.cancel(self._timer_entry)
            self._timer_entry = None


class GpuBackPressure(_TimedStep):
    """Pause consuming while this worker's GPU stays busy; resume once it is well below."""

    label = "GPU back-pressure"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any):
        super().__init__(c, **kwargs)
        self.policy = BackPressurePolicy(
            threshold=float(_setting(c.app, "SIGHTLINE_GPU_BUSY_PERCENT", DEFAULT_BUSY_PERCENT))
        )
        self.interval = float(_setting(c.app, "SIGHTLINE_GPU_SAMPLE_SECONDS", DEFAULT_SAMPLE_SECONDS))
        if self.interval <= 0:
            raise ValueError(f"SIGHTLINE_GPU_SAMPLE_SECONDS must be above 0, not {self.interval}")
        self.device = nvml_device(
            str(_setting(c.app, "SIGHTLINE_INFERENCE_DEVICE", "auto")), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        self.sampler: UtilisationSampler | None = None
        self.paused_queues: list[str] = []
        self._looked_up = False

    def start(self, c: Any) -> None:
        # NVML is opened here, after the pool has forked its processes, and once per worker:
        # start runs again after every reconnection.
        if not self._looked_up:
            self._looked_up = True
            self.sampler = gpu_sampler(self.device)
            if self.sampler is None:
                logger.debug("GPU back-pressure is off: no GPU utilisation to read (device %s)", self.device)
            else:
                logger.debug(
                    "GPU back-pressure on GPU %s: pause above %.0f%%, resume below %.0f%%, sampled every %ss",
                    self.device,
                    self.policy.threshold,
                    self.policy.resume_below,
                    self.interval,
                )
        if self.sampler is not None:
            self.repeat(c, self.interval, self.sample)

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        close = getattr(self.sampler, "close", None)
        if close is not None:
            close()
        self.sampler = None

    def sample(self, c: Any) -> None:
        """One timer tick: read, decide, and hand any queue change to the consumer's loop."""
        utilisation = self.sampler() if self.sampler is not None else None
        decision = self.policy.observe(utilisation)
        if decision is Decision.PAUSE:
            c.call_soon(self.pause, c, utilisation)
        elif decision is Decision.RESUME:
            c.call_soon(self.resume, c, utilisation)

    def pause(self, c: Any, utilisation: float | None = None) -> None:
        if c.task_consumer is None:
            return
        names = [queue.name for queue in c.task_consumer.queues]
        for name in names:
            c.cancel_task_queue(name)
            if name not in self.paused_queues:
                self.paused_queues.append(name)
        logger.info(
            "GPU busy at %s%% (above %.0f%% for %d samples): stopped consuming from %s",
            _percent(utilisation),
            self.policy.threshold,
            self.policy.sustain_samples,
            ", ".join(names) or "no queue",
        )

    def resume(self, c: Any, utilisation: float | None = None) -> None:
        names, self.paused_queues = self.paused_queues, []
        for name in names:
            c.add_task_queue(name)
        logger.info(
            "GPU at %s%% (below %.0f%%): consuming again from %s",
            _percent(utilisation),
            self.policy.resume_below,
            ", ".join(names) or "no queue",
        )


def _percent(utilisation: float | None) -> str:
    return "?" if utilisation is None else f"{utilisation:.0f}"


INTERACTIVE_QUEUE, BULK_QUEUE = "interactive", "bulk"
DEFAULT_IDLE_SECONDS = 2.0
IDLE_CHECK_SECONDS = 0.25  # how often a lane that stopped taking bulk work looks whether it is idle again


class BulkWhenIdle(_TimedStep):
    """The interactive lane takes bulk work only once it has been idle: a message from the
    interactive queue stops it consuming ``bulk`` (the broker keeps those messages for the bulk
    lane), and ``SIGHTLINE_INTERACTIVE_IDLE_SECONDS`` without one starts it again.

    Without it the lane took a bulk wake-up in the tens of milliseconds between one clinician's
    read and the next (the queue is empty while a closed-loop client waits for its result), and
    the next read waited for that bulk bite to finish. Only the ``interactive`` lane has the
    step, and only while it consumes ``bulk``; 0 seconds turns it off (bulk whenever the
    interactive queue is empty, as before). A queue change runs in the consumer's loop."""

    label = "bulk work only when idle"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any):
        super().__init__(c, **kwargs)
        self.idle_seconds = float(_setting(c.app, "SIGHTLINE_INTERACTIVE_IDLE_SECONDS", DEFAULT_IDLE_SECONDS))
        self.enabled = _setting(c.app, "SIGHTLINE_WORKER_LANE", "all") == INTERACTIVE_QUEUE and self.idle_seconds > 0
        self.last_interactive = float("-inf")
        self.holding_back = False  # bulk cancelled by this step, to be added again when idle
        if self.enabled:
            task_received.connect(self.received, weak=False)

    def start(self, c: Any) -> None:
        if self.enabled:
            self.repeat(c, IDLE_CHECK_SECONDS, self.check)

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        task_received.disconnect(self.received)

    def received(self, sender: Any = None, request: Any = None, **_kwargs: Any) -> None:
        delivery = getattr(request, "delivery_info", None) or {}
        if not self.enabled or delivery.get("routing_key") != INTERACTIVE_QUEUE:
            return
        self.last_interactive = time.monotonic()
        if not self.holding_back and sender is not None:
            self.hold_back(sender)

    def consuming(self, c: Any) -> set[str]:
        return {queue.name for queue in c.task_consumer.queues} if c.task_consumer is not None else set()

    def hold_back(self, c: Any) -> None:
        if BULK_QUEUE in self.consuming(c):
            c.cancel_task_queue(BULK_QUEUE)
            self.holding_back = True
            logger.debug("an interactive read arrived: bulk work waits until %.1f s without one", self.idle_seconds)

    def check(self, c: Any) -> None:
        """One timer tick: idle long enough, the bulk queue is taken up again."""
        if self.holding_back and time.monotonic() - self.last_interactive >= self.idle_seconds:
            c.call_soon(self.take_bulk_again, c)

    def take_bulk_again(self, c: Any) -> None:
        if not self.holding_back:
            return
        self.holding_back = False
        if c.task_consumer is not None and BULK_QUEUE not in self.consuming(c):
            c.add_task_queue(BULK_QUEUE)
            logger.debug("idle for %.1f s: taking bulk work again", self.idle_seconds)
