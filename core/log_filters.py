"""Logging filters the settings attach to other libraries' loggers."""

import logging


class RedactQueryStrings(logging.Filter):
    """uvicorn logs every WebSocket handshake with its path and query string, and API clients
    carry their access token there (``/ws/events/?token=…``): keep the path, drop the query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] + "?[redacted]" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True
