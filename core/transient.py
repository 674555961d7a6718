"""The errors that mean "the same thing will work in a moment": named here, once.

A storage or network blip must never turn into a failure a clinician reads as the platform's
verdict. Every task and the worker's runtime ask ``is_transient(exc)``; what it names is tried
again (with a backoff), and only an attempt cap turns it into a failure, in words:

- object storage answering 5xx or throttling (``SlowDown``, ``Throttling``, ``RequestTimeout``…),
  or unreachable, timing out or cutting a response short (botocore's connection errors);
- ``OSError`` while reading (an NFS hiccup, a reset connection, EIO), except the ones that say
  the bytes are not there or never will be (``FileNotFoundError``, ``IsADirectoryError``,
  ``NotADirectoryError``, ``PermissionError``): retrying cannot bring those back;
- the database briefly unreachable or busy (Django's ``OperationalError``, ``InterfaceError``);
- the broker's connection (kombu's ``OperationalError``, redis-py's ``ConnectionError`` and
  ``TimeoutError``).

Nothing else is: a malformed package, a corrupt image, a bug fail at once, as before.
"""

from __future__ import annotations

import random
from contextlib import suppress

# S3 and S3-compatible servers: error codes that ask the client to come back later
STORAGE_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
SERVER_ERROR = 500  # 5xx: the storage's own fault, worth another try
_SHOWN_ERROR_CHARS = 200  # of an error's text in a failure's reason
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _transient_types() -> tuple[type[BaseException], ...]:
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerOperationalError

    found: list[type[BaseException]] = [OperationalError, InterfaceError, BrokerOperationalError]
    with suppress(ImportError):
        import redis.exceptions

        found += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    with suppress(ImportError):
        from botocore import exceptions as boto

        # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError are ConnectionErrors;
        # ReadTimeoutError and ConnectionClosedError are HTTPClientErrors
        found += [boto.ConnectionError, boto.HTTPClientError, boto.ResponseStreamingError, boto.IncompleteReadError]
    return tuple(found)


_TYPES: tuple[type[BaseException], ...] | None = None


def transient_types() -> tuple[type[BaseException], ...]:
    global _TYPES
    if _TYPES is None:
        _TYPES = _transient_types()
    return _TYPES


def _client_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of a botocore ClientError, None for anything else."""
    response = getattr(exc, "response", None)
    if type(exc).__name__ != "ClientError" or not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return code, int(status)


def is_transient(exc: BaseException) -> bool:
    """True when the same call is expected to work a little later."""
    client_error = _client_error(exc)
    if client_error is not None:
        code, status = client_error
        return (
            code in STORAGE_RETRY_CODES
            or status == 429
            or status >= SERVER_ERROR
            or code.isdigit()
            and int(code) >= SERVER_ERROR
        )
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (OSError, *transient_types())):  # builtin ConnectionError and TimeoutError are OSErrors
        return True
    # django-storages and others sometimes re-raise as their own error: look at the cause
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient(cause)


def transient_reason(exc: BaseException) -> str:
    """The error in a few words, for a request's failure once the retries are used up."""
    client_error = _client_error(exc)
    if client_error is not None:
        code, status = client_error
        return f"the storage answered {code or 'an error'}{f' ({status})' if status else ''}"
    if isinstance(exc, OSError):
        return f"the storage could not be read ({type(exc).__name__}: {exc.strerror or exc})"
    return f"{type(exc).__name__}: {str(exc)[:_SHOWN_ERROR_CHARS]}"


def backoff_seconds(retries: int, *, cap: float, base: float = 1.0) -> float:
    """Exponential with full jitter: 1, 2, 4… seconds, at most ``cap``; workers that hit the
    same blip together do not come back together."""
    ceiling = min(cap, base * 2 ** max(0, retries))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
