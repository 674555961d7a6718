"""collect_batch: what waits together runs together, within the size and wait limits."""

import pytest

from workers.engine.batching import collect_batch


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def source(arrivals):
    """take(n) hands out items that have 'arrived' by the fake clock's time."""
    waiting = []

    def take(limit, clock):
        while arrivals and arrivals[0][0] <= clock.now:
            waiting.append(arrivals.pop(0)[1])
        taken = waiting[:limit]
        del waiting[:limit]
        return taken

    return take


def test_takes_everything_already_waiting_up_to_the_maximum():
    clock = FakeClock()
    take = source([(0.0, i) for i in range(10)])
    batch = collect_batch(lambda n: take(n, clock), max_batch_size=4, max_wait_ms=50, clock=clock, sleep=clock.sleep)
    assert batch == [0, 1, 2, 3]


def test_a_lone_request_does_not_wait_when_the_wait_is_zero():
    clock = FakeClock()
    take = source([(0.0, "a"), (0.001, "b")])
    batch = collect_batch(lambda n: take(n, clock), max_batch_size=8, max_wait_ms=0, clock=clock, sleep=clock.sleep)
    assert batch == ["a"]
    assert clock.now == 0.0


def test_requests_arriving_within_the_wait_join_the_batch_and_later_ones_do_not():
    clock = FakeClock()
    take = source([(0.0, "a"), (0.004, "b"), (0.008, "c"), (0.050, "late")])
    batch = collect_batch(lambda n: take(n, clock), max_batch_size=8, max_wait_ms=10, clock=clock, sleep=clock.sleep)
    assert batch == ["a", "b", "c"]
    assert clock.now == pytest.approx(0.010)


def test_a_full_batch_stops_waiting_at_once():
    clock = FakeClock()
    take = source([(0.0, 1), (0.0, 2), (0.002, 3), (0.003, 4)])
    batch = collect_batch(lambda n: take(n, clock), max_batch_size=3, max_wait_ms=100, clock=clock, sleep=clock.sleep)
    assert batch == [1, 2, 3]
    assert clock.now < 0.005


def test_nothing_waiting_returns_an_empty_batch_without_waiting():
    clock = FakeClock()
    batch = collect_batch(lambda n: [], max_batch_size=3, max_wait_ms=100, clock=clock, sleep=clock.sleep)
    assert batch == []
    assert clock.now == 0.0


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError):
        collect_batch(lambda n: [], max_batch_size=0, max_wait_ms=0)
