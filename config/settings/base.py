"""Settings shared by every environment. Everything that differs comes from the environment."""

import warnings
from datetime import timedelta
from pathlib import Path

import environ
import pydicom.config  # noqa: F401  pydicom sets its logger's level when imported: before LOGGING's cap, not after

from core.logging import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent.parent
env = environ.Env()

# Runtime state for one machine: SQLite database, local media, model cache, pid files.
VAR_DIR = Path(env("SIGHTLINE_VAR_DIR", default=str(BASE_DIR / "var"))).resolve()

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_simplejwt.token_blacklist",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "axes",
    "csp",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "accounts",
    "recognition",
    "workers",
    "audit",
    "protocols",
    "dicomnet",
]

MIDDLEWARE = [
    # first: every answer, those other middleware give on their own included, is no-store
    # unless its path is named in SIGHTLINE_CACHEABLE_PATH_PREFIXES (core/cache_control.py)
    "core.cache_control.CacheControlMiddleware",
    "core.body_limit.RequestSizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "core.request_id.RequestIdMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "accounts.middleware.SessionLifetimeMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "accounts.middleware.StaffTwoFactorMiddleware",  # production: staff need a verified session for /admin/
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "core.errors.DomainErrorMiddleware",
    # last: turns a lockout flagged during authentication into the lockout page
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.tenancy",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'sightline.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # The web process and the worker write at the same time: WAL lets readers carry on, and
    # IMMEDIATE transactions take the write lock up front instead of failing on upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
# Persistent connections, SQLite's too (opening one costs its pragmas each time): the web process
# keeps its request threads (config/asgi_threads.py), so a thread's connection serves the next
# request; a health check before reuse replaces one that went away.
DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Request threads the web process keeps (and with them a database connection each); more
# concurrent requests than this each get a thread of their own for the request, as Django's do.
SIGHTLINE_WEB_THREADS = env.int("SIGHTLINE_WEB_THREADS", default=16)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # refuses locked-out username + IP pairs first
    "django.contrib.auth.backends.ModelBackend",
]
# Lockout after repeated failures for one username from one address, for the browser and the
# token endpoint alike; unknown usernames count exactly like known ones.
AXES_FAILURE_LIMIT = env.int("SIGHTLINE_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("SIGHTLINE_LOGIN_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
AXES_DISABLE_ACCESS_LOG = True  # successes are in Sightline's own access log
# The client address is REMOTE_ADDR only, never a header: behind nginx uvicorn sets it from the
# X-Forwarded-For the proxy overwrote, and only for connections from the proxy's address
# (--forwarded-allow-ips); a header a client sends itself is never read (axes uses ipware when
# installed, which would otherwise read X-Forwarded-For and friends first).
AXES_IPWARE_META_PRECEDENCE_ORDER = ("REMOTE_ADDR",)
AXES_IPWARE_PROXY_COUNT = None
AXES_IPWARE_PROXY_TRUSTED_IPS = None
# --- axes keeps no username (issue 11 item 13, branch ids) ---
# axes' AccessAttempt/AccessFailureLog rows and its log lines name the keyed hash of the
# username tried (core.pseudonym, purpose "username"), never what was typed: a password typed
# into the username field is not kept. POST data it copies masks the username field too.
AXES_USERNAME_CALLABLE = "accounts.signals.axes_username"
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address"]
# --- end axes username ---

# --- auth (issue 11, items 3, 5, 8): per-account limit and second factor ---------------------
# Per-account limit across addresses (accounts/lockout.py; axes cannot exempt known addresses
# from a per-username lock while keeping its per-address lock there): this many failures
# against one account within the window, from addresses it never signed in from, pause it for
# the cool-off everywhere except those addresses; the person and the hospital's admins are told.
AUTHENTICATION_BACKENDS.insert(1, "accounts.lockout.AccountLimitBackend")  # after axes, before the password
SIGHTLINE_ACCOUNT_FAILURE_LIMIT = env.int("SIGHTLINE_ACCOUNT_FAILURE_LIMIT", default=20)
SIGHTLINE_ACCOUNT_FAILURE_WINDOW = timedelta(minutes=env.int("SIGHTLINE_ACCOUNT_FAILURE_WINDOW_MINUTES", default=15))
SIGHTLINE_ACCOUNT_COOLOFF = timedelta(minutes=env.int("SIGHTLINE_ACCOUNT_COOLOFF_MINUTES", default=5))
SIGHTLINE_ACCOUNT_NOTICE_INTERVAL = timedelta(hours=1)  # at most one e-mail per account per hour
SIGHTLINE_KNOWN_ADDRESS_DAYS = env.int("SIGHTLINE_KNOWN_ADDRESS_DAYS", default=90)
# Enrolment codes for a first authenticator (hospital admins where required, platform staff).
SIGHTLINE_ENROLMENT_CODE_HOURS = env.int("SIGHTLINE_ENROLMENT_CODE_HOURS", default=24)
SIGHTLINE_STAFF_TWO_FACTOR = False  # production: True (the Django admin needs a verified session)
# --- end auth ----------------------------------------------------------------------------------

# Sessions end after SIGHTLINE_SESSION_IDLE_MINUTES without a request, and in any case
# SESSION_COOKIE_AGE after sign-in (accounts.middleware.SessionLifetimeMiddleware).
SESSION_COOKIE_AGE = env.int("SIGHTLINE_SESSION_MAX_HOURS", default=12) * 3600
SIGHTLINE_SESSION_IDLE_SECONDS = env.int("SIGHTLINE_SESSION_IDLE_MINUTES", default=30) * 60
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"

SIGHTLINE_INVITATION_DAYS = env.int("SIGHTLINE_INVITATION_DAYS", default=7)
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Sightline <no-reply@sightline.invalid>")
OTP_TOTP_ISSUER = "Sightline"

CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "recognition:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "templates" / "static"]
# Cache-Control: the only paths a browser or proxy may cache (everything else is no-store):
# static files, whose names carry their hash in production; the model files a browser screens
# with are served as static files, under the same prefix
SIGHTLINE_CACHEABLE_PATH_PREFIXES = env.list(
    "SIGHTLINE_CACHEABLE_PATH_PREFIXES", default=[f"/{STATIC_URL}", "/screening/models/"]
)
MEDIA_ROOT = VAR_DIR / "media"
# No MEDIA_URL is routed: image bytes are patient data and leave only through views that
# check access and write the access log.

# S3-compatible storage when a bucket is named, local files otherwise.
S3_BUCKET = env("SIGHTLINE_S3_BUCKET", default="")
if S3_BUCKET:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": env("SIGHTLINE_S3_ENDPOINT_URL", default=None),
            "region_name": env("SIGHTLINE_S3_REGION", default=None),
            "access_key": env("SIGHTLINE_S3_ACCESS_KEY_ID", default=None),
            "secret_key": env("SIGHTLINE_S3_SECRET_ACCESS_KEY", default=None),
            "default_acl": None,
            "querystring_auth": True,
            "file_overwrite": False,
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": MEDIA_ROOT, "file_permissions_mode": 0o640},
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # socket_timeout None: with redis-py 8 an idle consumer otherwise dies after 5 s.
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "interactive"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# a worker consumes its -Q queues in the order given (kombu's Redis transport: BRPOP over the keys
# in that order, never rotated), so "-Q interactive,bulk" takes bulk messages only when no
# interactive one waits; the default, round_robin, would alternate between them
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600, "queue_order_strategy": "priority"}
# housekeeping runs on its own queue, so it never holds up an inference worker that skips it
CELERY_TASK_ROUTES = {
    "workers.tasks.audit_verify": {"queue": "maintenance"},
    "workers.tasks.batch_expand": {"queue": "maintenance"},
    "workers.tasks.batch_reconcile": {"queue": "maintenance"},
    "workers.tasks.image_render_reconcile": {"queue": "maintenance"},
    "workers.tasks.model_validate": {"queue": "maintenance"},  # loads the package once, on CPU
    "workers.tasks.model_validate_reconcile": {"queue": "maintenance"},
    # on the interactive lane's queue: what it moves is interactive work, and the bulk worker that
    # takes maintenance is busiest exactly when screened negatives wait in its lane
    "workers.tasks.screened_negatives_promote": {"queue": "interactive"},
}
# beat moves screened negatives whose maximum wait is over to the interactive lane this often: a
# negative the browser's screen sent to the bulk lane is read at most its hospital's wait plus this late
SCREEN_PROMOTE_SECONDS = 30
CELERY_BEAT_SCHEDULE = {
    "reconcile-stuck-requests": {
        "task": "workers.tasks.batch_reconcile",
        "schedule": env.int("SIGHTLINE_RECONCILE_SECONDS", default=60),
    },
    "render-received-images": {  # decode: images whose render wake-up was lost (Redis keeps nothing)
        "task": "workers.tasks.image_render_reconcile",
        "schedule": env.int("SIGHTLINE_RECONCILE_SECONDS", default=60),
    },
    "validate-stalled-model-versions": {  # a registration whose check message was lost
        "task": "workers.tasks.model_validate_reconcile",
        "schedule": env.int("SIGHTLINE_RECONCILE_SECONDS", default=60),
    },
    "promote-screened-negatives": {
        "task": "workers.tasks.screened_negatives_promote",
        "schedule": SCREEN_PROMOTE_SECONDS,
    },
    "verify-audit-log": {
        "task": "workers.tasks.audit_verify",
        "schedule": env.int("SIGHTLINE_AUDIT_VERIFY_MINUTES", default=60) * 60,
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.MembershipJWTAuthentication",  # simplejwt's, user and memberships in one query
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # every cursor DRF hands out is sealed by the platform's one codec
    "DEFAULT_PAGINATION_CLASS": "core.cursor.OpaqueCursorPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "config.openapi.ContractAutoSchema",  # every operation documents its errors
    "EXCEPTION_HANDLER": "core.errors.api_exception_handler",
    "DEFAULT_METADATA_CLASS": None,  # OPTIONS answers 405 instead of describing a view
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=env.int("JWT_ACCESS_MINUTES", default=5)),
    "REFRESH_TOKEN_LIFETIME": timedelta(hours=env.int("JWT_REFRESH_HOURS", default=24)),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "ALGORITHM": "HS256",
    "AUDIENCE": "sightline-api",
    "ISSUER": "sightline",
    "UPDATE_LAST_LOGIN": False,
    "CHECK_REVOKE_TOKEN": True,  # a password change revokes the user's tokens
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Sightline API",
    "DESCRIPTION": "AI image recognition for hospitals. Findings are AI assistance, not a diagnosis.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # the document is a contract (config/openapi.py): /api/v1/ only, every error answer described
    "PREPROCESSING_HOOKS": ["config.openapi.only_api_v1"],
    # JSON bodies are documented as JSON only (uploads declare multipart themselves): one body
    # type per operation is what client generators handle
    "PARSER_WHITELIST": ["rest_framework.parsers.JSONParser"],
}

