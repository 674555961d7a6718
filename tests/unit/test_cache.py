"""The worker's model cache is bounded by the memory its models hold, least recently used first."""

import pytest
import torch

from workers.engine.cache import HandlerCache, model_bytes


class FakeHandler:
    def __init__(self, name: str, size: int):
        self.name, self.size = name, size


def cache_of(budget: int) -> HandlerCache:
    return HandlerCache(budget_bytes=budget, size_of=lambda handler: handler.size)


def test_model_bytes_counts_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.BatchNorm1d(5))
    # linear 10*5 + 5, batch norm weight 5 + bias 5 (float32), running mean/var 5 + 5 (float32),
    # num_batches_tracked 1 (int64)
    assert model_bytes(model) == (55 + 10 + 10) * 4 + 8


def test_loads_once_and_evicts_least_recently_used_beyond_the_budget():
    cache, loads = cache_of(250), []

    def load(name, size):
        def loader():
            loads.append(name)
            return FakeHandler(name, size)

        return loader

    a = cache.get("a", load("a", 100))
    assert cache.get("a", load("a", 100)) is a
    cache.get("b", load("b", 100))
    cache.get("a", load("a", 100))  # a is now the most recently used
    cache.get("c", load("c", 100))  # 300 > 250: b goes, not a
    assert cache.keys() == ["a", "c"]
    assert cache.held_bytes() == 200
    assert loads == ["a", "b", "c"]


def test_a_model_larger_than_the_budget_still_loads_alone():
    cache = cache_of(100)
    cache.get("small", lambda: FakeHandler("small", 50))
    big = cache.get("big", lambda: FakeHandler("big", 500))
    assert cache.keys() == ["big"]
    assert cache.get("big", lambda: FakeHandler("other", 1)) is big


def test_a_failed_load_leaves_the_cache_as_it_was():
    cache = cache_of(1000)
    cache.get("a", lambda: FakeHandler("a", 10))

    def broken():
        raise RuntimeError("checksum mismatch")

    with pytest.raises(RuntimeError):
        cache.get("b", broken)
    assert cache.keys() == ["a"]


def test_an_eviction_on_a_gpu_host_gives_the_memory_back_without_raising(monkeypatch):
    """The CUDA branch: torch is only imported for type checking at module level, so the
    eviction path must import it itself (it raised NameError on the first eviction)."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    cache = cache_of(150)
    cache.get("a", lambda: FakeHandler("a", 100))
    assert emptied == []  # nothing evicted, nothing to give back
    cache.get("b", lambda: FakeHandler("b", 100))
    assert cache.keys() == ["b"]
    assert emptied == [True]
