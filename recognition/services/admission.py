"""Admission of interactive uploads: refuse one (429, nothing stored) while the interactive lane's
backlog is at its bound, rather than let every person's wait grow without end."""

from __future__ import annotations

import logging

from django.conf import settings

from config.errors import Busy

from ..models import InferenceRequest, ModelVersion

logger = logging.getLogger(__name__)


class InteractiveBacklog(Busy):
    code = "interactive_backlog"


def interactive_backlog_at_most(bound: int) -> int:
    """The queued interactive reads, counted up to ``bound`` (the database is the truth: a broker
    list holds wake-ups, not reads, and loses them with a restart).

    One query that reads at most ``bound`` entries of the claim index (version, status,
    priority, id), one range per model version, whatever a bulk job has queued beside them."""
    waiting = InferenceRequest.objects.filter(
        model_version_id__in=ModelVersion.objects.values("id"),  # the index's first column
        status=InferenceRequest.Status.QUEUED,
        priority=InferenceRequest.Priority.INTERACTIVE,
    )
    return waiting.order_by()[:bound].count()


def interactive_admission() -> None:
    """Raise ``InteractiveBacklog`` when ``SIGHTLINE_INTERACTIVE_QUEUE_MAX`` interactive reads
    already wait (0: no bound). Called by the upload views before anything is read or stored;
    an upload let in may take the backlog past the bound by its own files."""
    bound = settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX
    if bound <= 0 or interactive_backlog_at_most(bound) < bound:
        return
    retry_after = settings.SIGHTLINE_INTERACTIVE_RETRY_AFTER_SECONDS
    # no access-log entry: nothing was stored or shown; the queue depth is in /metrics
    logger.info("interactive upload refused: %d reads already wait (SIGHTLINE_INTERACTIVE_QUEUE_MAX)", bound)
    raise InteractiveBacklog(
        f"Too many images are waiting for their AI read right now, so this upload was not stored. "
        f"Please try again in {retry_after} seconds.",
        retry_after=retry_after,
        detail={"waiting": bound, "retry_after_seconds": retry_after},
    )
