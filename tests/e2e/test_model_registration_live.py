"""Registration off the web process, end to end: ``register_model`` stores the package and waits
while a real Celery worker (the stack's, consuming the maintenance queue) runs the checks; the
command prints the verdict, and the version's status is on record."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

from recognition.models import ModelAlias, ModelVersion
from tests.e2e.conftest import database_url
from tests.integration.test_registry import variant

pytestmark = pytest.mark.e2e


def register(stack, package, *args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": stack.redis_url,
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
    }
    return subprocess.run(
        [sys.executable, "manage.py", "register_model", str(package), "--timeout", "120", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_register_model_waits_for_a_worker_and_prints_the_verdict(stack, transactional_db, demo_package, tmp_path):
    done = register(stack, demo_package, "--alias", "production")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Stored sightline-demo 1.0.0; checking it on a worker" in done.stdout
    assert "Registered sightline-demo 1.0.0 (ready)" in done.stdout
    version = ModelVersion.objects.get()
    assert version.status == "ready" and version.validated_at is not None
    assert ModelAlias.objects.get(name="production").version == version

    wrong = register(stack, variant(demo_package, tmp_path, version="9.0.0", labels=["a", "b", "c"]))
    assert wrong.returncode != 0
    assert "Refused sightline-demo 9.0.0: weights do not fit resnet18" in wrong.stderr
    assert ModelVersion.objects.get(version="9.0.0").status == "refused"
