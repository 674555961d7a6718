"""The test suite. Services are real: Redis, SQLite or PostgreSQL (DATABASE_URL)."""

import os
from pathlib import Path

os.environ.setdefault("SIGHTLINE_VAR_DIR", str(Path(__file__).resolve().parents[2] / "var" / "test"))
# the cache is the machine's Redis: one prefix per test run, inherited by the run's own servers
os.environ.setdefault("SIGHTLINE_CACHE_PREFIX", f"test-{os.getpid()}")

from .base import *  # noqa: E402, F403
from .base import DATABASES, VAR_DIR, env  # noqa: E402

DEBUG = False
SECRET_KEY = env("DJANGO_SECRET_KEY", default="test-only-not-a-secret-0123456789abcdef")
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
WHITENOISE_USE_FINDERS = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.locmem.EmailBackend")
# End-to-end tests share the test database with a worker and an ASGI server in other
# processes, so SQLite's test database is a file, never in memory.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

# eager unless a test asks: "auto" exports an ONNX graph per model load (seconds), which the
# engine's own tests (tests/unit/test_backends.py) and tests/integration/test_backend_choice.py cover
SIGHTLINE_INFERENCE_BACKEND = env("SIGHTLINE_INFERENCE_BACKEND", default="eager")

# issue 11 (ids): a development pseudonym key, labelled as such; production has no default
SIGHTLINE_PSEUDONYM_KEY = env("SIGHTLINE_PSEUDONYM_KEY", default="test-only-pseudonym-key-not-a-secret-0123456789")

# A test database of its own on a shared PostgreSQL, for checkouts that test at the same time.
if env("SIGHTLINE_TEST_DB_NAME", default=""):
    DATABASES["default"]["TEST"] = {**DATABASES["default"].get("TEST", {}), "NAME": env("SIGHTLINE_TEST_DB_NAME")}

# issue 15: the tests' PACS (Orthanc, a recording HTTP server) listens on loopback, which a
# destination may point at only inside an operator's allowlist
SIGHTLINE_DESTINATION_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
