"""Two lanes: each worker's threads, and a lane name the settings refuse."""

import os
import subprocess
import sys

from django.conf import settings

from workers.celery import worker_torch_threads


def test_each_lane_gets_a_thread_per_core_unless_the_setting_says_otherwise():
    assert [worker_torch_threads(cores=n) for n in (1, 2, 16)] == [1, 2, 16]
    assert worker_torch_threads(threads=3, cores=2) == 3  # SIGHTLINE_TORCH_THREADS overrides
    assert worker_torch_threads() == len(os.sched_getaffinity(0))


def test_an_unknown_lane_stops_the_process_in_words():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "SIGHTLINE_WORKER_LANE": "fast"}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "SIGHTLINE_WORKER_LANE must be all, interactive or bulk, not 'fast'" in result.stderr


def test_the_interactive_lane_never_pauses_for_a_busy_gpu():
    code = "import django; django.setup(); from django.conf import settings; print(settings.SIGHTLINE_GPU_BUSY_PERCENT)"
    busy = {}
    for lane in ("interactive", "bulk", "all"):
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "SIGHTLINE_WORKER_LANE": lane}
        env.pop("SIGHTLINE_GPU_BUSY_PERCENT", None)
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
        )
        busy[lane] = float(result.stdout)
    assert busy == {"interactive": 100.0, "bulk": 85.0, "all": 85.0}
