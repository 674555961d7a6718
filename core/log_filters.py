"""Logging filters the settings attach to other libraries' loggers."""

import logging

from core.request_log import redact_path, redact_secret_paths


class RedactQueryStrings(logging.Filter):
    """uvicorn logs every WebSocket handshake with its path and query string, and API clients
    carry their access token there (``/ws/events/?token=…``); DICOMweb's QIDO-RS searches name a
    PatientID or AccessionNumber there (``/dicomweb/studies?PatientID=…``): keep the path, drop
    the query (uvicorn's and runserver's access lines too). A path that is a credential itself
    (an invitation link, core/request_log.py's ``SECRET_PATHS``) is redacted as well."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _queryless(redact_secret_paths(arg)) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def _queryless(text: str) -> str:
    return text.split("?", 1)[0] + "?[redacted]" if "?" in text else text


class _QuerylessRequest:
    """A request as a log record may carry it: everything but its query string (its repr, which
    a formatter's ``%(request)s`` prints, included)."""

    def __init__(self, request):
        self._request = request

    def __getattr__(self, name):
        if name == "GET":
            from django.http import QueryDict

            return QueryDict()
        if name == "META":
            meta = {key: value for key, value in self._request.META.items() if key != "QUERY_STRING"}
            if "PATH_INFO" in meta:
                meta["PATH_INFO"] = redact_path(meta["PATH_INFO"])
            return meta
        if name in ("path", "path_info"):
            return redact_path(getattr(self._request, name))
        return getattr(self._request, name)

    def get_full_path(self, force_append_slash: bool = False) -> str:
        return self.path

    def build_absolute_uri(self, location=None) -> str:
        return self._request.build_absolute_uri(location or self.path)

    def __repr__(self) -> str:
        return f"<{type(self._request).__name__}: {self._request.method} {self.path!r}>"


class RedactRequestQuery(logging.Filter):
    """Django's request warnings (``django.request``: every 4xx and 5xx; ``django.security.csrf``:
    a refused form) carry the request in the record, query string and all: DICOMweb's QIDO names a
    PatientID or AccessionNumber there. The record keeps a stand-in without it. Their message
    names the path ("Gone: /invitations/…/"): a credential path is redacted there and in the
    stand-in (core/request_log.py's ``SECRET_PATHS``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_secret_paths(arg) if isinstance(arg, str) else arg for arg in record.args)
        request = getattr(record, "request", None)
        if (
            request is not None
            and not isinstance(request, _QuerylessRequest)
            and (request.META.get("QUERY_STRING") or redact_path(request.path) != request.path)
        ):
            record.request = _QuerylessRequest(request)
        return True
