"""Reading the access log, for auditors: a hospital's auditors their hospital's entries, platform
auditors every hospital's; filters by person, patient, study, action, outcome and days; keyset
pages, the export's rows and one entry. Every read is itself logged, through accounts' one
writer (accounts.services.access_event_record, in the reader's transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING

from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.models import AccessEvent, Membership, Tenant
from accounts.permissions import Action
from accounts.selectors import membership_for_session
from accounts.services import access_event_record, require
from core.cursor import BAD_CURSOR, cursor_decode, cursor_encode
from core.errors import Forbidden, Invalid, NotFound

from .lookups import about_targets, person_match

if TYPE_CHECKING:
    from django.contrib.auth.models import User  # the user model (AUTH_USER_MODEL is the default)

# the permission (accounts.models.AccessEvent's Meta) of a platform auditor: every hospital's log
PLATFORM_AUDIT_PERMISSION = "accounts.audit_all_hospitals"
ACCESS_LOG_PAGE = 100
ACCESS_LOG_PAGE_MAX = 500


@dataclass(frozen=True)
class AccessLogFilters:
    # identifiers (person, patient) travel in POST bodies only, never in a URL
    person: str = ""  # a username; failed sign-ins are matched through the keyed hash of the name typed
    patient: str = ""  # a patient id (as shown, or the hospital's own): entries about their studies, images, reviews
    study: int | None = None  # entries about the study, its images and their reviews
    action: str = ""  # exact, or a prefix ending in "." such as "auth."
    outcome: str = ""
    date_from: date | None = None  # whole days in the site's time zone, both inclusive
    date_to: date | None = None
    hospital: str = ""  # a slug; only for platform auditors (a hospital's auditor reads their own)

    IDENTIFIERS = ("person", "patient")

    def as_query(self) -> dict[str, str]:
        """The filters that are set, as form values (the hidden fields of the next-page and
        download forms, which POST them: identifiers among them never go into a URL)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {
            name: value.isoformat() if isinstance(value, date) else str(value)
            for name, value in values.items()
            if value not in ("", None)
        }

    @property
    def names_identifier(self) -> bool:
        return any(getattr(self, name) for name in self.IDENTIFIERS)


def access_log_actor(request) -> Membership | User:
    """Who reads the log on a page: a platform auditor as themselves (they may belong to no
    hospital), everyone else as a member of the session's hospital."""
    if request.user.has_perm(PLATFORM_AUDIT_PERMISSION):
        return request.user
    return membership_for_session(request)


def _audit_scope(actor: Membership | User, request) -> tuple[User, Tenant | None]:
    """(the reader, the hospital they may read or None for every hospital). A member needs
    their role's audit.view; anyone else needs the platform auditor permission."""
    if isinstance(actor, Membership):
        require(actor, Action.AUDIT_VIEW, request=request)
        return actor.user, actor.tenant
    if actor.is_authenticated and actor.has_perm(PLATFORM_AUDIT_PERMISSION):
        return actor, None
    access_event_record(action=str(Action.AUDIT_VIEW), outcome=AccessEvent.Outcome.DENIED, request=request, user=actor)
    raise Forbidden("Only auditors can read the access log.")


def access_log_hospitals() -> list[Tenant]:
    """The hospitals a platform auditor can filter by."""
    return list(Tenant.objects.order_by("name"))


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.get_default_timezone())


# The distinct actions of one hospital's log (or the platform's, tenant_id NULL), one index seek
# each on (tenant, action): a loose index scan, written out because the ORM has no recursive CTE.
_DISTINCT_ACTIONS = """
WITH RECURSIVE logged(action) AS (
    SELECT MIN(action) FROM {table} WHERE {scope}
    UNION ALL
    SELECT (SELECT MIN(action) FROM {table} WHERE {scope} AND action > logged.action)
    FROM logged WHERE logged.action IS NOT NULL
)
SELECT action FROM logged WHERE action IS NOT NULL
"""


def _actions_logged(tenant: Tenant | None) -> list[str]:
    """Every action name in the hospital's log (every hospital's and the platform's for None).

    A prefix filter becomes ``action IN (the names it matches)``: the planner then reads a rare
    action through its index and a common one along the time index, and a prefix that matches
    nothing costs nothing, where ``LIKE 'x.%'`` would walk the whole log (0.4 s at 1,000,000)."""
    tenant_ids = [tenant.pk] if tenant is not None else [*Tenant.objects.values_list("pk", flat=True), None]
    names: set[str] = set()
    with connection.cursor() as cursor:
        for tenant_id in tenant_ids:
            scope = "tenant_id = %s" if tenant_id is not None else "tenant_id IS NULL"
            sql = _DISTINCT_ACTIONS.format(table=AccessEvent._meta.db_table, scope=scope)
            cursor.execute(sql, [tenant_id, tenant_id] if tenant_id is not None else [])
            names.update(row[0] for row in cursor.fetchall())
    return sorted(names)