# Uploads: checked by content, then re-encoded before they are stored.
SIGHTLINE_MAX_UPLOAD_BYTES = env.int("SIGHTLINE_MAX_UPLOAD_BYTES", default=50 * 1024 * 1024)
SIGHTLINE_MAX_IMAGE_PIXELS = env.int("SIGHTLINE_MAX_IMAGE_PIXELS", default=40_000_000)  # per image or frame
SIGHTLINE_MAX_DICOM_FRAMES = env.int("SIGHTLINE_MAX_DICOM_FRAMES", default=300)
# decode: pixels one request may decode, all files and frames together (a 300-slice 512² CT);
# a DICOM past it, or in a compressed syntax, is received at once and rendered by a worker
SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST = env.int("SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST", default=300 * 512 * 512)
# decode: an image received but not rendered whose wake-up is older than this is woken again
SIGHTLINE_RENDER_STALL_SECONDS = env.int("SIGHTLINE_RENDER_STALL_SECONDS", default=600)
# a version still validating this long lost its check task and is sent again (checks take ~10 s)
SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS = env.int("SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS", default=300)
# a derived (optimised) version whose top-label agreement with its parent, on the held-out set its
# registration measured, is under this share cannot be given the production alias without force
# (the seed's advice: an int8 model keeps at least 97% of what the original decides)
SIGHTLINE_DERIVED_AGREEMENT_FLOOR = env.float("SIGHTLINE_DERIVED_AGREEMENT_FLOOR", default=0.97)
# bulk jobs' zip archives: entries, uncompressed bytes (declared and as read), ratio per entry
SIGHTLINE_ARCHIVE_MAX_ENTRIES = env.int("SIGHTLINE_ARCHIVE_MAX_ENTRIES", default=20_000)
SIGHTLINE_ARCHIVE_MAX_BYTES = env.int("SIGHTLINE_ARCHIVE_MAX_BYTES", default=8 * 1024**3)
SIGHTLINE_ARCHIVE_MAX_RATIO = env.float("SIGHTLINE_ARCHIVE_MAX_RATIO", default=100.0)
# a request still running after this long (any host) is requeued by the periodic reconciliation
SIGHTLINE_REQUEST_TIME_LIMIT_SECONDS = env.int("SIGHTLINE_REQUEST_TIME_LIMIT_SECONDS", default=600)
# an archive being stored, or expanded, that shows no progress for this long is taken over
SIGHTLINE_UPLOAD_STALL_SECONDS = env.int("SIGHTLINE_UPLOAD_STALL_SECONDS", default=300)
DATA_UPLOAD_MAX_NUMBER_FILES = env.int("SIGHTLINE_MAX_FILES_PER_UPLOAD", default=100)
# one browser upload of several files; the same cap belongs in the proxy (client_max_body_size)
SIGHTLINE_MAX_REQUEST_BYTES = env.int("SIGHTLINE_MAX_REQUEST_BYTES", default=512 * 1024 * 1024)

