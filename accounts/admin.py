"""Platform staff: hospitals, memberships and people. Clinical records are not in the admin; the
access log's admin page is the audit app's (audit/admin.py)."""

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction

from .events import access_revoked_on_commit, hospital_access_changed_on_commit
from .models import Membership, Tenant
from .services import access_event_record, user_deactivate


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "is_active", "require_admin_two_factor", "created")
    prepopulated_fields = {"slug": ("name",)}

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            access_event_record(
                action="tenant.change" if change else "tenant.create",
                request=request,
                tenant=obj,
                target_type="tenant",
                target_id=obj.pk,
            )
            if change:  # closed, or its second-factor rule changed: sockets re-check
                hospital_access_changed_on_commit(tenant_id=obj.pk)

    def has_delete_permission(self, request, obj=None):
        return False  # hospitals are closed (is_active), never deleted with their records


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "is_active", "last_seen")
    list_filter = ("tenant", "role", "is_active")
    readonly_fields = ("last_seen",)

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            access_event_record(
                action="membership.role_change" if change else "membership.grant",
                request=request,
                tenant=obj.tenant,
                target_type="membership",
                target_id=obj.pk,
            )
            access_revoked_on_commit(user_id=obj.user_id, tenant_id=obj.tenant_id)

    def delete_model(self, request, obj):
        with transaction.atomic():
            access_event_record(
                action="membership.delete",
                request=request,
                tenant=obj.tenant,
                target_type="membership",
                target_id=obj.pk,
            )
            access_revoked_on_commit(user_id=obj.user_id, tenant_id=obj.tenant_id)
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for membership in queryset:
            self.delete_model(request, membership)


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class SightlineUserAdmin(UserAdmin):
    actions = ["deactivate", "issue_enrolment_code", "reset_two_factor"]

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            access_event_record(
                action="user.change" if change else "user.create", request=request, target_type="user", target_id=obj.pk
            )
            if not obj.is_active:  # unticked "active": their sockets close like any deactivation
                access_revoked_on_commit(user_id=obj.pk, tenant_id=None)

    def has_delete_permission(self, request, obj=None):
        return False  # people are deactivated, so the access log keeps naming them

    @admin.action(description="Deactivate selected users (ends their sessions, tokens and sockets)")
    def deactivate(self, request, queryset):
        for user in queryset:
            user_deactivate(user=user, deactivated_by=request.user, request=request)
        messages.success(request, f"{queryset.count()} user(s) deactivated.")

    # --- second factor (accounts/two_factor.py): platform staff issue codes and reset devices ---

    @admin.action(description="Issue a two-factor enrolment code (shown once)", permissions=["change"])
    def issue_enrolment_code(self, request, queryset):
        from django.template.response import TemplateResponse

        from core.errors import DomainError

        from .two_factor import enrolment_code_issue_by_staff

        issued = []
        for user in queryset:
            try:
                code, raw = enrolment_code_issue_by_staff(user=user, issued_by=request.user, request=request)
            except DomainError as exc:
                messages.error(request, exc.message)
                continue
            issued.append({"user": user, "code": raw, "expires_at": code.expires_at})
        if not issued:
            return None
        response = TemplateResponse(
            request, "admin/accounts/enrolment_codes.html", {**self.admin_site.each_context(request), "issued": issued}
        )
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(
        description="Reset two-factor sign-in (removes authenticator and recovery codes)", permissions=["change"]
    )
    def reset_two_factor(self, request, queryset):
        from core.errors import DomainError

        from .two_factor import device_reset_by_staff

        done = 0
        for user in queryset:
            try:
                device_reset_by_staff(user=user, reset_by=request.user, request=request)
                done += 1
            except DomainError as exc:
                messages.error(request, exc.message)
        if done:
            messages.success(request, f"Second factor reset for {done} user(s); issue enrolment codes where needed.")
