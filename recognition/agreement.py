"""How often clinicians agree with each model version: one selector and two renderers (CSV, SVG).

Only current signed-off reviews count: a draft never does, and a signed amendment replaces the
review it amends (a chain a ← b ← c counts c alone once all three are signed).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.db.models import Count, Exists, OuterRef, Q

from accounts.models import Tenant
from core.spreadsheet import spreadsheet_safe

from .models import Review

CSV_HEADER = ("model", "version", "label", "reviewed", "agreed", "disagreed", "corrected", "agreement")

SVG_WIDTH = 640
SVG_ROW_HEIGHT = 44  # one line of text (15px) above a 14px bar, plus spacing
SVG_BAR_HEIGHT = 14
SVG_TEXT_BASELINE = 16  # a row's caption baseline, below the row's top
SVG_BAR_TOP = 22  # a row's bar, below the row's top
SVG_TRACK_FILL = "#eef1f4"  # as .status
SVG_BAR_FILL = "#1f6feb"  # site.css --accent
SVG_TEXT_FILL = "#1d2733"  # --ink


@dataclass(frozen=True)
class AgreementRow:
    model: str
    version: str
    label: str  # "" on the version's total row
    reviewed: int
    agreed: int
    disagreed: int
    corrected: int

    @property
    def is_total(self) -> bool:
        return self.label == ""

    @property
    def share(self) -> float | None:
        return self.agreed / self.reviewed if self.reviewed else None

    @property
    def share_percent(self) -> str:
        """For display: "87%", or "—" when nothing was reviewed."""
        share = self.share
        return "—" if share is None else f"{share:.0%}"


def current_signed_reviews():
    """Signed reviews that no signed review amends. A draft amendment replaces nothing yet."""
    later_signed = Review.objects.filter(amends=OuterRef("pk"), signed_off_at__isnull=False)
    return Review.objects.filter(~Exists(later_signed), signed_off_at__isnull=False)


def agreement_rows(*, tenant: Tenant | None = None) -> list[AgreementRow]:
    """Per model version a total row, then one row per AI label (sorted). ``tenant=None``: every
    hospital (platform staff). One query; the totals are summed here from the per-label groups."""
    reviews = current_signed_reviews().filter(model_version__isnull=False)
    if tenant is not None:
        reviews = reviews.for_tenant(tenant)
    groups = (
        reviews.values(
            "model_version",
            "model_version__model__name",
            "model_version__version",
            "model_version__created",
            "ai_label",
        )
        .annotate(
            reviewed=Count("pk"),
            agreed=Count("pk", filter=Q(verdict=Review.Verdict.AGREE)),
            disagreed=Count("pk", filter=Q(verdict=Review.Verdict.DISAGREE)),
            corrected=Count("pk", filter=Q(verdict=Review.Verdict.CORRECT)),
        )
        .order_by("model_version__model__name", "model_version__created", "model_version", "ai_label")
    )

    per_version: dict[int, list[AgreementRow]] = {}  # insertion order is the query's version order
    for group in groups:
        per_version.setdefault(group["model_version"], []).append(
            AgreementRow(
                model=group["model_version__model__name"],
                version=group["model_version__version"],
                label=group["ai_label"],
                reviewed=group["reviewed"],
                agreed=group["agreed"],
                disagreed=group["disagreed"],
                corrected=group["corrected"],
            )
        )

    rows: list[AgreementRow] = []
    for labelled in per_version.values():
        first = labelled[0]
        rows.append(
            AgreementRow(
                model=first.model,
                version=first.version,
                label="",
                reviewed=sum(row.reviewed for row in labelled),
                agreed=sum(row.agreed for row in labelled),
                disagreed=sum(row.disagreed for row in labelled),
                corrected=sum(row.corrected for row in labelled),
            )
        )
        # a review without an AI label counts in its version's total only: a row labelled ""
        # would read as a second total
        rows.extend(row for row in labelled if row.label)
    return rows


def agreement_csv(rows: Iterable[AgreementRow]) -> Iterator[str]:
    """The rows as CSV lines (header first), one at a time, for core.streaming.streaming_response."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(cells) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(cells)
        return buffer.getvalue()

    yield line(CSV_HEADER)
    for row in rows:
        share = row.share
        yield line(
            (
                spreadsheet_safe(row.model),
                spreadsheet_safe(row.version),
                spreadsheet_safe(row.label),
                row.reviewed,
                row.agreed,
                row.disagreed,
                row.corrected,
                "" if share is None else f"{share:.3f}",
            )
        )


def _bar_caption(row: AgreementRow) -> str:
    return f"{row.model} {row.version} — {row.share_percent} of {row.reviewed}"


def agreement_svg(rows: Iterable[AgreementRow]) -> str:
    """A horizontal bar per version (its total row), as inline SVG markup. Every dynamic text is
    escaped here, so the template may mark the result safe. "" when there is nothing to draw."""
    totals = [row for row in rows if row.is_total]
    if not totals:
        return ""
    height = SVG_ROW_HEIGHT * len(totals)
    summary = "Agreement per model version: " + "; ".join(_bar_caption(row) for row in totals)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="agreement-chart" width="{SVG_WIDTH}" height="{height}" '
        f'viewBox="0 0 {SVG_WIDTH} {height}" role="img" aria-label="{html.escape(summary)}">',
        "<title>Agreement per model version</title>",
    ]
    for index, row in enumerate(totals):
        top = index * SVG_ROW_HEIGHT
        bar = round((row.share or 0) * SVG_WIDTH)
        parts.append(
            f'<g class="bar"><text x="0" y="{top + SVG_TEXT_BASELINE}" font-size="14" fill="{SVG_TEXT_FILL}">'
            f"{html.escape(_bar_caption(row))}</text>"
            f'<rect x="0" y="{top + SVG_BAR_TOP}" width="{SVG_WIDTH}" height="{SVG_BAR_HEIGHT}" '
            f'fill="{SVG_TRACK_FILL}"/>'
            f'<rect class="share" x="0" y="{top + SVG_BAR_TOP}" width="{bar}" height="{SVG_BAR_HEIGHT}" '
            f'fill="{SVG_BAR_FILL}"/></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
