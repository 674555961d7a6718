"""Reaching a hospital's rows and recording what its members do: the one place for both.

``tenant_object_get`` is the access helper for every tenant-owned object a member names by id
(images, studies, reviews, jobs, memberships, service accounts, keys): it reads the object through
the member's hospital, and another hospital's object answers exactly like a missing one, a 404,
the attempt logged as denied. ``member_action_record`` writes one access-log entry for a member's
action (in the caller's transaction: if it cannot be written, the action fails).

It lives in accounts/ (below recognition/), not core/: it needs the Membership and the access log's
writer, which are accounts' models and service.
"""

from __future__ import annotations

from typing import TypeVar

from django.db.models import Model, QuerySet

from core.errors import NotFound

from .models import AccessEvent, Membership
from .services import access_event_record

T = TypeVar("T", bound=Model)


def member_action_record(
    membership: Membership,
    action: str,
    *,
    request=None,
    target_type: str = "",
    target_id: object = "",
    outcome: str = AccessEvent.Outcome.SUCCESS,
):
    """One access-log entry: ``membership``'s user did ``action`` in its hospital."""
    return access_event_record(
        action=action,
        outcome=outcome,
        request=request,
        user=membership.user,
        tenant=membership.tenant,
        target_type=target_type,
        target_id=target_id,
    )


def _not_found_recorded(
    *, membership: Membership, request, action: str, target_type: str, target_id, message: str
) -> NotFound:
    """Another hospital's object looks exactly like a missing one, and the attempt is logged:
    the 404 the access helper raises (returned, for the caller to raise)."""
    member_action_record(
        membership,
        action,
        outcome=AccessEvent.Outcome.DENIED,
        request=request,
        target_type=target_type,
        target_id=target_id,
    )
    return NotFound(message)


def tenant_object_get(
    queryset: QuerySet[T],
    *,
    membership: Membership,
    pk: object,
    request=None,
    action: str,
    target_type: str,
    message: str,
    for_update: bool = False,
) -> T:
    """The object ``pk`` of ``queryset`` (a tenant-owned model's, possibly annotated or with
    related rows selected) in the member's hospital; otherwise a logged 404 (``action`` denied,
    on ``target_type`` ``pk``). The caller checks the member's role first (``require``) and logs
    the success where the read is one to log."""
    scoped = queryset.filter(tenant=membership.tenant)  # TenantQuerySet.for_tenant, on any queryset (annotated too)
    # of=self: the object's own row only, never the rows select_related joins (a job's model
    # version is every hospital's: locking it deadlocked an upload committing its request, multihost drill)
    found = (scoped.select_for_update(of=("self",)) if for_update else scoped).filter(pk=pk).first()
    if found is None:
        raise _not_found_recorded(
            membership=membership,
            request=request,
            action=action,
            target_type=target_type,
            target_id=pk,
            message=message,
        )
    return found
