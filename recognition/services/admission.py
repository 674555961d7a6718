"""Admission of interactive uploads: refuse one (429, nothing stored) while the interactive lane's
backlog is at its bound, rather than let every person's wait grow without end."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db.models import Count, OuterRef, Subquery, Sum

from config.errors import Busy

from ..models import InferenceRequest, ModelVersion

logger = logging.getLogger(__name__)


class InteractiveBacklog(Busy):
    code = "interactive_backlog"


def interactive_backlog() -> int:
    """The queued interactive reads (the database is the truth: a broker list holds wake-ups, not
    reads, and loses them with a restart).

    One query: per model version, a range of the claim index (version, status, priority, id)
    that holds only that version's queued interactive reads, never the bulk ones beside them;
    since uploads stop at the bound, what it reads stays about the bound's size."""
    per_version = (
        InferenceRequest.objects.filter(
            model_version=OuterRef("pk"),
            status=InferenceRequest.Status.QUEUED,
            priority=InferenceRequest.Priority.INTERACTIVE,
        )
        .order_by()
        .values("model_version")
        .annotate(n=Count("id"))
        .values("n")
    )
    total = ModelVersion.objects.annotate(n=Subquery(per_version)).aggregate(total=Sum("n"))["total"]
    return total or 0


def interactive_admission() -> None:
    """Raise ``InteractiveBacklog`` when ``SIGHTLINE_INTERACTIVE_QUEUE_MAX`` interactive reads
    already wait (0: no bound). Called by the upload views before anything is read or stored;
    an upload let in may take the backlog past the bound by its own files."""
    bound = settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX
    if bound <= 0 or interactive_backlog() < bound:
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