# Inference.
SIGHTLINE_DEFAULT_MODEL = env("SIGHTLINE_DEFAULT_MODEL", default="sightline-demo")
SIGHTLINE_INFERENCE_DEVICE = env("SIGHTLINE_INFERENCE_DEVICE", default="auto")
SIGHTLINE_MAX_BATCH_SIZE = env.int("SIGHTLINE_MAX_BATCH_SIZE", default=16)
# 0: a batch is what accumulated while the previous forward pass ran, so a lone request never
# waits for company; a version's manifest may set its own max_batch_size and max_wait_ms
SIGHTLINE_MAX_WAIT_MS = env.float("SIGHTLINE_MAX_WAIT_MS", default=0.0)
SIGHTLINE_MAX_ATTEMPTS = env.int("SIGHTLINE_MAX_ATTEMPTS", default=3)  # then a request ends failed, never loops
SIGHTLINE_DECODE_THREADS = env.int("SIGHTLINE_DECODE_THREADS", default=2)
# Two lanes (README, "Processes"): the work a worker process takes. interactive: interactive reads,
# and bulk ones only when none waits; bulk: bulk reads (and housekeeping) only; all: everything,
# for a single worker (tests, the smallest installs). The Procfile sets it per process.
SIGHTLINE_WORKER_LANE = env("SIGHTLINE_WORKER_LANE", default="all")
if SIGHTLINE_WORKER_LANE not in ("all", "interactive", "bulk"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"SIGHTLINE_WORKER_LANE must be all, interactive or bulk, not {SIGHTLINE_WORKER_LANE!r}")
# The interactive lane takes bulk work (when no clinician waits) in batches of at most this
# many: a clinician's read that arrives meanwhile waits for one small forward pass, not a full
# batch (on two cores a batch of 16 resnet18 images is ~250 ms). Measured on the quick bench
# (README, "Processes"): interactive p99 at c8 during a bulk backlog was 2.4x idle with full
# batches, 1.1x with batches of 2. The bulk lane, and a single worker for everything (lane "all"),
# take full batches.
SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH = env.int("SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH", default=2)
# ...and only once it has had no interactive message for this long (workers/bootsteps.py
# BulkWhenIdle): between two reads of a busy clinician the interactive queue is empty for tens of
# milliseconds, long enough to take a bulk bite the next read then waited for. 0: bulk work
# whenever the interactive queue is empty.
SIGHTLINE_INTERACTIVE_IDLE_SECONDS = env.float("SIGHTLINE_INTERACTIVE_IDLE_SECONDS", default=2.0)
# intra-op threads of a worker process; 0: every core it may run on, in either lane (the bulk
# lane yields by its CPU priority, workers/celery.py worker_torch_threads)
SIGHTLINE_TORCH_THREADS = env.int("SIGHTLINE_TORCH_THREADS", default=0)
# Uploads that want a read answer 429 (Retry-After) while this many interactive reads already
# wait, instead of joining a wait with no end; 0: never refuse. Bulk jobs are not counted.
SIGHTLINE_INTERACTIVE_QUEUE_MAX = env.int("SIGHTLINE_INTERACTIVE_QUEUE_MAX", default=200)
SIGHTLINE_INTERACTIVE_RETRY_AFTER_SECONDS = env.int("SIGHTLINE_INTERACTIVE_RETRY_AFTER_SECONDS", default=5)
SIGHTLINE_METRICS_TOKEN = env("SIGHTLINE_METRICS_TOKEN", default="")  # when set, /metrics needs it as a bearer
# /metrics: batch sizes, latencies and outcomes over the requests finished this recently
SIGHTLINE_METRICS_WINDOW_SECONDS = env.int("SIGHTLINE_METRICS_WINDOW_SECONDS", default=300)
# transient errors (storage 5xx or throttling, a dropped connection: core/transient.py):
# reading one image is tried again in place this many times, then the request goes back to the
# queue with a backoff; after SIGHTLINE_TRANSIENT_RETRIES such requeues it fails, in words
SIGHTLINE_READ_TRIES = env.int("SIGHTLINE_READ_TRIES", default=3)
SIGHTLINE_TRANSIENT_RETRIES = env.int("SIGHTLINE_TRANSIENT_RETRIES", default=8)
SIGHTLINE_TRANSIENT_BACKOFF_MAX_SECONDS = env.int("SIGHTLINE_TRANSIENT_BACKOFF_MAX_SECONDS", default=120)
# model registration: TorchScript packages carry code, not only weights; refused unless allowed
SIGHTLINE_ALLOW_TORCHSCRIPT = env.bool("SIGHTLINE_ALLOW_TORCHSCRIPT", default=False)
# Grad-CAM on request (viewer, export): a request not answered this long (its message lost, its
# worker gone) is sent again by the next one who asks; one pass is ~5 ms, the rest is the queue
SIGHTLINE_HEATMAP_STALL_SECONDS = env.int("SIGHTLINE_HEATMAP_STALL_SECONDS", default=60)
SIGHTLINE_MAX_BATCHES_PER_TASK = env.int("SIGHTLINE_MAX_BATCHES_PER_TASK", default=16)
# GPU back-pressure: a worker stops taking tasks while its GPU stays above this (workers.bootsteps).
# The interactive lane never pauses (100: utilisation never exceeds it): the GPU it shares is busy
# mostly with the bulk lane beside it, which pauses instead; a person's read does not wait for that.
SIGHTLINE_GPU_BUSY_PERCENT = env.float(
    "SIGHTLINE_GPU_BUSY_PERCENT", default=100.0 if SIGHTLINE_WORKER_LANE == "interactive" else 85.0
)
SIGHTLINE_GPU_SAMPLE_SECONDS = env.float("SIGHTLINE_GPU_SAMPLE_SECONDS", default=1.0)
# loaded models a worker process keeps (weights and buffers), least recently used evicted first
# torch.compile (frozen, dynamic batch) when a worker loads a model: faster forward passes for
# 15–40 s more per model at load; see README's benchmark before switching it on
SIGHTLINE_TORCH_COMPILE = env.bool("SIGHTLINE_TORCH_COMPILE", default=False)
# the forward pass's backend (workers/engine/backends.py): "auto" measures eager PyTorch and
# ONNX Runtime on the CPU when a worker loads a model (eager serves meanwhile) and keeps the
# fastest that agrees with eager within AGREEMENT_ATOL; on CUDA it stays with PyTorch. Measured
# (make bench, 2 cores): onnx ×1.3–1.45 over eager channels_last for resnet18 at batch 1 and 8
SIGHTLINE_INFERENCE_BACKEND = env("SIGHTLINE_INFERENCE_BACKEND", default="auto")
SIGHTLINE_MODEL_CACHE_MB = env.int("SIGHTLINE_MODEL_CACHE_MB", default=2048)
SIGHTLINE_MODEL_CACHE_DIR = Path(env("SIGHTLINE_MODEL_CACHE_DIR", default=str(VAR_DIR / "model-cache")))
SIGHTLINE_MODEL_BUILD_DIR = Path(env("SIGHTLINE_MODEL_BUILD_DIR", default=str(VAR_DIR / "models")))
SIGHTLINE_DEMO_PASSWORD = env("SIGHTLINE_DEMO_PASSWORD", default="sightline-demo")

