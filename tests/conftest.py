"""Personas and shared fixtures.

Three people, as the isolation tests need them: a clinician and a viewer of hospital A
(Demo General) and a clinician of hospital B (Demo Children's).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from accounts.models import Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from workers.engine import synthetic, training

PASSWORD = "correct-horse-battery-staple"

# What production settings need to start, for the tests that start them in a subprocess.
PRODUCTION_SECRET = "q8Zr3LmV0xT7cWn2pK5sJ9hB4dF6gY1aE0uI8oP3tR7yQ2wS5vX9zN4mC6bH1jL0kD"
PRODUCTION_ENVIRONMENT = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": PRODUCTION_SECRET,
    "ALLOWED_HOSTS": "sightline.example.org",
    "SIGHTLINE_PSEUDONYM_KEY": "a-pseudonym-key-of-its-own-not-the-site-secret-0123456789",
    "SIGHTLINE_METRICS_TOKEN": "m" * 40,
}


def production_env(**overrides: str | None) -> dict[str, str]:
    """This process's environment with what production settings need; an override of None
    removes that variable (for the tests of a refusal to start)."""
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(PRODUCTION_ENVIRONMENT)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


PACKAGE_CACHE = Path(settings.BASE_DIR) / "var" / "test-cache" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip"


# CI runs the suite twice (.ci/run): heavy tests that prove the same on either database run in
# one pass only. Unset (a developer's `make test`), everything runs.
CI_PASS_LEAVES_OUT = {"sqlite": "heavy_drill", "postgres": "heavy_any_db"}


def pytest_collection_modifyitems(config, items):
    ci_pass = os.environ.get("SIGHTLINE_CI_PASS", "")
    if ci_pass and ci_pass not in CI_PASS_LEAVES_OUT:
        raise pytest.UsageError(f"SIGHTLINE_CI_PASS is {ci_pass!r}; use sqlite or postgres")
    marker = CI_PASS_LEAVES_OUT.get(ci_pass)
    if marker is None:
        return
    left_out = [item for item in items if item.get_closest_marker(marker) or _once_without_database(item, ci_pass)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        chosen = set(map(id, left_out))
        items[:] = [item for item in items if id(item) not in chosen]


DATABASE_FIXTURES = {"db", "transactional_db"}  # pytest-django asks every test for its blocker


def _once_without_database(item, ci_pass: str) -> bool:
    """A unit test that touches no database proves the same in both passes: the SQLite pass runs
    it, the PostgreSQL pass leaves it out (~450 tests, about two minutes of a pass)."""
    if ci_pass != "postgres" or not item.nodeid.startswith("tests/unit/"):
        return False
    return not item.get_closest_marker("django_db") and not DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _no_wake_markers():
    """Wake-up markers (recognition.services.inference) live in the shared cache, keyed by model
    version id, which the next test's rolled-back database gives out again: each test starts
    with none, as a fresh deployment would. Remembered routing (recognition.services.registry)
    is keyed by hospital id, given out again too: this process forgets its own, and the routing
    generation counts up so that the servers a test started forget theirs."""
    import redis
    from django.core.cache import cache

    from recognition.services.registry import ROUTING_GENERATION_KEY, routing_forget

    routing_forget()
    try:
        client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"], socket_connect_timeout=1)
        stale = list(client.scan_iter(match=cache.make_key("sightline:wake:*"), count=1000))
        if stale:
            client.delete(*stale)
        client.incr(cache.make_key(ROUTING_GENERATION_KEY))
    except redis.exceptions.ConnectionError:  # no Redis for this test: nothing was marked in it
        pass


@pytest.fixture(scope="session", autouse=True)
def _fresh_media_root():
    """Stored files outlive the rolled-back rows that named them, and the worker's model cache
    keeps every package a test registered (a run writes about 4 GB of them, mostly derived
    versions): start each run with none and leave none behind, so repeated runs (CI runs the
    suite twice, on a disk other work shares) do not fill the disk."""
    for folder in (settings.MEDIA_ROOT, settings.SIGHTLINE_MODEL_CACHE_DIR):
        shutil.rmtree(folder, ignore_errors=True)
    yield
    for folder in (settings.MEDIA_ROOT, settings.SIGHTLINE_MODEL_CACHE_DIR):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _flush_holds_a_prune_permit():
    """Transactional tests empty the database with ``flush`` after each test. The access log's
    triggers refuse that, as they should; like `prune_audit_log`, the flush holds a permit."""
    from django.core.management.commands import flush

    original = flush.Command.handle

    def handle(self, **options):
        from django.db import connections

        from accounts.models import AccessEvent, AuditPrunePermit

        database = options.get("database", "default")
        AuditPrunePermit.objects.using(database).create()  # PostgreSQL's TRUNCATE trigger checks it
        with connections[database].cursor() as cursor:  # SQLite's row trigger: no rows left to refuse
            cursor.execute(f"DELETE FROM {AccessEvent._meta.db_table}")  # noqa: S608
        return original(self, **options)

    flush.Command.handle = handle
    yield
    flush.Command.handle = original


@pytest.fixture(scope="session")
def demo_package() -> Path:
    """The real demo model, trained once and reused by later runs (about 40 s on 2 cores)."""
    if not PACKAGE_CACHE.exists():
        report = training.train_demo_model(PACKAGE_CACHE)
        assert report.accuracy >= training.REQUIRED_ACCURACY
    return PACKAGE_CACHE


# The verdicts of the registration checks that load the model and compare its backends (1.0 s of
# a 1.1 s registration: an ONNX export, two forward passes) for these exact package bytes and
# manifest, found once per run: demo_model registers the same package for ~470 tests, and the
# checks are pure functions of those bytes (and the libraries, which do not change in a run).
# Every other registration (variants, tampered, derived packages) runs every check.
_REGISTRATION_VERDICTS: dict[tuple, dict] = {}
_REMEMBERED_CHECKS = {"check_loads_and_answers": ("handler",), "check_backends_agree": ("agreement",)}


def _remembered(check):
    attributes = _REMEMBERED_CHECKS[check.__name__]

    def run(candidate) -> None:
        version = candidate.version
        key = (check.__name__, version.package_sha256, json.dumps(version.manifest, sort_keys=True))
        if key not in _REGISTRATION_VERDICTS:
            check(candidate)  # a refusal raises and is not remembered
            _REGISTRATION_VERDICTS[key] = {name: getattr(candidate, name) for name in attributes}
        for name, value in _REGISTRATION_VERDICTS[key].items():
            setattr(candidate, name, value)

    return run


def register_demo(package: Path):
    """``model_version_register`` of the demo package, its load and agreement verdicts found once
    per run (above); the version row, the stored package, the access log and the alias are made
    afresh, as for any registration."""
    from unittest import mock

    from workers import registration

    checks = [_remembered(c) if c.__name__ in _REMEMBERED_CHECKS else c for c in registration.REGISTRATION_CHECKS]
    with mock.patch.object(registration, "REGISTRATION_CHECKS", checks):
        version, _ = registration.model_version_register(package_path=package)
    return version


@pytest.fixture
def demo_model(db, demo_package):
    return register_demo(demo_package)


@pytest.fixture
def hospital_a(db) -> Tenant:
    return Tenant.objects.create(name="Demo General", slug="demo-general")


@pytest.fixture
def hospital_b(db) -> Tenant:
    return Tenant.objects.create(name="Demo Children's", slug="demo-childrens")


def member(tenant, username, role):
    user = user_get_or_create(username=username, password=PASSWORD)
    return membership_grant(tenant=tenant, user=user, role=role)


@pytest.fixture
def clinician_a(hospital_a):
    return member(hospital_a, "clinician", Role.CLINICIAN)


@pytest.fixture
def viewer_a(hospital_a):
    return member(hospital_a, "viewer", Role.VIEWER)


@pytest.fixture
def clinician_b(hospital_b):
    return member(hospital_b, "clinician-b", Role.CLINICIAN)


def api_client_for(membership) -> APIClient:
    client = APIClient()
    client.force_authenticate(membership.user)
    return client


def png_bytes(*, opacity: bool = True, size: int = 256, seed: int = 1) -> bytes:
    return synthetic.render_png(np.random.default_rng(seed), size, opacity)


def jpeg_bytes(size: int = 128) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(synthetic.render(np.random.default_rng(3), size, False)).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def upload_file(data: bytes, name: str = "scan.png") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


def render_received(image) -> None:
    """What the worker does with a received PNG/JPEG upload as it reads it (workers/runner.py):
    decode the original, store the display copy, move it to rendered; for the tests that need
    the copy and not the read."""
    from django.db import transaction
    from PIL import Image

    from recognition.display import display_copy
    from recognition.services.images import image_display_store, image_rendered

    with image.original.open("rb") as stored, Image.open(stored) as decoded:
        decoded.load()
        copy = display_copy(decoded, image.format)
    name = image_display_store(image=image, copy=copy)
    with transaction.atomic():
        assert image_rendered(image=image, copy=copy, stored_name=name)
