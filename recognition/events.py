"""WebSocket notifications. They carry ids and small summaries; the database is the truth."""

from __future__ import annotations

from dataclasses import dataclass

from accounts.events import send_many_on_commit, send_on_commit, tenant_group


@dataclass(frozen=True)
class ResultNotice:
    tenant_id: int
    image_id: int
    status: str
    top_label: str
    probability: float | None


def results_ready_on_commit(notices: list[ResultNotice]) -> None:
    """One ``result.ready`` message per image, all sent from one callback after commit."""
    send_many_on_commit(
        [
            (
                tenant_group(notice.tenant_id),
                {
                    "type": "result.ready",
                    "image": notice.image_id,
                    "status": notice.status,
                    "top_label": notice.top_label,
                    "probability": notice.probability,
                },
            )
            for notice in notices
        ]
    )


def heatmap_ready_on_commit(*, tenant_id: int, image_id: int, result_id: int, status: str = "ready") -> None:
    """``heatmap.ready``: a heatmap asked for is made (``status`` "ready") or cannot be
    (``"unavailable"``); the viewer fetches it again. The hospital's feed only."""
    send_on_commit(
        tenant_group(tenant_id),
        {"type": "heatmap.ready", "image": image_id, "result": result_id, "status": status},
    )
