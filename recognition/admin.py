from django.contrib import admin

from .models import AIModel, ModelAlias, ModelVersion


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ("name", "is_demo", "created")


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("model", "version", "weights_sha256", "created")
    readonly_fields = ("model", "version", "manifest", "package", "weights_sha256", "registered_by", "created")

    def has_add_permission(self, request):  # registration goes through register_model
        return False


@admin.register(ModelAlias)
class ModelAliasAdmin(admin.ModelAdmin):
    list_display = ("model", "name", "version", "updated")
