"""The engine's answer for one input. Free of torch so that the web process, which records
outcomes but never runs a model, does not load it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ItemResult:
    probabilities: dict[str, float] = field(default_factory=dict)
    top_label: str = ""
    top_probability: float = 0.0
    positive_labels: tuple[str, ...] = ()  # multi-label models: the labels at or above their threshold
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error
