"""optimise_model against the stack's real Celery worker: the command makes the int8 version,
registers it and waits while the worker (maintenance queue) runs the registration checks and
measures it against its parent; it prints the worker's numbers, stored on the version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from recognition.models import ModelVersion
from tests.e2e.conftest import database_url

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]


def manage(stack, *args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": stack.redis_url,
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )


def test_optimise_model_waits_for_the_workers_measurement(stack, transactional_db, demo_package):
    from workers.registration import model_version_register

    parent, _ = model_version_register(package_path=demo_package)
    done = manage(stack, "optimise_model", "sightline-demo", "1.0.0", "--to", "onnx-int8", "--timeout", "300")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Stored v2 · 1.0.0+onnx-int8 (validating)" in done.stdout
    assert "Registered v2 · 1.0.0+onnx-int8 (ready), derived from v1 · 1.0.0" in done.stdout
    version = ModelVersion.objects.get(version="1.0.0+onnx-int8")
    assert version.derived_from == parent and version.evaluation["agreement"] >= 0.97  # noqa: PLR2004
    printed = json.loads(done.stdout[done.stdout.index("{") :].split("\n}\n")[0] + "\n}")
    assert printed["agreement"] == version.evaluation["agreement"]
    assert printed["derived"]["backend"] == "onnx"

    # asked again: the version exists (immutable); its numbers are printed, nothing is made
    again = manage(stack, "optimise_model", "sightline-demo", "1.0.0", "--to", "onnx-int8", "--no-wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Already made: v2 · 1.0.0+onnx-int8 (ready)" in again.stdout and '"agreement"' in again.stdout
    assert ModelVersion.objects.count() == 2  # noqa: PLR2004
