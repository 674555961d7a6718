"""Development on one machine: `make run`."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env("DJANGO_SECRET_KEY", default="local-development-only-not-a-secret-0123456789")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
WHITENOISE_USE_FINDERS = True

# issue 11 (ids): a development pseudonym key, labelled as such; production has no default
SIGHTLINE_PSEUDONYM_KEY = env("SIGHTLINE_PSEUDONYM_KEY", default="local-development-only-pseudonym-key-not-a-secret")
