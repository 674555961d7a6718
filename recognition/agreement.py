"""How often clinicians agree with each model version: one selector and two renderers (CSV, SVG);
and, where a hospital splits its traffic between two versions (an A/B test), the two arms side by
side (``ab_comparisons``): each one's agreement with clinicians and the two versions' agreement with
each other on shadow reads (recognition/services/shadow.py), each with a 95% interval.

Only current signed-off reviews count: a draft never does, and a signed amendment replaces the
review it amends (a chain a ← b ← c counts c alone once all three are signed). Clinicians only
ever review what they were shown, so a shadow read is never in a review's count.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.db.models import Count, Exists, F, OuterRef, Q, Subquery
from django.utils.safestring import mark_safe

from accounts.models import Tenant
from core.spreadsheet import spreadsheet_safe

from .models import ModelAlias, ModelVersion, Result, Review, TrafficSplit

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


# --- A/B: two versions of one model, side by side -------------------------------------------

Z_95 = 1.959963984540054  # the standard normal quantile of a two-sided 95% interval
# Below this many signed reviews (or shadow pairs) an arm's 95% interval is wider than about
# ±15 points, too wide to tell two versions apart: the page says so whatever the shares are.
# The usual rule of thumb for a proportion, not a measurement.
AB_MINIMUM_SAMPLE = 30


@dataclass(frozen=True)
class Proportion:
    """``agreed`` of ``n``, with its Wilson score interval (which, unlike the normal one, stays
    within 0-1 and is honest for small ``n`` and shares near 0 or 1)."""

    n: int
    agreed: int

    @property
    def share(self) -> float | None:
        return self.agreed / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        if not self.n:
            return None
        share, z2 = self.agreed / self.n, Z_95 * Z_95
        centre = (share + z2 / (2 * self.n)) / (1 + z2 / self.n)
        half = Z_95 * math.sqrt(share * (1 - share) / self.n + (Z_95 / (2 * self.n)) ** 2) / (1 + z2 / self.n)
        return max(0.0, centre - half), min(1.0, centre + half)

    @property
    def share_percent(self) -> str:
        share = self.share
        return "—" if share is None else f"{share:.0%}"

    @property
    def interval_percent(self) -> str:
        """For display: "72–91%", or "—" with nothing counted."""
        interval = self.interval
        return "—" if interval is None else f"{interval[0]:.0%}–{interval[1]:.0%}"

    @property
    def enough(self) -> bool:
        return self.n >= AB_MINIMUM_SAMPLE


@dataclass(frozen=True)
class ABArm:
    version_id: int
    version: str
    serial: int | None  # the integer version protocol clients name
    role: str  # "production", "split 30%", "" for a split that ended
    clinicians: Proportion  # signed reviews of its findings that agreed


@dataclass(frozen=True)
class ABComparison:
    model: str
    a: ABArm  # the parent (or production) version
    b: ABArm  # the derived (or split) version
    shadow: Proportion  # images both read (one of them as a shadow read) with the same top label
    live: bool  # a split between the two answers now

    @property
    def arms(self) -> tuple[tuple[str, ABArm], tuple[str, ABArm]]:
        return (("A", self.a), ("B", self.b))

    @property
    def chart(self) -> str:
        """``ab_svg``'s markup, escaped there: safe for the template."""
        return mark_safe(ab_svg(self))  # noqa: S308  (ab_svg escapes every text it writes)

    @property
    def warning(self) -> str:
        """Why the clinicians' numbers cannot decide between the arms yet; "" when they can."""
        short = [arm for arm in (self.a, self.b) if not arm.clinicians.enough]
        if short:
            counts = ", ".join(f"{arm.version} has {arm.clinicians.n}" for arm in short)
            return f"Too few signed reviews to decide: each version needs at least {AB_MINIMUM_SAMPLE} ({counts})."
        a, b = self.a.clinicians.interval, self.b.clinicians.interval
        if a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]:
            return "The 95% intervals overlap: the difference may be chance; keep the split running."
        return ""

    @property
    def shadow_warning(self) -> str:
        if self.shadow.enough:
            return ""
        return f"Too few shadow reads to judge: {self.shadow.n} so far, at least {AB_MINIMUM_SAMPLE} needed."


