"""How the web side reaches the workers: a task sent by its name, never by importing it.

``recognition/`` never imports ``workers/``: the task names (``workers.tasks.*``) are the whole
contract, and they stay stable so that messages in flight survive a rolling upgrade.
"""

from __future__ import annotations

import logging

from celery import current_app

from core.transient import is_transient

logger = logging.getLogger(__name__)


def task_send(name: str, *, args: list, queue: str | None = None, countdown: float | None = None) -> bool:
    """Send ``name`` with ``args`` (ids only, never patient data); False when the broker is
    unreachable, for the database keeps what still needs doing and a reconciliation wakes it.
    Any other error is raised."""
    options: dict = {}
    if queue:
        options["queue"] = queue
    if countdown:
        options["countdown"] = countdown
    try:
        current_app.send_task(name, args=args, **options)
    except Exception as exc:
        if not is_transient(exc):
            raise
        logger.warning("broker unavailable; %s%s stays in the database until a reconciliation sends it", name, args[:1])
        return False
    return True
