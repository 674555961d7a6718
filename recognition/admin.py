"""Platform staff may look at the model registry here; changes go through the services
(`register_model`, alias moves), which check the package and write the access log."""

from django.contrib import admin

from .models import AIModel, ModelAlias, ModelVersion


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AIModel)
class AIModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "is_demo", "created")


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("model", "version", "weights_sha256", "created")


@admin.register(ModelAlias)
class ModelAliasAdmin(ReadOnlyAdmin):
    list_display = ("model", "name", "version", "updated")