def _access_log_entries(*, tenant: Tenant | None, filters: AccessLogFilters) -> tuple[QuerySet, Tenant | None]:
    """(the filtered entries newest first, the hospital they belong to or None)."""
    entries = AccessEvent.objects.select_related("tenant")
    if tenant is None and filters.hospital:
        tenant = Tenant.objects.filter(slug=filters.hospital).first()
        if tenant is None:
            raise Invalid("No such hospital.", code="bad_hospital")
    if tenant is not None:
        entries = entries.filter(tenant=tenant)
    if filters.person:
        entries = entries.filter(person_match(filters.person))
    if filters.action.endswith("."):
        names = [name for name in _actions_logged(tenant) if name.startswith(filters.action)]
        entries = entries.filter(action__in=names)
    elif filters.action:
        entries = entries.filter(action=filters.action)
    if filters.outcome:
        if filters.outcome not in AccessEvent.Outcome.values:
            raise Invalid(f"Outcome is one of: {', '.join(AccessEvent.Outcome.values)}.", code="bad_outcome")
        entries = entries.filter(outcome=filters.outcome)
    if filters.date_from:
        entries = entries.filter(created__gte=_day_start(filters.date_from))
    if filters.date_to:
        entries = entries.filter(created__lt=_day_start(filters.date_to + timedelta(days=1)))
    if filters.patient or filters.study is not None:
        entries = entries.filter(
            about_targets(tenant_id=tenant.pk if tenant else None, patient=filters.patient, study=filters.study)
        )
    return entries.order_by("-created", "-id"), tenant


ACCESS_LOG_CURSOR = "access-log"


def _access_log_cursor_encode(entry: AccessEvent) -> str:
    return cursor_encode([entry.created.isoformat(), entry.pk], purpose=ACCESS_LOG_CURSOR)


def _access_log_cursor_decode(cursor: str) -> tuple[datetime, int]:
    try:
        state = cursor_decode(cursor, purpose=ACCESS_LOG_CURSOR)
        if not isinstance(state, list):
            raise TypeError(cursor)
        stamp, pk = state
        created = datetime.fromisoformat(stamp)
        if timezone.is_naive(created):
            raise ValueError(cursor)
        return created, int(pk)
    except (ValueError, TypeError):
        raise Invalid(BAD_CURSOR, code="bad_cursor") from None


def access_log_list(
    *,
    actor: Membership | User,
    filters: AccessLogFilters,
    cursor: str = "",
    limit: int = ACCESS_LOG_PAGE,
    request=None,
) -> tuple[list[AccessEvent], str]:
    """One page of the access log, newest first, and the cursor of the next page ("" at the end).

    ``actor`` is a Membership (a hospital's auditor: that hospital only) or a user with the
    platform auditor permission (every hospital, or the one ``filters.hospital`` names). Keyset
    pagination on (created, id) over the log's indexes: page 5,000 costs what page 1 does.
    Reading a page is itself logged, once per page.
    """
    reader, tenant = _audit_scope(actor, request)
    if not 1 <= limit <= ACCESS_LOG_PAGE_MAX:
        raise Invalid(f"A page holds 1 to {ACCESS_LOG_PAGE_MAX} entries.", code="bad_page_size")
    entries, hospital = _access_log_entries(tenant=tenant, filters=filters)
    if cursor:
        created, pk = _access_log_cursor_decode(cursor)
        # "created <= c" first: a plain range on the index; the OR only settles ties
        entries = entries.filter(created__lte=created).filter(Q(created__lt=created) | Q(id__lt=pk))
    page = list(entries[: limit + 1])
    access_event_record(action="audit.view", request=request, user=reader, tenant=hospital, target_type="access_log")
    if len(page) <= limit:
        return page, ""
    page = page[:limit]
    return page, _access_log_cursor_encode(page[-1])


def access_log_export(*, actor: Membership | User, filters: AccessLogFilters, request=None) -> QuerySet:
    """Every entry that matches, newest first, unevaluated (the caller streams it). The export
    is logged here, before the first row is read."""
    reader, tenant = _audit_scope(actor, request)
    entries, hospital = _access_log_entries(tenant=tenant, filters=filters)
    access_event_record(action="audit.export", request=request, user=reader, tenant=hospital, target_type="access_log")
    return entries


def access_log_entry_get(*, actor: Membership | User, entry_id: int, request=None) -> AccessEvent:
    """One entry with every field; another hospital's entry is 404 like a missing one. The view
    is logged in the chain of the entry's hospital (a platform auditor's too)."""
    reader, tenant = _audit_scope(actor, request)
    entries = AccessEvent.objects.select_related("tenant", "actor")
    entry = (entries if tenant is None else entries.filter(tenant=tenant)).filter(pk=entry_id).first()
    access_event_record(
        action="audit.view",
        outcome=AccessEvent.Outcome.SUCCESS if entry else AccessEvent.Outcome.DENIED,
        request=request,
        user=reader,
        tenant=entry.tenant if entry else tenant,
        target_type="access_event",
        target_id=entry_id,
    )
    if entry is None:
        raise NotFound("No such entry.")
    return entry
