"""Log lines for every process: one JSON object per line (``SIGHTLINE_LOG_FORMAT=json``) or plain
text, each naming its process role and, when there is one, the request id it serves.

The request id lives in a context variable: the web's ASGI layer binds it per request
(core/request_log.py), a Celery task runs under the id its publisher sent in a message header
(workers/celery.py), and the DICOM receiver binds one per association.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

ROLES = ("web", "worker", "beat", "dicom", "manage")
ROLE_ENV = "SIGHTLINE_PROCESS_ROLE"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sightline_request_id", default="")
_role: str | None = None


def current_request_id() -> str:
    return _request_id.get()


def bind_request_id(request_id: str) -> contextvars.Token:
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


MS_PER_SECOND = 1000  # the lines' durations are in ms
REQUEST_ID_FORM = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # what a proxy's X-Request-ID may be


def new_request_id(incoming: str = "") -> str:
    """The proxy's X-Request-ID when well-formed, else a new one."""
    return incoming if REQUEST_ID_FORM.match(incoming) else uuid.uuid4().hex


@contextmanager
def request_id_bound(request_id: str) -> Iterator[None]:
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def _role_from_argv(argv: list[str]) -> str:
    """What this process is, from how it was started (the Procfile's and the manifests' commands)."""
    words = [os.path.basename(word) for word in argv]
    if any(word.startswith("celery") for word in words[:1]) or "celery" in words:
        if "beat" in words:
            return "beat"
        return "worker"
    if "dicom_scp" in words:
        return "dicom"
    if any(word.startswith(("uvicorn", "daphne", "gunicorn")) for word in words):
        return "web"
    return "manage"


def process_role() -> str:
    """``SIGHTLINE_PROCESS_ROLE`` when set, else read from the command line (once per process)."""
    global _role
    if _role is None:
        explicit = os.environ.get(ROLE_ENV, "")
        _role = explicit if explicit in ROLES else _role_from_argv(sys.argv)
    return _role


def set_process_role(role: str) -> None:
    global _role
    _role = role


class ContextFilter(logging.Filter):
    """Stamps each record with the process role and the bound request id (a record that already
    names one, e.g. ``extra={"request_id": ...}``, keeps its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = process_role()
        if not getattr(record, "request_id", ""):
            record.request_id = _request_id.get() or None
        return True


class JsonFormatter(_JsonFormatter):
    """time, level, logger, message, role, request_id, then whatever the call passed in ``extra``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s %(message)s")
        kwargs.setdefault("rename_fields", {"asctime": "time", "levelname": "level", "name": "logger"})
        kwargs.setdefault("datefmt", "%Y-%m-%dT%H:%M:%S%z")
        super().__init__(*args, **kwargs)

    def add_fields(self, log_record: dict, record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record.pop("color_message", None)  # uvicorn's copy of the message with terminal colours
        log_record.setdefault("role", getattr(record, "role", process_role()))
        log_record.setdefault("request_id", getattr(record, "request_id", None))
        if log_record.get("request_id") is None:
            log_record.pop("request_id", None)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        from datetime import UTC, datetime

        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class PlainFormatter(logging.Formatter):
    """The plain text line, with the role and the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(role)s %(name)s %(message)s%(rid)s")

    def format(self, record: logging.LogRecord) -> str:
        record.role = getattr(record, "role", process_role())
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        return super().format(record)


def logging_config(*, log_format: str, level: str) -> dict:
    """The settings' LOGGING: one console handler, JSON or plain, every library's lines through
    it (uvicorn's own handlers replaced, so its lines are JSON too, and its access log stays off:
    the web line is core/request_log.py's)."""
    if log_format not in ("json", "plain"):
        raise ValueError(f"SIGHTLINE_LOG_FORMAT must be json or plain, not {log_format!r}")
    own = {"handlers": ["console"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "core.logging.JsonFormatter"},
            "plain": {"()": "core.logging.PlainFormatter"},
        },
        "filters": {
            "context": {"()": "core.logging.ContextFilter"},
            "redact_query": {"()": "core.log_filters.RedactQueryStrings"},
            "redact_request_query": {"()": "core.log_filters.RedactRequestQuery"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": log_format,
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # the ASGI server's lines (its handshakes name the query string, where API tokens ride)
            "uvicorn": {**own, "level": level},
            "uvicorn.error": {**own, "filters": ["redact_query"]},
            # off: the web line is core/request_log.py's; if an operator turns it on, no query
            # string: DICOMweb's QIDO carries PatientID and AccessionNumber there (dicomnet/dicomweb/)
            "uvicorn.access": {**own, "level": "WARNING", "filters": ["redact_query"]},
            "django.server": {"filters": ["redact_query"]},  # runserver's request lines, likewise
            "django.request": {"filters": ["redact_request_query"]},  # a 4xx warning's record holds the request
            "django.security.csrf": {"filters": ["redact_request_query"]},  # its refusals, likewise
            "axes": {"level": "WARNING"},
            # pydicom's warnings quote the values they find invalid (a patient's birth date, a name);
            # pynetdicom's DEBUG dumps whole datasets: capped here for every process (web, Celery, SCP)
            "pydicom": {"level": "ERROR"},
            "pynetdicom": {"level": "INFO"},
            # the worker's per-task line is workers/celery.py's; Celery's own "received"/"succeeded"
            # lines would double it (failures still log, with their traceback)
            "celery.app.trace": {"level": "WARNING"},
            "celery.worker.strategy": {"level": "WARNING"},
            "celery.beat": {"level": "WARNING"},  # beat's one line per send is workers/celery.py's too
        },
    }
