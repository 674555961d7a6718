"""Channels groups and on-commit sends, shared by every app that notifies browsers."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant-{tenant_id}"


def user_group(user_id: int) -> str:
    return f"user-{user_id}"


def send(group: str, message: dict) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, message)
    except Exception:  # a lost notification is recovered by the page's re-fetch
        logger.warning("could not notify %s", group, exc_info=True)


def send_on_commit(group: str, message: dict) -> None:
    transaction.on_commit(lambda: send(group, message))


def access_revoked_on_commit(*, user_id: int, tenant_id: int | None) -> None:
    """Close the user's sockets for one hospital (``tenant_id``) or for all (None)."""
    send_on_commit(user_group(user_id), {"type": "access.revoked", "tenant": tenant_id})
