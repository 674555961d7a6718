from .selectors import memberships_active


def tenancy(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {
        "memberships": memberships_active(user=user),
        "active_tenant_slug": request.session.get("tenant_slug", ""),
    }
