"""GPU back-pressure: pause on sustained load, resume well below it, nothing at all without a GPU."""

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery

import workers.bootsteps as bootsteps
from workers.bootsteps import GpuBackPressure
from workers.engine.backpressure import BackPressurePolicy, Decision, NvmlSampler, nvml_device, nvml_sampler

PAUSE, RESUME, KEEP = Decision.PAUSE, Decision.RESUME, Decision.KEEP
HAS_NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()


class FakeSampler:
    """Hands out a fixed sequence of readings, then None."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.closed = False

    def __call__(self):
        return self.readings.pop(0) if self.readings else None

    def close(self):
        self.closed = True


def decisions(policy, readings):
    sampler = FakeSampler(readings)
    return [policy.observe(sampler()) for _ in readings]


# The policy.


def test_a_single_spike_does_not_pause():
    assert decisions(BackPressurePolicy(), [99, 40, 95, 96, 50, 100]) == [KEEP] * 6


def test_pauses_after_three_readings_in_a_row_above_the_threshold():
    policy = BackPressurePolicy()
    assert decisions(policy, [90, 91, 92, 99, 100]) == [KEEP, KEEP, PAUSE, KEEP, KEEP]
    assert policy.paused


def test_the_threshold_itself_is_not_above_it():
    assert decisions(BackPressurePolicy(), [85] * 10) == [KEEP] * 10


def test_resumes_below_the_lower_mark_and_not_just_under_the_threshold():
    policy = BackPressurePolicy()
    decisions(policy, [90, 90, 90])
    assert decisions(policy, [84, 80, 76, 75]) == [KEEP] * 4  # 85 - 1 down to the mark itself
    assert policy.paused
    assert decisions(policy, [74.9]) == [RESUME]
    assert not policy.paused


def test_after_resuming_it_takes_sustained_load_again_to_pause():
    policy = BackPressurePolicy()
    assert decisions(policy, [90, 90, 90, 10, 90, 90, 90]) == [KEEP, KEEP, PAUSE, RESUME, KEEP, KEEP, PAUSE]


def test_unknown_readings_change_nothing():
    policy = BackPressurePolicy()
    assert decisions(policy, [None, 90, None, 90, None]) == [KEEP] * 5
    assert decisions(policy, [90]) == [PAUSE]  # the two earlier readings still count
    assert decisions(policy, [None, None, None]) == [KEEP] * 3
    assert policy.paused


def test_custom_threshold_sustain_and_resume_mark():
    policy = BackPressurePolicy(threshold=60, sustain_samples=1, resume_below=30)
    assert decisions(policy, [61, 45, 30, 29.5, 60, 60.5]) == [PAUSE, KEEP, KEEP, RESUME, KEEP, PAUSE]


def test_the_default_resume_mark_follows_a_custom_threshold():
    assert BackPressurePolicy(threshold=70).resume_below == 60
    assert BackPressurePolicy(threshold=5).resume_below == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0},
        {"threshold": 101},
        {"sustain_samples": 0},
        {"threshold": 50, "resume_below": 60},
    ],
)
def test_impossible_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        BackPressurePolicy(**kwargs)


# NVML.


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="this machine has an NVIDIA driver")
def test_nvml_sampler_is_none_without_a_gpu():
    assert nvml_sampler(0) is None
    assert nvml_sampler("GPU-00000000-0000-0000-0000-000000000000") is None


@pytest.mark.gpu  # `make test-gpu` on a machine with an NVIDIA GPU
def test_nvml_sampler_reads_a_real_gpu():
    sampler = nvml_sampler(0)
    assert sampler is not None
    try:
        assert 0 <= sampler() <= 100
    finally:
        sampler.close()


class FakeNvml:
    """The few pynvml functions the sampler uses; ``fail`` names the ones that raise NVMLError."""

    class NVMLError(Exception):
        pass

    def __init__(self, *fail, gpu=42):
        self.fail, self.gpu, self.calls = set(fail), gpu, []

    def _call(self, name, result=None):
        self.calls.append(name)
        if name in self.fail:
            raise self.NVMLError(name)
        return result

    def nvmlInit(self):
        return self._call("nvmlInit")

    def nvmlShutdown(self):
        return self._call("nvmlShutdown")

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._call("nvmlDeviceGetHandleByIndex", f"handle-{index}")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self._call("nvmlDeviceGetHandleByUUID", f"handle-{uuid}")

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._call("nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=self.gpu, memory=0))


def test_nvml_sampler_is_none_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert nvml_sampler(0) is None


@pytest.mark.parametrize(
    "failing", ["nvmlInit", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUtilizationRates"], ids=str
)
def test_nvml_sampler_is_none_when_nvml_cannot_read_the_device(monkeypatch, failing):
    nvml = FakeNvml(failing)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvml_sampler(0) is None
    if failing != "nvmlInit":
        assert nvml.calls[-1] == "nvmlShutdown"  # what was opened is closed again


def test_nvml_sampler_reads_the_device_and_answers_none_when_a_reading_fails(monkeypatch):
    nvml = FakeNvml(gpu=87)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = nvml_sampler("GPU-abc")
    assert isinstance(sampler, NvmlSampler)
    assert "nvmlDeviceGetHandleByUUID" in nvml.calls
    assert sampler() == 87.0
    nvml.fail.add("nvmlDeviceGetUtilizationRates")
    assert sampler() is None
    sampler.close()
    assert nvml.calls[-1] == "nvmlShutdown"


@pytest.mark.parametrize(
    ("preferred", "visible", "expected"),
    [
        ("auto", None, 0),
        ("cuda", None, 0),
        ("cuda:2", None, 2),
        ("CUDA:1", None, 1),
        ("cpu", None, None),
        ("cuda:x", None, None),
        ("cuda:1", "3,5", 5),
        ("auto", "3", 3),
        ("cuda:1", "3", None),
        ("auto", "", None),
        ("auto", "GPU-8f3a", "GPU-8f3a"),
        ("auto", "foo", None),
    ],
)
def test_nvml_device_maps_the_inference_device_onto_nvml(preferred, visible, expected):
    assert nvml_device(preferred, visible) == expected


# The Celery consumer step, on a fake consumer.


class FakeTimer:
    def __init__(self):
        self.entries, self.cancelled = [], []

    def call_repeatedly(self, secs, fun, args=(), kwargs=None, priority=0):
        entry = SimpleNamespace(secs=secs, fun=fun, args=args)
        self.entries.append(entry)
        return entry

    def cancel(self, entry):
        self.cancelled.append(entry)

    def tick(self):
        entry = self.entries[-1]
        entry.fun(*entry.args)


class FakeConsumer:
    """Records queue changes; ``call_soon`` runs at ``run_pending``, as the worker's loop would."""

    def __init__(self, *queues, conf=None):
        self.app = SimpleNamespace(conf=dict(conf or {}))
        self.timer = FakeTimer()
        self.task_consumer = SimpleNamespace(queues=[SimpleNamespace(name=name) for name in queues])
        self.calls, self.pending = [], []

    def call_soon(self, fun, *args):
        self.pending.append((fun, args))

    def run_pending(self):
        while self.pending:
            fun, args = self.pending.pop(0)
            fun(*args)

    def cancel_task_queue(self, name):
        self.calls.append(("cancel", name))
        self.task_consumer.queues = [q for q in self.task_consumer.queues if q.name != name]

    def add_task_queue(self, name):
        self.calls.append(("add", name))
        self.task_consumer.queues.append(SimpleNamespace(name=name))

    @property
    def consuming(self):
        return [q.name for q in self.task_consumer.queues]


