"""Logging filters the settings attach to other libraries' loggers."""

import logging


class RedactQueryStrings(logging.Filter):
    """uvicorn logs every WebSocket handshake with its path and query string, and API clients
    carry their access token there (``/ws/events/?token=…``); DICOMweb's QIDO-RS searches name a
    PatientID or AccessionNumber there (``/dicomweb/studies?PatientID=…``): keep the path, drop
    the query (uvicorn's and runserver's access lines too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] + "?[redacted]" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


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
            return {key: value for key, value in self._request.META.items() if key != "QUERY_STRING"}
        return getattr(self._request, name)

    def get_full_path(self, force_append_slash: bool = False) -> str:
        return self._request.path

    def build_absolute_uri(self, location=None) -> str:
        return self._request.build_absolute_uri(location or self._request.path)

    def __repr__(self) -> str:
        return f"<{type(self._request).__name__}: {self._request.method} {self._request.path!r}>"


class RedactRequestQuery(logging.Filter):
    """Django's request warnings (``django.request``: every 4xx and 5xx) carry the request in
    the record, query string and all: DICOMweb's QIDO names a PatientID or AccessionNumber there.
    The record keeps a stand-in without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        if request is not None and not isinstance(request, _QuerylessRequest) and request.META.get("QUERY_STRING"):
            record.request = _QuerylessRequest(request)
        return True
