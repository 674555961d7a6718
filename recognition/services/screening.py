"""Browser screening, the server side: the hospital's settings (its tenant admins change them,
logged), the screen that comes with an upload (untrusted input: checked, stored as a
``PreliminaryResult``) and the route it gives the read.

The screen never replaces the server's read: every image is still read. It can only move a read
inside its own hospital's share of the queue (``screen_order``, which ``workers/queue_policy``
orders by within each hospital's turns) or, when the hospital asks for it, send a confidently
negative image to the bulk lane, from which beat moves it back to the interactive lane at
``read_by`` if it still waits (``workers.queue_policy.screened_negatives_promote``). The preliminary is never
exported, sent to a PACS, counted as a finding or written to the study's columns.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from accounts.access import member_action_record
from accounts.models import Membership
from accounts.permissions import Action
from accounts.services import require
from core.errors import Unprocessable
from core.model_package import ROLE_SCREENING

from ..models import HospitalSettings, Image, InferenceRequest, ModelVersion, PreliminaryResult

logger = logging.getLogger(__name__)
Route = PreliminaryResult.Route
Priority = InferenceRequest.Priority

SCREEN_MAX_BYTES = 4096  # the contract's cap on the `screen` field (CONTRACT17.md): a handful of numbers
QUALITY_FLAGS = ("blank", "saturated", "unfamiliar")  # what the browser's quality gate can say (screen.js)
PROBABILITY_SUM_TOLERANCE = 0.01  # a softmax's outputs, rounded to a few digits by the browser, sum to 1 ± this
SCREEN_FIRST, SCREEN_IN_ORDER = 0, 1  # InferenceRequest.screen_order: 0 runs first within its hospital's turns
LABEL_QUOTED = 40  # characters of a refused label quoted back: enough to recognise it, never the whole field
MAX_LATENCY_MS = 600_000  # ten minutes: a browser's figure above that is not a latency
# the settings page's bounds: a threshold is a probability strictly between 0 and 1 (the table's
# check constraint), the wait at most a day (beyond that "read anyway" means nothing to a clinic)
MAX_NEGATIVE_WAIT_SECONDS = 86_400
MIN_NEGATIVE_WAIT_SECONDS = 1


# -- the routing policy (pure) ------------------------------------------------------------------------------------


def screen_route(
    *,
    probabilities: dict[str, float],
    negative_label: str,
    quality_flags: list[str] | tuple[str, ...],
    route_negatives: bool,
    negative_threshold: float,
) -> str:
    """Where the screen sends the read (CONTRACT17.md): FIRST when its top label is not the
    negative one; BULK when the hospital routes negatives, p(negative) reaches the threshold and
    no quality flag fired; NORMAL otherwise. A tie goes to the negative label, so a screen that
    cannot decide never jumps the queue."""
    if screen_top(probabilities, negative_label)[0] != negative_label:
        return Route.FIRST
    if route_negatives and not quality_flags and probabilities.get(negative_label, 0.0) >= negative_threshold:
        return Route.BULK
    return Route.NORMAL


def screen_top(probabilities: dict[str, float], negative_label: str) -> tuple[str, float]:
    """The top label and its probability; on a tie the negative label wins."""
    best = max(probabilities.values())
    if probabilities.get(negative_label) == best:
        return negative_label, best
    label = next(label for label, p in probabilities.items() if p == best)
    return label, best


# -- the screen that comes with an upload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Screen:
    """The browser's screen as it came, its shape checked (nothing about its version yet)."""

    version_id: int
    probabilities: dict[str, float]
    latency_ms: int | None
    quality_flags: tuple[str, ...]
    ood_score: float | None


@dataclass(frozen=True)
class ScreenPlan:
    """A screen accepted for this hospital: what is stored and where the read goes."""

    screen: Screen
    version: ModelVersion
    top_label: str
    top_probability: float
    route: str
    max_wait_seconds: int


MAX_ROW_ID = 2**63 - 1  # the largest id a database key column holds


def _refuse(message: str) -> Unprocessable:
    return Unprocessable(f"The screen sent with this upload is not usable: {message}", code="bad_screen")