# --- keys and rotation (issue 11 items 7 and 10, branch ids) ---
# Old site secrets still accepted for what they signed (sessions, page cursors, reset links);
# comma-separated, newest first. Rotate: new DJANGO_SECRET_KEY, old one here, drop it later.
SECRET_KEY_FALLBACKS = env.list("DJANGO_SECRET_KEY_FALLBACKS", default=[])
# The pseudonym key ring (core.pseudonym): new pseudonyms under the key, lookups under every
# key. Production requires the key; test and local settings give a labelled development key.
SIGHTLINE_PSEUDONYM_KEY = env("SIGHTLINE_PSEUDONYM_KEY", default=None)
SIGHTLINE_PSEUDONYM_KEY_FALLBACKS = env.list("SIGHTLINE_PSEUDONYM_KEY_FALLBACKS", default=[])
# site secrets under which pseudonyms of the old 48-bit scheme were made: found, never made
SIGHTLINE_PSEUDONYM_LEGACY_SECRET_KEYS = env.list("SIGHTLINE_PSEUDONYM_LEGACY_SECRET_KEYS", default=[])
# --- end keys and rotation ---

# JSON lines (one object per line: time, level, logger, message, role, request_id, ...) or plain
# text; production defaults to json (config/settings/production.py), local and test to plain.
# Every process's lines go through one handler on stderr (core/logging.py).
SIGHTLINE_LOG_FORMAT = env("SIGHTLINE_LOG_FORMAT", default="plain")
LOGGING = logging_config(log_format=SIGHTLINE_LOG_FORMAT, level=env("LOG_LEVEL", default="INFO"))
# ... and the same messages as Python warnings, which a worker's stderr would carry into its log
warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")

