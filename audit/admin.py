"""The access log in the admin, for platform auditors only; every read there is logged."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404

from accounts.models import AccessEvent
from accounts.services import access_event_record
from core.errors import NotFound

from .selectors import PLATFORM_AUDIT_PERMISSION, access_log_entry_get


@admin.register(AccessEvent)
class AccessEventAdmin(admin.ModelAdmin):
    """The access log, for platform auditors only: the permission the site's access-log page
    asks for (granted through the "Platform auditors" group), not the staff flag or the
    model's default view permission. Every read here is itself an access-log entry, written
    in the same transaction as the page's queries (the page is rendered inside it)."""

    list_display = ("created", "tenant", "actor_label", "action", "target_type", "target_id", "outcome")
    list_filter = ("action", "outcome", "tenant")

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.has_perm(PLATFORM_AUDIT_PERMISSION)

    def has_module_permission(self, request):
        return self.has_view_permission(request)

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False

    def _refuse_unless_auditor(self, request) -> None:
        if not self.has_view_permission(request):
            access_event_record(
                action="audit.view", outcome=AccessEvent.Outcome.DENIED, request=request, target_type="access_log"
            )
            raise PermissionDenied

    def changelist_view(self, request, extra_context=None):
        self._refuse_unless_auditor(request)
        with transaction.atomic():
            access_event_record(action="audit.view", request=request, target_type="access_log")
            return _rendered(super().changelist_view(request, extra_context))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        self._refuse_unless_auditor(request)
        try:
            entry_id = int(object_id)
        except (TypeError, ValueError):
            raise Http404("No such entry.") from None
        with transaction.atomic():
            # logged in the chain of the entry's hospital, as on the site's access-log page;
            # a missing entry is a denied read (committed with this block) and a 404
            try:
                access_log_entry_get(actor=request.user, entry_id=entry_id, request=request)
            except NotFound:
                pass
            else:
                return _rendered(super().change_view(request, object_id, form_url, extra_context))
        raise Http404("No such entry.")


def _rendered(response):
    """A TemplateResponse renders after the view returns; render it now, inside the
    transaction that holds the audit entry, so the read and its record commit together."""
    if hasattr(response, "render") and not getattr(response, "is_rendered", True):
        response.render()
    return response