def _shadow_pairs(tenant: Tenant | None) -> dict[tuple[int, int], Proportion]:
    """(version of the read clinicians saw, version of its shadow read) → images and how many of
    them the two read with the same top label. One query."""
    shown = Result.objects.filter(
        image=OuterRef("image"), model_version__model=OuterRef("model_version__model"), request__shadow=False
    ).order_by("-id")
    shadows = Result.objects.filter(request__shadow=True)
    if tenant is not None:
        shadows = shadows.for_tenant(tenant)
    groups = (
        shadows.annotate(
            shown_version=Subquery(shown.values("model_version")[:1]),
            shown_label=Subquery(shown.values("top_label")[:1]),
        )
        .filter(shown_version__isnull=False)
        .values("shown_version", "model_version")
        .annotate(n=Count("pk"), agreed=Count("pk", filter=Q(top_label=F("shown_label"))))
        .order_by()
    )
    return {
        (group["shown_version"], group["model_version"]): Proportion(n=group["n"], agreed=group["agreed"])
        for group in groups
    }


def ab_comparisons(*, tenant: Tenant | None, rows: Iterable[AgreementRow]) -> list[ABComparison]:
    """One comparison per pair of versions a hospital splits (or split: its shadow reads remain)
    its traffic between; ``tenant=None``: every hospital together (platform staff). ``rows`` are
    ``agreement_rows`` for the same scope: the clinicians' side. Two queries, a third for the
    versions when there is any pair."""
    production = ModelAlias.objects.filter(model=OuterRef("model"), name=ModelAlias.Name.PRODUCTION)
    splits = TrafficSplit.objects.all() if tenant is None else TrafficSplit.objects.for_tenant(tenant)
    live: dict[frozenset[int], tuple[int, str]] = {}  # the pair → its production version, the split's share
    for split in splits.annotate(production_id=Subquery(production.values("version_id")[:1])).values(
        "version_id", "production_id", "percent"
    ):
        if split["production_id"] is not None and split["production_id"] != split["version_id"]:
            pair = frozenset((split["production_id"], split["version_id"]))
            live[pair] = (split["production_id"], f"split {split['percent']}%")
    pairs: dict[frozenset[int], Proportion] = {}
    for (shown, shadow), counted in _shadow_pairs(tenant).items():
        if shown == shadow:
            continue
        key = frozenset((shown, shadow))
        before = pairs.get(key, Proportion(0, 0))  # A's images read by B, and B's read by A
        pairs[key] = Proportion(before.n + counted.n, before.agreed + counted.agreed)
    keys = list(live) + [key for key in pairs if key not in live]
    if not keys:
        return []
    versions = ModelVersion.objects.select_related("model").in_bulk({pk for key in keys for pk in key})
    reviewed = {(row.model, row.version): row for row in rows if row.is_total}

    def arm(version: ModelVersion, role: str) -> ABArm:
        row = reviewed.get((version.model.name, version.version))
        return ABArm(
            version_id=version.pk,
            version=version.version,
            serial=version.serial,
            role=role,
            clinicians=Proportion(row.reviewed, row.agreed) if row else Proportion(0, 0),
        )

    comparisons = []
    for key in keys:
        first, second = sorted((versions[pk] for pk in key), key=lambda v: (v.created, v.pk))
        if key in live:  # A answers without the split (production), B is the split's version
            production_id, split_role = live[key]
            if first.pk != production_id:
                first, second = second, first
            roles = ("production", split_role)
        else:  # a split that ended: A is the parent of a derived version, else the older
            if first.derived_from_id == second.pk:
                first, second = second, first
            roles = ("", "")
        comparisons.append(
            ABComparison(
                model=first.model.name,
                a=arm(first, roles[0]),
                b=arm(second, roles[1]),
                shadow=pairs.get(key, Proportion(0, 0)),
                live=key in live,
            )
        )
    comparisons.sort(key=lambda c: (not c.live, c.model, c.a.serial or 0, c.b.serial or 0))
    return comparisons


AB_SVG_LABEL_WIDTH = 200  # the row's caption, left of its scale
AB_SVG_WHISKER_HEIGHT = 10  # the interval's end ticks, centred on the bar
SVG_WHISKER_STROKE = "#1d2733"  # --ink


def _ab_rows(comparison: ABComparison) -> list[tuple[str, Proportion]]:
    return [
        (f"A {comparison.a.version} with clinicians", comparison.a.clinicians),
        (f"B {comparison.b.version} with clinicians", comparison.b.clinicians),
        ("A with B (shadow reads)", comparison.shadow),
    ]


