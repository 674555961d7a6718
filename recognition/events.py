"""WebSocket notifications. They carry ids and small summaries; the database is the truth."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant-{tenant_id}"


def _send(group: str, message: dict) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, message)
    except Exception:  # a lost notification is recovered by the page's re-fetch
        logger.warning("could not notify %s", group, exc_info=True)


def result_ready_on_commit(
    *, tenant_id: int, image_id: int, status: str, top_label: str, probability: float | None
) -> None:
    message = {
        "type": "result.ready",
        "image": image_id,
        "status": status,
        "top_label": top_label,
        "probability": probability,
    }
    transaction.on_commit(lambda: _send(tenant_group(tenant_id), message))
