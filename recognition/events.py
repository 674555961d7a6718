"""WebSocket notifications. They carry ids and small summaries; the database is the truth."""

from __future__ import annotations

from accounts.events import send_on_commit, tenant_group


def result_ready_on_commit(
    *, tenant_id: int, image_id: int, status: str, top_label: str, probability: float | None
) -> None:
    send_on_commit(
        tenant_group(tenant_id),
        {
            "type": "result.ready",
            "image": image_id,
            "status": status,
            "top_label": top_label,
            "probability": probability,
        },
    )
