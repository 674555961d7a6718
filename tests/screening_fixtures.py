"""The screening package for tests, trained once per machine and cached beside the demo model's
(var/test-cache/sightline-screen-1.0.0.zip), shared by the screening model's, the routing's and
the browser's tests. Import the fixtures into a test module::

    from tests.screening_fixtures import screening_package, screening_version  # noqa: F401
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

import pytest
from django.conf import settings

from workers.engine import screening

SCREENING_CACHE = (
    Path(settings.BASE_DIR) / "var" / "test-cache" / f"{screening.SCREEN_NAME}-{screening.SCREEN_VERSION}.zip"
)


def cached_screening_package() -> Path:
    """The cached package, built when missing (about a minute on 2 cores). A lock file keeps two
    test runs on one machine (helpers, CI's two passes) from training it twice at once."""
    if SCREENING_CACHE.exists():
        return SCREENING_CACHE
    SCREENING_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(SCREENING_CACHE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not SCREENING_CACHE.exists():
            with tempfile.TemporaryDirectory(dir=SCREENING_CACHE.parent) as folder:
                report = screening.build_screening_package(Path(folder))
                shutil.move(report.package, SCREENING_CACHE)  # same file system: an atomic rename
    return SCREENING_CACHE


@pytest.fixture(scope="session")
def screening_package() -> Path:
    return cached_screening_package()


@pytest.fixture
def screening_version(db, screening_package):
    """sightline-screen 1.0.0 registered through the registration task's path, browser
    distribution confirmed: ready, with its evaluation (held-out accuracy, bytes) recorded."""
    from workers.registration import model_version_register

    version, _ = model_version_register(package_path=screening_package, alias=None, browser_distribution_allowed=True)
    return version


def screening_turn_on(tenant, version, **fields):
    """The hospital screens with ``version`` (its HospitalSettings row, created or changed)."""
    from recognition.models import HospitalSettings

    row, _ = HospitalSettings.objects.update_or_create(
        tenant=tenant, defaults={"screening_enabled": True, "screening_version": version, **fields}
    )
    return row
