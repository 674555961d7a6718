"""Production: secrets and hosts must come from the environment; refuse to start without."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import env, logging_config

_MIN_SECRET_CHARS = 32  # a pseudonym key or metrics token shorter than this is refused

DEBUG = False
SECRET_KEY = env("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = [host for host in env.list("ALLOWED_HOSTS") if host]
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must name this deployment's hosts")

# issue 11 (ids): every process ingests or looks up patients (web, workers, beat), so each needs
# the pseudonym key of its own; no default, never the site secret
SIGHTLINE_PSEUDONYM_KEY = env("SIGHTLINE_PSEUDONYM_KEY")
for _key in (SIGHTLINE_PSEUDONYM_KEY, *SIGHTLINE_PSEUDONYM_KEY_FALLBACKS):  # noqa: F405
    if len(_key) < _MIN_SECRET_CHARS:
        raise ImproperlyConfigured("SIGHTLINE_PSEUDONYM_KEY and its fallbacks need at least 32 random characters")
    if _key in (SECRET_KEY, *SECRET_KEY_FALLBACKS):  # noqa: F405
        raise ImproperlyConfigured("SIGHTLINE_PSEUDONYM_KEY must differ from DJANGO_SECRET_KEY and its fallbacks")

# /metrics: totals across hospitals, for the platform's Prometheus only; never open in production
SIGHTLINE_METRICS_TOKEN = env("SIGHTLINE_METRICS_TOKEN", default="")
if len(SIGHTLINE_METRICS_TOKEN) < _MIN_SECRET_CHARS:
    raise ImproperlyConfigured(
        "SIGHTLINE_METRICS_TOKEN must be set to a random token of at least 32 characters: "
        "/metrics answers only a scrape that sends it as a bearer token"
    )

# TLS ends at nginx, which sets X-Forwarded-Proto. uvicorn (--proxy-headers --forwarded-allow-ips
# <the proxy>) turns it into the request's scheme on connections from the proxy only; Django's
# SECURE_PROXY_SSL_HEADER would believe the header from anyone who reaches a replica, so it is unset.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# probes and the scrape reach a replica directly over plain HTTP (Kubernetes, the multi-host script)
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=60 * 60 * 24 * 365)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

STATIC_ROOT = env("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "static"))  # noqa: F405
STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
}

# Invitations are e-mailed: EMAIL_URL such as smtp+tls://user:password@mail.example.org:587
vars().update(env.email_url("EMAIL_URL", default="smtp://localhost:25"))

# Platform staff reach the Django admin only with a session verified by a second factor.
SIGHTLINE_STAFF_TWO_FACTOR = True

# JSON lines for the log shipper (README, "Logs"); SIGHTLINE_LOG_FORMAT=plain for a person reading
SIGHTLINE_LOG_FORMAT = env("SIGHTLINE_LOG_FORMAT", default="json")
LOGGING = logging_config(log_format=SIGHTLINE_LOG_FORMAT, level=env("LOG_LEVEL", default="INFO"))