@pytest.fixture
def gpu(monkeypatch):
    """The step's GPU: set ``gpu.readings`` (None in place of the list: no GPU)."""
    state = SimpleNamespace(readings=[], devices=[], sampler=None)

    def fake_gpu_sampler(device):
        state.devices.append(device)
        if state.readings is None:
            return None
        state.sampler = FakeSampler(state.readings)
        return state.sampler

    monkeypatch.setattr(bootsteps, "gpu_sampler", fake_gpu_sampler)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


def started_step(consumer):
    step = GpuBackPressure(consumer)
    step.start(consumer)
    return step


def tick(consumer, times=1):
    for _ in range(times):
        consumer.timer.tick()
        consumer.run_pending()


def test_without_a_gpu_the_step_does_nothing_at_all(gpu, caplog):
    gpu.readings = None
    consumer = FakeConsumer("interactive", "bulk")
    with caplog.at_level(logging.DEBUG, logger="workers.bootsteps"):
        step = started_step(consumer)
        step.stop(consumer)
        step.start(consumer)  # after a reconnection
        step.shutdown(consumer)
    assert consumer.timer.entries == [] and consumer.calls == [] and consumer.pending == []
    assert len(gpu.devices) == 1  # looked for once
    assert [r.levelname for r in caplog.records] == ["DEBUG"]


