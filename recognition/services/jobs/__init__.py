"""Bulk jobs, one module per concern: ``lifecycle`` (create, start, cancel, retry), ``intake``
(files, a zip, a storage prefix), ``expansion`` (the worker unpacking them, and reconciliation),
``bookkeeping`` (items following inference outcomes) and ``exports`` (results as CSV or JSON).
Their reads (one job, the list, progress, results) are ``recognition/job_selectors.py``."""

from .bookkeeping import batch_items_on_outcome, batch_jobs_notify
from .expansion import batch_upload_expand, batch_uploads_reconcile
from .exports import results_csv, results_json
from .intake import batch_items_add_files, batch_upload_prefix, batch_upload_zip
from .lifecycle import batch_job_cancel, batch_job_create, batch_job_retry, batch_job_start, batch_results_open

__all__ = [
    "batch_items_add_files",
    "batch_items_on_outcome",
    "batch_job_cancel",
    "batch_job_create",
    "batch_job_retry",
    "batch_job_start",
    "batch_jobs_notify",
    "batch_results_open",
    "batch_upload_expand",
    "batch_upload_prefix",
    "batch_upload_zip",
    "batch_uploads_reconcile",
    "results_csv",
    "results_json",
]
