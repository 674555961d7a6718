"""pydicom quotes the values it finds invalid (a birth date, a name) in its log and its warnings:
every process that loads the settings keeps both out of its output. Checked in a process of its
own, as a worker or the SCP starts (pytest's own warning capture would hide what a process prints)."""

from __future__ import annotations

import os
import subprocess
import sys

from django.conf import settings

PROBE = """
import django
django.setup()
from pydicom.dataset import Dataset
from recognition import dicom  # noqa: F401  (the platform's reader imports pydicom as the apps load)
ds = Dataset()
ds.PatientBirthDate = "1970-01-31"  # not a DA value: pydicom warns and logs it, quoting it
ds.PatientName = "Doe^Jane\\\\Smith"
print("probe done")
"""


def test_a_process_prints_no_value_pydicom_finds_invalid():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "PYTHONWARNINGS": ""}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "probe done" in done.stdout
    output = done.stdout + done.stderr
    assert "1970-01-31" not in output, output[-2000:]