# --- service accounts (issue 11, item 4) ------------------------------------------------------
# Hospital service accounts sign in with API keys only (`Authorization: Bearer slk_...`): the
# key class runs before the JWT class, claims only its own prefix and leaves every other bearer
# token to simplejwt. Their passwords, sessions and the token endpoint refuse them (the backend).
REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"].insert(0, "accounts.authentication.ApiKeyAuthentication")
REST_FRAMEWORK["DEFAULT_THROTTLE_CLASSES"] = ["accounts.authentication.ApiKeyRateThrottle"]
AUTHENTICATION_BACKENDS.insert(1, "accounts.authentication.ServiceAccountBackend")  # after axes' lockout
# each key's limit, requests per minute, unless its admin gives it another (1 to 6,000)
SIGHTLINE_API_KEY_RATE_PER_MINUTE = env.int("SIGHTLINE_API_KEY_RATE_PER_MINUTE", default=600)
# The rate limit counts in the cache, which every web process must share: Redis (REDIS_URL
# unless SIGHTLINE_CACHE_URL names another). Counters are keyed on the key's random public id.
CACHES = {
    "default": {
        "BACKEND": "core.redis_cache.SharedPoolRedisCache",
        "LOCATION": env("SIGHTLINE_CACHE_URL", default=REDIS_URL),
        "KEY_PREFIX": env("SIGHTLINE_CACHE_PREFIX", default="sightline"),
    }
}
# two sets of choices for fields named "role": every role (members) and three (service accounts)
SPECTACULAR_SETTINGS.setdefault("ENUM_NAME_OVERRIDES", {}).update(
    RoleEnum="accounts.models.Role",
    ServiceAccountRoleEnum="accounts.service_accounts.SERVICE_ACCOUNT_ROLE_CHOICES",
)
# --- end service accounts ---------------------------------------------------------------------

