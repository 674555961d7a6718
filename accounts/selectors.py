"""Reads for hospitals and people, and the one way a request finds its hospital."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING

from django.db.models import Q, QuerySet
from django.utils import timezone

from config.cursor import BAD_CURSOR, cursor_decode, cursor_encode
from config.errors import Forbidden, Invalid, NotFound
from config.pseudonym import PATIENT, USERNAME, pseudonym_candidates

from .models import AccessEvent, Invitation, Membership, Tenant
from .permissions import Action

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser


def memberships_active(*, user):
    return (
        Membership.objects.filter(user=user, is_active=True, tenant__is_active=True)
        .select_related("tenant", "user")
        .order_by("tenant__name")
    )


# Set on the request by accounts.authentication.MembershipJWTAuthentication: (the X-Tenant it
# was read for, or "", and the user's active memberships it read with the user: up to two).
ACTIVE_MEMBERSHIPS = "_sightline_active_memberships"


def membership_resolve(*, user, tenant_slug: str | None, request=None) -> Membership:
    """The membership a request acts under: the named hospital, or the only one.

    A hospital the user does not belong to answers 404 like one that does not exist.
    """
    slug = tenant_slug or ""
    read = getattr(request, ACTIVE_MEMBERSHIPS, None)
    if read is not None and read[0] == slug:
        candidates = read[1]  # read in this request's authentication query, not again
    else:
        memberships = memberships_active(user=user)
        candidates = list((memberships.filter(tenant__slug=slug) if slug else memberships)[:2])
    if slug:
        membership = candidates[0] if candidates else None
        if membership is None:
            from .services import access_event_record

            access_event_record(
                action="tenant.select",
                outcome=AccessEvent.Outcome.DENIED,
                request=request,
                user=user,
                target_type="tenant",
                target_id=slug[:64],
            )
            raise NotFound("No such hospital.")
        _touch(membership)
        return membership
    if not candidates:
        raise Forbidden("You are not a member of any hospital.")
    if len(candidates) > 1:
        raise Invalid(
            "You belong to several hospitals: name one with the X-Tenant header.",
            code="tenant_required",
        )
    _touch(candidates[0])
    return candidates[0]


def _touch(membership: Membership) -> None:
    from .services import membership_touch

    membership_touch(membership)


def membership_get(*, actor: Membership, membership_id: int, request=None) -> Membership:
    """A member of the actor's hospital; another hospital's member is 404 like a missing one."""
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    membership = (
        _people(Membership.objects.for_tenant(actor.tenant)).select_related("user", "tenant").filter(pk=membership_id)
    ).first()
    if membership is None:
        from .services import access_event_record

        access_event_record(
            action="membership.view",
            outcome=AccessEvent.Outcome.DENIED,
            request=request,
            user=actor.user,
            tenant=actor.tenant,
            target_type="membership",
            target_id=membership_id,
        )
        raise NotFound("No such member.")
    return membership


def membership_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return (
        _people(Membership.objects.for_tenant(actor.tenant))
        .select_related("user")
        .order_by("-is_active", "user__username")
    )


def _people(memberships):
    """Service accounts' memberships are managed on their own page (accounts.service_accounts),
    where their roles stay within what a service account may hold."""
    return memberships.filter(user__service_account__isnull=True)


def invitation_list(*, actor: Membership, request=None):
    from .services import require

    require(actor, Action.MEMBERS_MANAGE, request=request)
    return Invitation.objects.for_tenant(actor.tenant).filter(accepted_at__isnull=True).order_by("-created")


ACTIVITY_ACTIONS = ("membership.", "invitation.", "tenant.", "two_factor.", "service_account.", "api_key.")


def activity_list(*, actor: Membership, request=None):
    """The hospital's people-related events: invitations, grants, role changes, deactivations."""
    from django.db.models import Q

    from .services import require

    require(actor, Action.ACTIVITY_VIEW, request=request)
    prefixes = Q()
    for prefix in ACTIVITY_ACTIONS:
        prefixes |= Q(action__startswith=prefix)
    return AccessEvent.objects.filter(prefixes, tenant=actor.tenant).order_by("-created", "-id")


# --- the access log, for auditors ----------------------------------------------------------

PLATFORM_AUDIT_PERMISSION = "accounts.audit_all_hospitals"
ACCESS_LOG_PAGE = 100
ACCESS_LOG_PAGE_MAX = 500
# A patient's or study's targets go into the query as id lists, one per kind. Three lists of
# this many stay far inside SQLite's 32,766 parameters per statement; a patient with more
# images than this is refused with a hint to filter by study, never silently cut short.
ACCESS_LOG_TARGETS_MAX = 5000


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


def access_log_actor(request) -> Membership | AbstractBaseUser:
    """Who reads the log on a page: a platform auditor as themselves (they may belong to no
    hospital), everyone else as a member of the session's hospital."""
    if request.user.has_perm(PLATFORM_AUDIT_PERMISSION):
        return request.user
    return membership_for_session(request)


def _audit_scope(actor: Membership | AbstractBaseUser, request) -> tuple[AbstractBaseUser, Tenant | None]:
    """(the reader, the hospital they may read or None for every hospital). A member needs
    their role's audit.view; anyone else needs the platform auditor permission."""
    from .services import access_event_record, require

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