def test_sustained_load_pauses_every_queue_and_a_quiet_gpu_resumes_them(gpu, caplog):
    gpu.readings = [95, 30, 90, 96, 99, 100, 84, 80, 40, 50]
    consumer = FakeConsumer("interactive", "bulk")
    step = started_step(consumer)
    assert consumer.timer.entries[0].secs == 1.0

    tick(consumer, 4)  # a spike, then three busy readings to the threshold
    assert consumer.calls == []
    with caplog.at_level(logging.INFO, logger="workers.bootsteps"):
        tick(consumer)
    assert consumer.calls == [("cancel", "interactive"), ("cancel", "bulk")]
    assert consumer.consuming == [] and step.paused_queues == ["interactive", "bulk"]
    assert "99%" in caplog.text

    tick(consumer, 3)  # 100, 84, 80: still above the resume mark of 75
    assert consumer.calls == [("cancel", "interactive"), ("cancel", "bulk")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workers.bootsteps"):
        tick(consumer)
    assert consumer.calls[2:] == [("add", "interactive"), ("add", "bulk")]
    assert consumer.consuming == ["interactive", "bulk"] and step.paused_queues == []
    assert [r.levelname for r in caplog.records] == ["INFO"] and "40%" in caplog.text


def test_queue_changes_wait_for_the_consumers_own_loop(gpu):
    gpu.readings = [90, 90, 90]
    consumer = FakeConsumer("interactive")
    started_step(consumer)
    for _ in range(3):
        consumer.timer.tick()
    assert consumer.calls == [] and len(consumer.pending) == 1
    consumer.run_pending()
    assert consumer.calls == [("cancel", "interactive")]


def test_settings_set_the_threshold_and_the_interval(gpu, settings):
    settings.SIGHTLINE_GPU_BUSY_PERCENT = 60
    settings.SIGHTLINE_GPU_SAMPLE_SECONDS = 0.25
    settings.SIGHTLINE_INFERENCE_DEVICE = "cuda:1"
    gpu.readings = [61, 62, 63, 55, 49]
    consumer = FakeConsumer("interactive")
    step = started_step(consumer)
    assert consumer.timer.entries[0].secs == 0.25 and gpu.devices == [1]
    assert (step.policy.threshold, step.policy.resume_below) == (60, 50)
    tick(consumer, 5)
    assert consumer.calls == [("cancel", "interactive"), ("add", "interactive")]


def test_the_celery_config_serves_when_django_has_no_such_setting(gpu, settings):
    for name in ("SIGHTLINE_GPU_BUSY_PERCENT", "SIGHTLINE_GPU_SAMPLE_SECONDS"):
        if hasattr(settings, name):
            delattr(settings, name)
    consumer = FakeConsumer("interactive", conf={"SIGHTLINE_GPU_SAMPLE_SECONDS": 2.5})
    step = started_step(consumer)
    assert consumer.timer.entries[0].secs == 2.5 and step.policy.threshold == 85


def test_a_pause_outlives_a_reconnection(gpu):
    gpu.readings = [90, 90, 90, 95, 10]
    consumer = FakeConsumer("interactive", "bulk")
    step = started_step(consumer)
    tick(consumer, 3)
    step.stop(consumer)  # the connection dropped: Celery stops the consumer's steps and starts them again
    assert consumer.timer.cancelled == consumer.timer.entries[:1]
    consumer.task_consumer.queues = []  # the new task consumer skips the deselected queues
    step.start(consumer)
    assert len(consumer.timer.entries) == 2 and len(gpu.devices) == 1
    tick(consumer, 2)
    assert consumer.calls[-2:] == [("add", "interactive"), ("add", "bulk")]
    step.shutdown(consumer)
    assert gpu.sampler.closed


def test_a_pause_before_the_task_consumer_exists_changes_nothing(gpu):
    gpu.readings = [90, 90, 90, 10]
    consumer = FakeConsumer()
    consumer.task_consumer = None
    started_step(consumer)
    tick(consumer, 4)
    assert consumer.calls == []


def test_impossible_interval_is_refused(gpu, settings):
    settings.SIGHTLINE_GPU_SAMPLE_SECONDS = 0
    with pytest.raises(ValueError):
        GpuBackPressure(FakeConsumer("interactive"))


def test_a_real_worker_runs_the_step_after_the_task_consumer_and_before_the_event_loop():
    app = Celery("backpressure-test", broker="memory://", set_as_current=False, fixups=[])
    app.steps["consumer"].add(GpuBackPressure)
    worker = app.WorkController(pool_cls="solo", without_mingle=True, without_gossip=True, without_heartbeat=True)
    order = [type(step).__name__ for step in worker.consumer.steps]
    assert order.index("Tasks") < order.index("GpuBackPressure") < order.index("Evloop")


def test_the_workers_own_celery_app_runs_the_step_after_the_task_consumer():
    """The app ``celery -A workers.celery worker`` starts, not one built here: without its
    registration in workers/celery.py no worker would ever pause."""
    from workers.celery import app

    assert GpuBackPressure in app.steps["consumer"]
    worker = app.WorkController(pool_cls="solo", without_mingle=True, without_gossip=True, without_heartbeat=True)
    order = [type(step).__name__ for step in worker.consumer.steps]
    assert order.index("Tasks") < order.index("GpuBackPressure") < order.index("Evloop")
