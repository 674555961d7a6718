"""Platform staff: hospitals, memberships and people. Clinical records are not in the admin."""

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from .models import AccessEvent, Membership, Tenant
from .services import access_event_record, user_deactivate


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "is_active", "require_admin_two_factor", "created")
    prepopulated_fields = {"slug": ("name",)}

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        access_event_record(
            action="tenant.change" if change else "tenant.create",
            request=request,
            tenant=obj,
            target_type="tenant",
            target_id=obj.pk,
        )


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "is_active", "last_seen")
    list_filter = ("tenant", "role", "is_active")
    readonly_fields = ("last_seen",)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        access_event_record(
            action="membership.role_change" if change else "membership.grant",
            request=request,
            tenant=obj.tenant,
            target_type="membership",
            target_id=obj.pk,
        )


@admin.register(AccessEvent)
class AccessEventAdmin(admin.ModelAdmin):
    list_display = ("created", "tenant", "actor_label", "action", "target_type", "target_id", "outcome")
    list_filter = ("action", "outcome", "tenant")

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class SightlineUserAdmin(UserAdmin):
    actions = ["deactivate"]

    @admin.action(description="Deactivate selected users (ends their sessions, tokens and sockets)")
    def deactivate(self, request, queryset):
        for user in queryset:
            user_deactivate(user=user, deactivated_by=request.user, request=request)
        messages.success(request, f"{queryset.count()} user(s) deactivated.")
