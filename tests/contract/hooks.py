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


@schemathesis.hook
def filter_case(context, case):
    """A multipart form has no types: a field "made" an integer, a boolean or null reaches the
    server as the text "-23", "false" or "null", which is a valid string. Such a case is not
    negative on the wire (schemathesis applies the same reasoning to query and path values, but
    not to forms that carry a file), so it is not sent as one."""
    meta = case.meta
    media_type = getattr(case, "media_type", None) or ""
    if meta is None or not meta.generation.mode.is_negative or not media_type.startswith("multipart/"):
        return True
    mutations = getattr(meta.phase.data, "mutations", ())
    text_on_the_wire = [
        mutation.operator == "change_type"
        and mutation.parameter_location == "body"
        and (mutation.new_value is None or isinstance(mutation.new_value, bool | int | float))
        for mutation in mutations
    ]
    return not (text_on_the_wire and all(text_on_the_wire))
