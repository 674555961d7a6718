"""The Celery side of transient errors: a task that tries again, with a backoff, when
``core.transient.is_transient`` says the same call will work in a moment."""

from __future__ import annotations

from typing import Any

from celery import Task

from core.transient import backoff_seconds, is_transient


class TransientRetryTask(Task):
    """A task that is tried again, with a backoff, when it raises a transient error, up to
    ``max_retries`` times; any other error, or the last retry's, is raised as it is."""

    abstract = True
    max_retries = 8
    retry_backoff_max = 30

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        directly = self.request.called_directly  # in a worker the tracer has pushed the request
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if directly or not is_transient(exc):
                raise
            raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries, cap=self.retry_backoff_max))