# Bulk uploads (issue 11, intake): unpacking an archive or a prefix that stops this many times in a
# row without making a new item (a worker crash, a storage or database failure) is refused in
# words and its archive deleted, instead of being unpacked again by reconciliation forever.
SIGHTLINE_UPLOAD_MAX_ATTEMPTS = env.int("SIGHTLINE_UPLOAD_MAX_ATTEMPTS", default=3)

# --- model-server protocols (issue 14: protocols/) --------------------------------------------
# how long a protocol request waits for its read before answering 504 with the request id (the
# read goes on; its result stays on the image's API page)
SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS = env.float("SIGHTLINE_PROTOCOL_TIMEOUT_SECONDS", default=30.0)
# members of these roles send their protocol reads to the interactive lane (service accounts: the
# account's own "interactive" flag); everyone else's go to the bulk lane
SIGHTLINE_PROTOCOL_INTERACTIVE_ROLES = env.list("SIGHTLINE_PROTOCOL_INTERACTIVE_ROLES", default=[])
# --- end model-server protocols ----------------------------------------------------------------

# --- DICOM networking (issue 15: dicomnet/) ---------------------------------------------------
# The C-STORE SCP (`manage.py dicom_scp`, a process of its own in `make run` and the Procfile).
SIGHTLINE_DICOM_HOST = env("SIGHTLINE_DICOM_HOST", default="127.0.0.1")
SIGHTLINE_DICOM_PORT = env.int("SIGHTLINE_DICOM_PORT", default=11112)
# DICOM over TLS (PS3.15 B.1): a certificate and key turn it on; a CA file asks every node for a
# client certificate (mutual TLS), and a node with a fingerprint must present exactly that one
SIGHTLINE_DICOM_TLS_CERT = env("SIGHTLINE_DICOM_TLS_CERT", default="")
SIGHTLINE_DICOM_TLS_KEY = env("SIGHTLINE_DICOM_TLS_KEY", default="")
SIGHTLINE_DICOM_TLS_CA = env("SIGHTLINE_DICOM_TLS_CA", default="")
# limits: associations at once, the largest PDU taken, the bytes one association may deliver
SIGHTLINE_DICOM_MAX_ASSOCIATIONS = env.int("SIGHTLINE_DICOM_MAX_ASSOCIATIONS", default=10)
# of those, the most one hospital's nodes may hold at once (past it: rejected, transient)
SIGHTLINE_DICOM_MAX_ASSOCIATIONS_PER_HOSPITAL = env.int("SIGHTLINE_DICOM_MAX_ASSOCIATIONS_PER_HOSPITAL", default=4)
SIGHTLINE_DICOM_MAX_PDU = env.int("SIGHTLINE_DICOM_MAX_PDU", default=65536)
SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES = env.int("SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES", default=2 * 1024**3)
# association timeouts (seconds): ACSE negotiation, DIMSE messages, an idle network
SIGHTLINE_DICOM_TIMEOUT = env.float("SIGHTLINE_DICOM_TIMEOUT", default=30.0)
# rejected associations from one address: this many within the window, then refused unread
SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW = env.int("SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW", default=5)
SIGHTLINE_DICOM_REJECTION_WINDOW_SECONDS = env.int("SIGHTLINE_DICOM_REJECTION_WINDOW_SECONDS", default=300)
# PACS destinations: the sender task's retries (exponential back-off from the first delay)
SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS = env.int("SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS", default=6)
SIGHTLINE_DICOM_SEND_RETRY_SECONDS = env.float("SIGHTLINE_DICOM_SEND_RETRY_SECONDS", default=30.0)
# the platform's UID root for objects it makes (an SR, a map): 2.25 (UUID-derived) unless the
# operator has an organisational root
SIGHTLINE_DICOM_UID_ROOT = env("SIGHTLINE_DICOM_UID_ROOT", default="")
# The platform's own AE title (the calling AE title its C-STORE SCU sends with)
SIGHTLINE_DICOM_AE_TITLE = env("SIGHTLINE_DICOM_AE_TITLE", default="SIGHTLINE")
# PACS destinations (dicomnet/sending.py): the key their STOW-RS secrets are encrypted with (HKDF
# of it; unset: of SECRET_KEY, so changing SECRET_KEY then makes them unreadable, to enter again)
SIGHTLINE_DESTINATION_KEY = env("SIGHTLINE_DESTINATION_KEY", default="")
# a delivery left "sending" this long (its worker died mid-send) is due again; a send takes at
# most a few DICOM timeouts
SIGHTLINE_DICOM_SEND_STALL_SECONDS = env.int("SIGHTLINE_DICOM_SEND_STALL_SECONDS", default=600)
# the sweep that re-enqueues due deliveries (a lost message, a broker that was down)
SIGHTLINE_DICOM_RECONCILE_SECONDS = env.int("SIGHTLINE_RECONCILE_SECONDS", default=60)
# an export waits for the heatmap its map is made of: asks again this often, this many times
# (then the sweep follows it for a day)
SIGHTLINE_DICOM_MAP_WAIT_SECONDS = env.float("SIGHTLINE_DICOM_MAP_WAIT_SECONDS", default=5.0)
SIGHTLINE_DICOM_MAP_WAIT_TRIES = env.int("SIGHTLINE_DICOM_MAP_WAIT_TRIES", default=60)
# sending runs on the housekeeping lane (the bulk node's worker), never before a clinician's read
CELERY_TASK_ROUTES.update(
    {
        f"dicomnet.tasks.{name}": {"queue": "maintenance"}
        for name in ("delivery_send", "result_export", "review_export", "map_follow", "deliveries_reconcile")
    }
)
CELERY_BEAT_SCHEDULE["send-due-deliveries"] = {  # deliveries whose message was lost (Redis keeps nothing)
    "task": "dicomnet.tasks.deliveries_reconcile",
    "schedule": SIGHTLINE_DICOM_RECONCILE_SECONDS,
}
# PACS destinations may not point at loopback, link-local (169.254.0.0/16 with the cloud metadata
# address, fe80::/10), unspecified or multicast addresses (checked at save, test and send) unless
# inside one of these networks (CIDRs, comma-separated); private ranges are always allowed
SIGHTLINE_DESTINATION_ALLOWED_NETWORKS = env.list("SIGHTLINE_DESTINATION_ALLOWED_NETWORKS", default=[])
# --- end DICOM networking ------------------------------------------------------------------------