def ab_svg(comparison: ABComparison) -> str:
    """Per row (A with clinicians, B with clinicians, A with B) a bar for the share and a line
    for its 95% interval, on one 0-100% scale so that overlapping intervals are seen to overlap.
    Every dynamic text is escaped here, so the template may mark the result safe."""
    rows = _ab_rows(comparison)
    scale = SVG_WIDTH - AB_SVG_LABEL_WIDTH
    height = SVG_ROW_HEIGHT * len(rows)
    summary = "; ".join(
        f"{caption}: {counted.share_percent} of {counted.n}, 95% interval {counted.interval_percent}"
        for caption, counted in rows
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="ab-chart" width="{SVG_WIDTH}" height="{height}" '
        f'viewBox="0 0 {SVG_WIDTH} {height}" role="img" aria-label="{html.escape(summary)}">',
        f"<title>{html.escape(comparison.model)}: agreement with 95% intervals</title>",
    ]
    for index, (caption, counted) in enumerate(rows):
        top = index * SVG_ROW_HEIGHT
        middle = top + SVG_BAR_TOP + SVG_BAR_HEIGHT / 2
        parts.append(
            f'<g class="ab-row"><text x="0" y="{top + SVG_BAR_TOP + SVG_BAR_HEIGHT}" font-size="14" '
            f'fill="{SVG_TEXT_FILL}">{html.escape(caption)}</text>'
            f'<rect x="{AB_SVG_LABEL_WIDTH}" y="{top + SVG_BAR_TOP}" width="{scale}" height="{SVG_BAR_HEIGHT}" '
            f'fill="{SVG_TRACK_FILL}"/>'
            f'<rect class="share" x="{AB_SVG_LABEL_WIDTH}" y="{top + SVG_BAR_TOP}" '
            f'width="{round((counted.share or 0) * scale)}" height="{SVG_BAR_HEIGHT}" fill="{SVG_BAR_FILL}"/>'
        )
        interval = counted.interval
        if interval is not None:
            low, high = (AB_SVG_LABEL_WIDTH + round(end * scale) for end in interval)
            tick = AB_SVG_WHISKER_HEIGHT / 2
            parts.append(
                f'<path class="interval" d="M{low} {middle}H{high}M{low} {middle - tick}V{middle + tick}'
                f'M{high} {middle - tick}V{middle + tick}" stroke="{SVG_WHISKER_STROKE}" stroke-width="2"/>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


# -- the browser screen against the server's read ----------------------------------------------------------------


@dataclass(frozen=True)
class ScreeningAgreement:
    """One screening version: on the images that have both its preliminary and the server's
    read, how often the two top labels are the same, and how often the screen called an image
    negative that the server did not (the misses that routing to the bulk lane would delay)."""

    model: str
    version: str
    serial: int
    proportion: Proportion  # n: images with both; agreed: the same top label
    screen_negative_server_positive: int


def screening_agreement(*, tenant: Tenant | None = None) -> list[ScreeningAgreement]:
    """Per screening version (``tenant=None``: every hospital, platform staff), over the images
    with a preliminary and a server read (the latest non-shadow result): two queries whatever the
    number of images (the groups; the versions' labels)."""
    from .models import PreliminaryResult  # beside the review models; the screen came later

    latest = Result.objects.filter(image=OuterRef("image"), request__shadow=False).order_by("-created", "-id")
    preliminaries = PreliminaryResult.objects.all() if tenant is None else PreliminaryResult.objects.for_tenant(tenant)
    groups = (
        preliminaries.annotate(server_label=Subquery(latest.values("top_label")[:1]))
        .filter(server_label__isnull=False)
        .values("screening_version", "top_label", "server_label")
        .annotate(n=Count("id"))
        .order_by()
    )
    counts: dict[int, list[int]] = {}  # version id → [n, agreed, screen negative / server positive]
    found = list(groups)
    versions = ModelVersion.objects.select_related("model").in_bulk({g["screening_version"] for g in found})
    for group in found:
        version = versions[group["screening_version"]]
        negative = version.labels[0] if version.labels else ""  # a screening model's first label (CONTRACT17.md)
        row = counts.setdefault(version.pk, [0, 0, 0])
        row[0] += group["n"]
        if group["top_label"] == group["server_label"]:
            row[1] += group["n"]
        if group["top_label"] == negative and group["server_label"] != negative:
            row[2] += group["n"]
    return [
        ScreeningAgreement(
            model=versions[pk].model.name,
            version=versions[pk].version,
            serial=versions[pk].serial,
            proportion=Proportion(n=n, agreed=agreed),
            screen_negative_server_positive=missed,
        )
        for pk, (n, agreed, missed) in sorted(
            counts.items(), key=lambda item: (versions[item[0]].model.name, versions[item[0]].serial)
        )
    ]
