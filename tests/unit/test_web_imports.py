"""The web process never runs a model, so it must not pay for torch (~800 MB resident)."""

import os
import subprocess
import sys

from django.conf import settings

PROBE = """
import sys
import django
django.setup()
import config.asgi
from django.core.management import call_command
from django.urls import get_resolver

def walk(patterns):
    for pattern in patterns:
        walk(getattr(pattern, "url_patterns", []))

walk(get_resolver().url_patterns)
import recognition.services.jobs, recognition.services.images, recognition.services.inference
import recognition.services.registry, recognition.health, recognition.routing, recognition.admin
call_command("check")
print(sorted(name for name in ("torch", "torchvision") if name in sys.modules))
"""


def test_the_web_process_does_not_import_torch():
    env = {"DJANGO_SETTINGS_MODULE": "config.settings.test", "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=settings.BASE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-1] == "[]", probe.stdout
