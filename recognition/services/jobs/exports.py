"""A job's results as a CSV (spreadsheet-safe cells) or JSON document, a row at a time: the rows
are ``job_selectors.batch_results``, read in chunks, so an export of any size streams."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from core.spreadsheet import spreadsheet_safe

from ...job_selectors import batch_results
from ...models import BatchJob


def results_csv(job: BatchJob) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = ["item", "position", "image", "status", "top_label", "probability", "model_version", "error"]
    writer.writerow(columns)
    for row in batch_results(job):
        writer.writerow([spreadsheet_safe(row[column]) for column in columns])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def results_json(job: BatchJob) -> Iterator[str]:
    yield f'{{"job": {job.pk}, "results": ['
    for index, row in enumerate(batch_results(job)):
        yield ("," if index else "") + json.dumps(row)
    yield "]}"
