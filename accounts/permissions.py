"""The one role → action table. Pages, API views, consumers and tasks all ask ``can``."""

from __future__ import annotations

from enum import StrEnum

from .models import Membership, Role


class Action(StrEnum):
    IMAGE_VIEW = "image.view"
    IMAGE_UPLOAD = "image.upload"
    RESULT_VIEW = "result.view"
    EVENTS_SUBSCRIBE = "events.subscribe"
    MEMBERS_MANAGE = "members.manage"
    ACTIVITY_VIEW = "activity.view"
    AUDIT_VIEW = "audit.view"


_READ_CLINICAL = {Action.IMAGE_VIEW, Action.RESULT_VIEW, Action.EVENTS_SUBSCRIBE}

ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    Role.VIEWER: frozenset(_READ_CLINICAL),
    Role.CLINICIAN: frozenset(_READ_CLINICAL | {Action.IMAGE_UPLOAD}),
    Role.TENANT_ADMIN: frozenset({Action.MEMBERS_MANAGE, Action.ACTIVITY_VIEW}),
    Role.AUDITOR: frozenset({Action.AUDIT_VIEW}),
}


def can(membership: Membership, action: Action) -> bool:
    return membership.is_active and action in ROLE_ACTIONS.get(membership.role, frozenset())
