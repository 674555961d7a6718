from .permissions import Action, can
from .selectors import memberships_active


def tenancy(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    memberships = list(memberships_active(user=user))
    slug = request.session.get("tenant_slug", "")
    active = next((m for m in memberships if m.tenant.slug == slug), memberships[0] if memberships else None)
    return {
        "memberships": memberships,
        "active_tenant_slug": active.tenant.slug if active else "",
        "can_manage_members": bool(active and can(active, Action.MEMBERS_MANAGE)),
        "can_view_audit": user.has_perm("accounts.audit_all_hospitals")
        or bool(active and can(active, Action.AUDIT_VIEW)),
        "can_view_agreement": user.is_staff or bool(active and can(active, Action.AGREEMENT_VIEW)),
    }
