"""bench/gpu_check.py runs on a lent GPU machine that has torch and none of the web stack; its smoke
mode runs the same code paths on the CPU here, with Django, Celery and Redis refused at import."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from django.conf import settings
from PIL import Image

from bench.gpu_check import GOAL_IMAGES_PER_SECOND, WEB_CORE_MS_GOAL, platform_plan
from bench.gpu_pipeline import DevicePipeline, overlapped

# Runs a script with a finder in front of every other one that refuses the web stack's packages.
WITHOUT_WEB_STACK = """
import importlib.abc, runpy, sys
REFUSED = {"django", "celery", "kombu", "redis", "rest_framework", "channels", "channels_redis", "daphne"}
class RefuseWebStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ImportError(f"{name} is refused: the GPU check runs without the web stack")
        return None
sys.meta_path.insert(0, RefuseWebStack())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

CHECKS = (
    "engine on the device agrees with the CPU",
    "device decode agrees with the engine's Pillow decode",
    "model cache eviction releases device memory",
    "Grad-CAM on the device agrees with the CPU",
    "the benchmark model loads and its fast forward agrees with the engine's",
    "back-pressure samples a real utilisation through NVML",
    "throughput, JPEG bytes to labels",
    "torch.compile at the best batch size",
)


def _without_web_stack(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_WEB_STACK, *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_wrapper_refuses_django(tmp_path):
    script = tmp_path / "needs_django.py"
    script.write_text("import django.conf\n")
    probe = _without_web_stack(str(script), timeout=60)
    assert probe.returncode != 0
    assert "django.conf is refused" in probe.stderr or "django is refused" in probe.stderr


def test_the_smoke_run_covers_every_section_without_the_web_stack(demo_package, tmp_path):
    run = _without_web_stack("bench/gpu_check.py", "--package", str(demo_package), "--out", str(tmp_path), "--smoke")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())

    assert report["mode"] == "smoke"
    assert report["environment"]["device"] == "cpu"
    assert set(report["checks"]) == set(CHECKS)
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert "FAIL" not in statuses.values(), report["checks"]
    # without a GPU these two say why they did not run; everything else ran its code path
    assert statuses["back-pressure samples a real utilisation through NVML"] == "SKIP"
    assert statuses["torch.compile at the best batch size"] == "SKIP"
    assert all(report["checks"][name]["detail"] for name in CHECKS)
    for name, status in statuses.items():
        assert f"{status} {name}: " in run.stdout

    rows = report["throughput"]["rows"]
    paths = {(row["path"], row["batch"]) for row in rows}
    for path in ("forward_only", "device_decode", "device_decode_overlap", "cpu_decode", "engine_today"):
        assert {(path, batch) for batch in (1, 2, 4)} <= paths, path
    assert all(row["images_per_second"] > 0 for row in rows)

    assert report["goal"]["status"] == "SKIP"
    assert report["goal"]["target_images_per_second"] == GOAL_IMAGES_PER_SECOND
    assert "GOAL SKIP" in run.stdout
    assert report["host_costs"]["pillow_decode_core_ms"] > 0
    assert report["platform_plan"]["images_per_second"] == GOAL_IMAGES_PER_SECOND


def test_the_platform_plan_scales_the_per_image_costs_by_the_rate():
    host = {"jpeg_bytes_mean": 20 * 1024, "pillow_decode_resize_core_ms": 2.0, "display_copy_jpeg_q95_core_ms": 1.0}
    plan = platform_plan(5000, host)
    assert plan["web_cores_at_goal"] == 5000 * WEB_CORE_MS_GOAL / 1000
    assert plan["web_processes_at_goal"] >= plan["web_cores_at_goal"]
    assert plan["db_commits_per_second_web"] == 5000
    assert plan["db_row_writes_per_second"] == 5000 * sum(plan["assumptions"]["rows_per_image"].values())
    assert plan["worker_host_cores_if_pillow_decodes"] == 10.0
    assert plan["worker_host_cores_for_cpu_display_copy"] == 5.0
    assert plan["storage_writes_per_second"] == 10_000
    assert platform_plan(2500, host)["redis_messages_per_second"] * 2 == plan["redis_messages_per_second"]


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def tiny_pipeline():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)
    )
    return DevicePipeline(
        model, device=torch.device("cpu"), size=32, mean=(0.5,) * 3, std=(0.25,) * 3, dtype=torch.float32, top_k=3
    )


def test_images_of_different_sizes_are_resized_to_the_model_input_and_get_one_answer_each(tiny_pipeline):
    rng = np.random.default_rng(3)
    small = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    large = np.asarray(Image.fromarray(small).resize((80, 120)))
    items = [_jpeg(small), _jpeg(large), _jpeg(small)]
    indices, probabilities = tiny_pipeline.run(items)
    assert indices.shape == probabilities.shape == (3, 3)
    assert torch.equal(indices[0], indices[2])
    assert torch.all(probabilities[:, :-1] >= probabilities[:, 1:])  # top-k, best first


def test_a_decode_error_in_the_prefetch_thread_reaches_the_caller_instead_of_hanging(tiny_pipeline):
    good = _jpeg(np.zeros((32, 32, 3), dtype=np.uint8))
    done, _ = overlapped(tiny_pipeline, [[good, good]], seconds=0.0, min_batches=3)
    assert done == 6
    with pytest.raises(RuntimeError):
        overlapped(tiny_pipeline, [[good, b"not a jpeg"]], seconds=0.0, min_batches=1)
