"""schemathesis hooks for the contract run (loaded through tests/contract/schemathesis.toml)."""

from __future__ import annotations

import schemathesis


@schemathesis.hook
def map_case(context, case):
    """A page cursor is opaque: only one the server handed out (`next`/`next_cursor`) is a valid
    request, which JSON Schema cannot say. Positive cases ask for the first page; a made-up cursor
    stays in the negative cases, where the server must refuse it (400, documented)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    for container in (case.query, case.body):
        if isinstance(container, dict) and container.get("cursor"):
            del container["cursor"]
    return case
