"""The interactive lane's bulk work only once idle (workers/bootsteps.py BulkWhenIdle), on a fake
consumer: an interactive message stops it consuming ``bulk``; the idle window takes it up again."""

from types import SimpleNamespace

import pytest

import workers.bootsteps as bootsteps
from tests.unit.test_backpressure import FakeConsumer, tick
from workers.bootsteps import BulkWhenIdle


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bootsteps.time, "monotonic", clock)
    return clock


def message(queue: str):
    return SimpleNamespace(delivery_info={"routing_key": queue, "exchange": queue})


@pytest.fixture
def interactive_lane(settings):
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    settings.SIGHTLINE_INTERACTIVE_IDLE_SECONDS = 2.0
    consumer = FakeConsumer("interactive", "bulk")
    step = BulkWhenIdle(consumer)
    step.start(consumer)
    yield consumer, step
    step.shutdown(consumer)


def test_an_interactive_message_holds_bulk_back_until_the_lane_was_idle_long_enough(interactive_lane, clock):
    consumer, step = interactive_lane
    step.received(sender=consumer, request=message("bulk"))  # bulk work itself changes nothing
    assert consumer.calls == []

    step.received(sender=consumer, request=message("interactive"))
    assert consumer.consuming == ["interactive"]
    clock.now += 1.9
    tick(consumer)
    assert consumer.consuming == ["interactive"]  # not idle long enough yet
    step.received(sender=consumer, request=message("interactive"))  # another read: the window restarts
    clock.now += 1.9
    tick(consumer)
    assert consumer.consuming == ["interactive"]
    clock.now += 0.2
    tick(consumer)
    assert consumer.consuming == ["interactive", "bulk"]
    assert consumer.calls == [("cancel", "bulk"), ("add", "bulk")]
    tick(consumer)  # nothing more to do
    assert consumer.calls == [("cancel", "bulk"), ("add", "bulk")]


def test_a_queue_the_lane_does_not_consume_is_never_added(interactive_lane, clock):
    consumer, step = interactive_lane
    consumer.task_consumer.queues = [SimpleNamespace(name="interactive")]  # started with -Q interactive
    step.received(sender=consumer, request=message("interactive"))
    clock.now += 5
    tick(consumer)
    assert consumer.calls == [] and consumer.consuming == ["interactive"]


@pytest.mark.parametrize(("lane", "idle"), [("bulk", 2.0), ("all", 2.0), ("interactive", 0)])
def test_other_lanes_and_a_zero_window_keep_the_old_rule(settings, clock, lane, idle):
    settings.SIGHTLINE_WORKER_LANE = lane
    settings.SIGHTLINE_INTERACTIVE_IDLE_SECONDS = idle
    consumer = FakeConsumer("interactive", "bulk")
    step = BulkWhenIdle(consumer)
    step.start(consumer)
    step.received(sender=consumer, request=message("interactive"))
    assert consumer.timer.entries == [] and consumer.calls == []
    step.shutdown(consumer)
