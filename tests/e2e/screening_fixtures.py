"""The real screening package for the browser tests (issue 17), built once and cached beside the
demo package (var/test-cache), as the contract says; import the fixture into a test module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PACKAGE_CACHE

SCREENING_CACHE = PACKAGE_CACHE.parent / "sightline-screen-1.0.0.zip"


@pytest.fixture(scope="session")
def screening_package() -> Path:
    """workers/engine/screening.py's package (about a minute on two cores the first time)."""
    if not SCREENING_CACHE.exists():
        from workers.engine.screening import build_screening_package

        SCREENING_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=SCREENING_CACHE.parent) as scratch:
            report = build_screening_package(Path(scratch))
            os.replace(report.package, SCREENING_CACHE)  # whole or not at all: other runs share the cache
    return SCREENING_CACHE
