"""The one role → action table. Pages, API views, consumers and tasks all ask ``can``."""

from __future__ import annotations

from enum import StrEnum

from .models import Membership, Role


class Action(StrEnum):
    IMAGE_VIEW = "image.view"  # images, their studies and AI results
    IMAGE_UPLOAD = "image.upload"
    BATCH_SUBMIT = "batch.submit"  # create, fill, start, cancel and retry bulk jobs
    REVIEW_WRITE = "review.write"  # agree, disagree or correct an AI finding, sign off, amend
    AGREEMENT_VIEW = "agreement.view"  # clinicians' agreement with each model version
    EVENTS_SUBSCRIBE = "events.subscribe"  # live notifications over the WebSocket
    MEMBERS_MANAGE = "members.manage"  # list, invite, change role, deactivate
    ACTIVITY_VIEW = "activity.view"  # the hospital's membership and sign-in activity
    AUDIT_VIEW = "audit.view"  # the access log
    HOSPITAL_SETTINGS = "hospital.settings"  # the hospital's own settings (browser screening, its routing)


_READ_CLINICAL = {Action.IMAGE_VIEW, Action.EVENTS_SUBSCRIBE}

ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    Role.VIEWER: frozenset(_READ_CLINICAL),
    Role.CLINICIAN: frozenset(_READ_CLINICAL | {Action.IMAGE_UPLOAD, Action.REVIEW_WRITE, Action.BATCH_SUBMIT}),
    Role.TENANT_ADMIN: frozenset(
        {Action.MEMBERS_MANAGE, Action.ACTIVITY_VIEW, Action.AGREEMENT_VIEW, Action.HOSPITAL_SETTINGS}
    ),
    Role.AUDITOR: frozenset({Action.AUDIT_VIEW}),
}

# Actions a hospital can put behind a second factor for its admins.
ADMIN_ACTIONS = frozenset({Action.MEMBERS_MANAGE, Action.ACTIVITY_VIEW, Action.HOSPITAL_SETTINGS})


def can(membership: Membership, action: Action) -> bool:
    return membership.is_active and action in ROLE_ACTIONS.get(membership.role, frozenset())