def _number(value, what: str, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(f"{what} must be a number.")
    try:
        finite = math.isfinite(value)  # an integer of thousands of digits overflows a float here
    except OverflowError:
        finite = False
    if not finite:
        raise _refuse(f"{what} must be a number.")
    if not low <= value <= high:
        raise _refuse(f"{what} must be between {low:g} and {high:g}.")
    return float(value)


def screen_parse(raw: str | bytes | None) -> Screen | None:
    """The ``screen`` field's shape, or 422 in words (before anything is stored); None when the
    upload came without one."""
    if raw is None or raw == "" or raw == b"":
        return None
    if len(raw.encode() if isinstance(raw, str) else raw) > SCREEN_MAX_BYTES:
        raise _refuse(f"it is larger than {SCREEN_MAX_BYTES} bytes.")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested too deep
        raise _refuse("it is not JSON.") from None
    if not isinstance(data, dict):
        raise _refuse("it must be a JSON object.")
    unknown = set(data) - {"version_id", "probabilities", "latency_ms", "quality"}
    if unknown:
        raise _refuse(f"unknown field(s) {sorted(unknown)}.")
    version_id = data.get("version_id")
    if isinstance(version_id, bool) or not isinstance(version_id, int) or not 1 <= version_id <= MAX_ROW_ID:
        raise _refuse("version_id must be a positive integer.")
    probabilities = data.get("probabilities")
    if not isinstance(probabilities, dict) or not probabilities:
        raise _refuse("probabilities must be an object of label → probability.")
    checked = {
        str(label): _number(p, f"the probability of {str(label)[:LABEL_QUOTED]!r}")
        for label, p in probabilities.items()
    }
    if abs(sum(checked.values()) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise _refuse("the probabilities must add up to 1.")
    latency = data.get("latency_ms")
    if latency is not None:
        latency = round(_number(latency, "latency_ms", high=MAX_LATENCY_MS))
    quality = data.get("quality", {}) or {}
    if not isinstance(quality, dict) or set(quality) - {"flags", "ood_score"}:
        raise _refuse('quality must be an object with "flags" and "ood_score".')
    flags = quality.get("flags", []) or []
    if not isinstance(flags, list) or any(not isinstance(flag, str) for flag in flags):
        raise _refuse("quality.flags must be a list of names.")
    if unknown_flags := sorted(set(flags) - set(QUALITY_FLAGS)):
        raise _refuse(f"unknown quality flag(s) {unknown_flags}; known: {list(QUALITY_FLAGS)}.")
    ood = quality.get("ood_score")
    ood = None if ood is None else _number(ood, "quality.ood_score")
    return Screen(
        version_id=version_id,
        probabilities=checked,
        latency_ms=latency,
        quality_flags=tuple(dict.fromkeys(flags)),
        ood_score=ood,
    )


def screen_plan(*, tenant, screen: Screen | None) -> ScreenPlan | None:
    """The screen checked against the hospital's settings. None (the upload goes on without it)
    when it came without one, the hospital does not screen, or it names another version than
    the hospital's current one (a page loaded before the settings changed, or a forged id);
    422 when it names the current version with labels that are not that version's."""
    if screen is None:
        return None
    found = hospital_screening(tenant)
    if found is None or found.screening_version_id != screen.version_id:
        logger.info("a screen for another version than the hospital's came with an upload; not stored")
        return None
    version = found.screening_version
    assert version is not None  # hospital_screening answers only a row with a usable version
    labels = version.labels
    if set(screen.probabilities) != set(labels):
        raise _refuse(f"its labels must be exactly the screening model's: {labels}.")
    negative = labels[0]  # a screening model's first label is its negative one (CONTRACT17.md)
    top_label, top_probability = screen_top(screen.probabilities, negative)
    route = screen_route(
        probabilities=screen.probabilities,
        negative_label=negative,
        quality_flags=screen.quality_flags,
        route_negatives=found.route_negatives_to_bulk,
        negative_threshold=found.negative_threshold,
    )
    return ScreenPlan(
        screen=screen,
        version=version,
        top_label=top_label,
        top_probability=top_probability,
        route=route,
        max_wait_seconds=found.negative_max_wait_seconds,
    )


def hospital_screening(tenant) -> HospitalSettings | None:
    """The hospital's settings row when it screens with a usable version, else None."""
    found = (
        HospitalSettings.objects.for_tenant(tenant)
        .filter(screening_enabled=True, screening_version__isnull=False)
        .select_related("screening_version")
        .first()
    )
    if found is None or not screening_version_usable(found.screening_version):
        return None
    return found


def screening_version_usable(version: ModelVersion | None) -> bool:
    return (
        version is not None
        and version.status == ModelVersion.Status.READY
        and version.manifest.get("role") == ROLE_SCREENING
        and version.browser_confirmed_at is not None
    )


def screening_versions():
    """The versions a hospital may choose: ready, role screening, confirmed for browsers."""
    return (
        ModelVersion.objects.filter(
            status=ModelVersion.Status.READY, manifest__role=ROLE_SCREENING, browser_confirmed_at__isnull=False
        )
        .select_related("model")
        .order_by("model__name", "-serial")
    )


def preliminary_store(*, image: Image, plan: ScreenPlan, bulk_lane: bool = True) -> PreliminaryResult:
    """Inside the upload's transaction: the preliminary row. ``bulk_lane``: whether the read
    this image gets can move to the bulk lane (an upload's interactive read); a job's item is
    read in the bulk lane already, so a BULK route changes nothing there and is stored NORMAL."""
    route = plan.route if bulk_lane or plan.route != Route.BULK else Route.NORMAL
    return PreliminaryResult.objects.create(
        tenant=image.tenant,
        image=image,
        screening_version=plan.version,
        probabilities=plan.screen.probabilities,
        top_label=plan.top_label,
        top_probability=plan.top_probability,
        quality_flags=list(plan.screen.quality_flags),
        ood_score=plan.screen.ood_score,
        latency_ms=plan.screen.latency_ms,
        route=route,
    )


def read_routed(*, request: InferenceRequest, route: str, max_wait_seconds: int) -> None:
    """Inside the upload's transaction, after its read was created: the screen's route on the
    row (FIRST: first within the hospital's turns; BULK: bulk lane until ``read_by``)."""
    if route == Route.FIRST:
        InferenceRequest.objects.filter(pk=request.pk).update(screen_order=SCREEN_FIRST)
    elif route == Route.BULK:
        read_by = timezone.now() + timedelta(seconds=max_wait_seconds)
        InferenceRequest.objects.filter(pk=request.pk).update(read_by=read_by)


def route_priority(plan: ScreenPlan | None, priority: int) -> int:
    """The lane an upload's read is queued on: a BULK-routed screen's interactive read goes bulk."""
    if plan is not None and plan.route == Route.BULK and priority == Priority.INTERACTIVE:
        return Priority.BULK
    return priority


# -- the hospital's settings -----------------------------------------------------------------------------------------


def hospital_settings_get(*, membership: Membership, request=None) -> HospitalSettings:
    """The settings page's row (403 for a member whose role lacks the action, or an admin
    without the second factor the hospital asks for)."""
    require(membership, Action.HOSPITAL_SETTINGS, request=request)
    found = HospitalSettings.objects.for_tenant(membership.tenant).select_related("screening_version__model").first()
    return found or HospitalSettings(tenant=membership.tenant)


def hospital_settings_update(
    *,
    membership: Membership,
    screening_enabled: bool,
    screening_version_id: int | None,
    route_negatives_to_bulk: bool,
    negative_threshold: float,
    negative_max_wait_seconds: int,
    request=None,
) -> HospitalSettings:
    """Write the hospital's settings and an access-log entry in one transaction; 422 in words
    for a version that is not a ready screening model confirmed for browsers, a threshold
    outside (0, 1) or a wait outside its bounds, or screening on without a model."""
    require(membership, Action.HOSPITAL_SETTINGS, request=request)
    tenant = membership.tenant
    version = None
    if screening_version_id is not None:
        version = screening_versions().filter(pk=screening_version_id).first()
        if version is None:
            raise Unprocessable(
                "That model is not a screening model the hospital can use: choose a ready screening version "
                "whose licence an operator confirmed allows running it in browsers.",
                code="not_a_screening_model",
            )
    if screening_enabled and version is None:
        raise Unprocessable("Choose a screening model to turn screening on.", code="screening_needs_model")
    if not (isinstance(negative_threshold, int | float) and 0 < negative_threshold < 1):
        raise Unprocessable(
            "The negative threshold is a probability between 0 and 1 (e.g. 0.95).", code="bad_threshold"
        )
    if not MIN_NEGATIVE_WAIT_SECONDS <= negative_max_wait_seconds <= MAX_NEGATIVE_WAIT_SECONDS:
        raise Unprocessable(
            f"The maximum wait is between {MIN_NEGATIVE_WAIT_SECONDS} and {MAX_NEGATIVE_WAIT_SECONDS} seconds.",
            code="bad_max_wait",
        )
    with transaction.atomic():
        row, _ = HospitalSettings.objects.select_for_update().get_or_create(tenant=tenant)
        row.screening_enabled = screening_enabled
        row.screening_version = version
        row.route_negatives_to_bulk = route_negatives_to_bulk
        row.negative_threshold = float(negative_threshold)
        row.negative_max_wait_seconds = negative_max_wait_seconds
        row.updated, row.updated_by = timezone.now(), membership.user
        row.save()
        member_action_record(
            membership, "hospital.settings_update", request=request, target_type="hospital_settings", target_id=row.pk
        )
    return row