def _target_ids(queryset: QuerySet, kind: str) -> list[str]:
    ids = list(queryset.values_list("pk", flat=True)[: ACCESS_LOG_TARGETS_MAX + 1])
    if len(ids) > ACCESS_LOG_TARGETS_MAX:
        raise Invalid(
            f"This matches more than {ACCESS_LOG_TARGETS_MAX:,} {kind}; filter by one study instead.",
            code="too_many_targets",
        )
    return [str(pk) for pk in ids]


def _patient_pseudonyms(*, tenant_id: int | None, patient: str) -> Q:
    """The patient as shown (a pseudonym) or as the hospital knows them (a raw patient id, hashed
    under every key of the pseudonym ring for each hospital in scope: pseudonyms are per hospital)."""
    tenant_ids = [tenant_id] if tenant_id is not None else list(Tenant.objects.values_list("pk", flat=True))
    match = Q(patient_pseudonym=patient)
    for pk in tenant_ids:
        match |= Q(tenant_id=pk, patient_pseudonym__in=pseudonym_candidates(patient, purpose=PATIENT, scope=pk))
    return match


def _about_targets(*, tenant_id: int | None, patient: str, study: int | None) -> Q:
    """Entries whose target is one of the patient's (or the study's) studies, their images or
    those images' reviews. Targets are logged as (type, id as text), so the ids are listed."""
    from recognition.models import Image, Review, Study

    studies = Study.objects.all() if tenant_id is None else Study.objects.for_tenant(tenant_id)
    if patient:
        studies = studies.filter(_patient_pseudonyms(tenant_id=tenant_id, patient=patient))
    if study is not None:
        studies = studies.filter(pk=study)
    study_ids = _target_ids(studies, "studies")
    if study is not None and not patient:
        # the id itself too: a denied attempt on a study that is not (or no longer) there
        study_ids = [str(study)]
    images = Image.objects.filter(study_id__in=study_ids)
    image_ids = _target_ids(images if tenant_id is None else images.filter(tenant_id=tenant_id), "images")
    reviews = Review.objects.filter(image_id__in=image_ids)
    review_ids = _target_ids(reviews if tenant_id is None else reviews.filter(tenant_id=tenant_id), "reviews")
    about = Q(pk__in=[])
    for kind, ids in (("study", study_ids), ("image", image_ids), ("review", review_ids)):
        if ids:
            about |= Q(target_type=kind, target_id__in=ids)
    return about


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
    from django.db import connection

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
    from django.contrib.auth import get_user_model

    entries = AccessEvent.objects.select_related("tenant")
    if tenant is None and filters.hospital:
        tenant = Tenant.objects.filter(slug=filters.hospital).first()
        if tenant is None:
            raise Invalid("No such hospital.", code="bad_hospital")
    if tenant is not None:
        entries = entries.filter(tenant=tenant)
    if filters.person:
        # a failed sign-in keeps the keyed hash of the name typed: hash what is asked under every
        # key of the ring (and the name itself, for entries written before names were hashed)
        labels = [filters.person, *pseudonym_candidates(filters.person, purpose=USERNAME)]
        by_label = Q(actor__isnull=True, actor_label__in=labels)
        user_id = get_user_model().objects.filter(username=filters.person).values_list("pk", flat=True).first()
        entries = entries.filter(Q(actor_id=user_id) | by_label if user_id is not None else by_label)
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
            _about_targets(tenant_id=tenant.pk if tenant else None, patient=filters.patient, study=filters.study)
        )
    return entries.order_by("-created", "-id"), tenant


ACCESS_LOG_CURSOR = "access-log"


def _access_log_cursor_encode(entry: AccessEvent) -> str:
    return cursor_encode([entry.created.isoformat(), entry.pk], purpose=ACCESS_LOG_CURSOR)


def _access_log_cursor_decode(cursor: str) -> tuple[datetime, int]:
    try:
        created, pk = cursor_decode(cursor, purpose=ACCESS_LOG_CURSOR)
        created = datetime.fromisoformat(created)
        if timezone.is_naive(created):
            raise ValueError(cursor)
        return created, int(pk)
    except (ValueError, TypeError):
        raise Invalid(BAD_CURSOR, code="bad_cursor") from None


def access_log_list(
    *,
    actor: Membership | AbstractBaseUser,
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
    from .services import access_event_record

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


def access_log_export(*, actor: Membership | AbstractBaseUser, filters: AccessLogFilters, request=None) -> QuerySet:
    """Every entry that matches, newest first, unevaluated (the caller streams it). The export
    is logged here, before the first row is read."""
    from .services import access_event_record

    reader, tenant = _audit_scope(actor, request)
    entries, hospital = _access_log_entries(tenant=tenant, filters=filters)
    access_event_record(action="audit.export", request=request, user=reader, tenant=hospital, target_type="access_log")
    return entries


def access_log_entry_get(*, actor: Membership | AbstractBaseUser, entry_id: int, request=None) -> AccessEvent:
    """One entry with every field; another hospital's entry is 404 like a missing one. The view
    is logged in the chain of the entry's hospital (a platform auditor's too)."""
    from .services import access_event_record

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


def membership_for_session(request) -> Membership:
    """The hospital a browser session works in: the one it chose, else the first it belongs to."""
    memberships = memberships_active(user=request.user)
    slug = request.session.get("tenant_slug")
    membership = memberships.filter(tenant__slug=slug).first() if slug else None
    if membership is None:  # never chosen, or access to the chosen one has ended
        membership = memberships.first()
        if membership is None:
            raise Forbidden("You are not a member of any hospital.")
        request.session["tenant_slug"] = membership.tenant.slug
    _touch(membership)
    return membership
