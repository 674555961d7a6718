"""The access log as CSV, a row at a time (the view streams it: core.streaming)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC

from django.db.models import QuerySet

from core.spreadsheet import Echo, spreadsheet_safe

CSV_CHUNK_ROWS = 2000  # the queryset's fetch size: one database round trip per 2,000 rows
CSV_COLUMNS = (
    "id",
    "time_utc",
    "hospital",
    "person",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "ip_address",
    "user_agent",
    "request_id",
    "chain",
    "sequence",
    "previous_hash",
    "entry_hash",
)


def access_log_csv_lines(entries: QuerySet) -> Iterator[str]:
    writer = csv.writer(Echo())
    yield writer.writerow(CSV_COLUMNS)
    for entry in entries.iterator(chunk_size=CSV_CHUNK_ROWS):
        row = (
            entry.pk,
            entry.created.astimezone(UTC).isoformat(timespec="microseconds"),
            entry.tenant.slug if entry.tenant else "",
            entry.actor_label,
            entry.action,
            entry.target_type,
            entry.target_id,
            entry.outcome,
            entry.ip_address,
            entry.user_agent,
            entry.request_id,
            entry.chain,
            entry.sequence,
            entry.previous_hash,
            entry.entry_hash,
        )
        yield writer.writerow([spreadsheet_safe(value) for value in row])
