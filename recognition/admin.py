"""Platform staff: the model registry. Every change goes through the registry services, which
check packages and write the access log; versions themselves are immutable."""

import tempfile
from pathlib import Path

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.shortcuts import redirect, render
from django.urls import path
from django.utils.html import format_html, format_html_join

from core.errors import DomainError

from .models import AIModel, ModelAlias, ModelPin, ModelVersion, RolloutChange, TrafficSplit
from .services.registry import (
    derived_below_floor,
    model_alias_move,
    model_pin_set,
    model_version_submit,
    rollout_undo,
    traffic_split_set,
)
from .services.shadow import traffic_split_shadow_set

_MB = 1e6


class RegisterPackageForm(forms.Form):
    package = forms.FileField(help_text="A zip with manifest.json and weights.pt.")
    alias = forms.ChoiceField(
        choices=[("", "no alias"), *ModelAlias.Name.choices], required=False, help_text="Point this alias at it."
    )
    browser_distribution_allowed = forms.BooleanField(
        required=False,
        label="Its licence allows shipping the weights to browsers",
        help_text="Screening models only (manifest role: screening): they run in readers' browsers, which "
        "download the weights. A vendor's licence may forbid that; a screening package is refused unless "
        "you confirm it does not.",
    )


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ("name", "is_demo", "created")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "label",
        "status",
        "derived_from",
        "agreement",
        "refusal_reason",
        "weights_sha256",
        "registered_by",
        "created",
    )
    list_filter = ("status",)
    list_select_related = ("model", "derived_from", "registered_by")
    change_list_template = "admin/recognition/modelversion/change_list.html"
    fields = (
        "model",
        "label",
        "status",
        "refusal_reason",
        "derived_from",
        "evaluation_table",
        "weights_sha256",
        "package_sha256",
        "registered_by",
        "created",
        "validated_at",
        "manifest",
    )
    readonly_fields = fields

    @admin.display(description="version", ordering="serial")
    def label(self, obj):
        return obj.label

    @admin.display(description="agreement with parent")
    def agreement(self, obj):
        value = (obj.evaluation or {}).get("agreement")
        return "" if value is None else f"{value:.1%}"

    @admin.display(description="measured against its parent")
    def evaluation_table(self, obj):
        """The registration task's numbers: the derived version beside the one it was made from."""
        evaluation = obj.evaluation or {}
        if not evaluation:
            return "not derived" if obj.derived_from_id is None else "not measured yet"
        rows = [
            ("held-out set", f"{evaluation.get('holdout', '')} ({evaluation.get('images')} images)"),
            ("top-label agreement", f"{evaluation['agreement']:.2%}"),
            (
                "probability difference",
                f"mean {evaluation['mean_abs_diff']:.4g}, worst {evaluation['max_abs_diff']:.4g}",
            ),
            ("size ratio (model bytes)", f"{evaluation.get('size_ratio')}"),
        ]
        for arm in ("derived", "parent"):
            numbers = evaluation.get(arm, {})
            accuracy = f", accuracy {numbers['accuracy']:.2%}" if "accuracy" in numbers else ""
            rows.append(
                (
                    f"{arm}: {numbers.get('version', '')}",
                    f"{numbers.get('backend')}: {numbers.get('images_per_second')} images/s, package "
                    f"{numbers.get('package_bytes', 0) / _MB:.1f} MB, "
                    f"model {numbers.get('model_bytes', 0) / _MB:.1f} MB"
                    f"{accuracy}",
                )
            )
        below = derived_below_floor(obj)
        rows.append(("production", f"refused without force: {below}" if below else "may be promoted"))
        return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))

    def has_add_permission(self, request):
        return False  # through "Register a package": stored, then checked by a worker

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        return [
            path("register/", self.admin_site.admin_view(self.register_view), name="recognition_modelversion_register"),
            *super().get_urls(),
        ]

    def register_view(self, request):
        if not (request.user.is_active and request.user.is_staff and request.user.is_superuser):
            raise PermissionDenied
        form = RegisterPackageForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            with tempfile.TemporaryDirectory() as folder:
                package = Path(folder) / "package.zip"
                with package.open("wb") as target:
                    for chunk in form.cleaned_data["package"].chunks():
                        target.write(chunk)
                try:
                    # stored and recorded as validating; a worker loads and checks it, never this process
                    version, created = model_version_submit(
                        package_path=package,
                        registered_by=request.user,
                        alias=form.cleaned_data["alias"] or None,
                        browser_distribution_allowed=form.cleaned_data["browser_distribution_allowed"],
                    )
                except DomainError as exc:
                    form.add_error("package", exc.message)
                else:
                    if version.status == ModelVersion.Status.VALIDATING:
                        messages.success(
                            request,
                            f"Stored {version}: a worker is checking it now. Its status below turns to ready, "
                            "or to refused with the reason.",
                        )
                    else:
                        messages.success(request, f"Already registered: {version} ({version.status}).")
                    return redirect("admin:recognition_modelversion_changelist")
        context = {**self.admin_site.each_context(request), "form": form, "title": "Register a model package"}
        return render(request, "admin/recognition/modelversion/register.html", context)


class RegistryChangeAdmin(admin.ModelAdmin):
    """Saves and deletes go through a registry service (validation and the access log)."""

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "version":  # only a version that passed its checks is offered
            kwargs["queryset"] = ModelVersion.objects.filter(status=ModelVersion.Status.READY).select_related("model")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)

    def _apply(self, request, change):
        try:
            change()
        except DomainError as exc:
            messages.error(request, exc.message)


class ModelAliasForm(forms.ModelForm):
    force = forms.BooleanField(
        required=False,
        help_text="Give production to a derived version whose agreement with its parent is under the floor "
        "(logged as forced).",
    )

    class Meta:
        model = ModelAlias
        fields = ("model", "name", "version")


@admin.register(ModelAlias)
class ModelAliasAdmin(RegistryChangeAdmin):
    form = ModelAliasForm
    list_display = ("model", "name", "version", "updated")
    fields = ("model", "name", "version", "force")

    def save_model(self, request, obj, form, change):
        self._apply(
            request,
            lambda: model_alias_move(
                model=obj.model,
                alias=obj.name,
                version=obj.version,
                moved_by=request.user,
                request=request,
                force=form.cleaned_data.get("force", False),
            ),
        )

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(TrafficSplit)
class TrafficSplitAdmin(RegistryChangeAdmin):
    list_display = ("tenant", "model", "version", "percent", "shadow_percent", "updated", "updated_by")
    fields = ("tenant", "model", "version", "percent", "shadow_percent")

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        form.base_fields["shadow_percent"].required = False  # left out: the default share
        return form

    def save_model(self, request, obj, form, change):
        @transaction.atomic
        def change_split():
            traffic_split_set(
                tenant=obj.tenant,
                model=obj.model,
                version=obj.version,
                percent=obj.percent,
                changed_by=request.user,
                request=request,
            )
            if obj.shadow_percent is not None and "shadow_percent" in form.changed_data:
                traffic_split_shadow_set(  # recognition/services/shadow.py
                    tenant=obj.tenant,
                    model=obj.model,
                    shadow_percent=obj.shadow_percent,
                    changed_by=request.user,
                    request=request,
                )

        self._apply(request, change_split)

    def delete_model(self, request, obj):
        traffic_split_set(
            tenant=obj.tenant, model=obj.model, version=None, percent=0, changed_by=request.user, request=request
        )


@admin.register(ModelPin)
class ModelPinAdmin(RegistryChangeAdmin):
    list_display = ("tenant", "model", "version", "updated", "updated_by")
    fields = ("tenant", "model", "version")

    def save_model(self, request, obj, form, change):
        self._apply(
            request,
            lambda: model_pin_set(
                tenant=obj.tenant, model=obj.model, version=obj.version, changed_by=request.user, request=request
            ),
        )

    def delete_model(self, request, obj):
        model_pin_set(tenant=obj.tenant, model=obj.model, version=None, changed_by=request.user, request=request)


@admin.register(RolloutChange)
class RolloutChangeAdmin(admin.ModelAdmin):
    """The history of alias moves, splits and pins; "undo" reverts the latest of its kind."""

    list_display = (
        "created",
        "model",
        "kind",
        "name",
        "tenant",
        "before",
        "after",
        "changed_by",
        "forced",
        "undone_at",
    )
    list_filter = ("kind", "forced", "model")
    list_select_related = ("model", "tenant", "changed_by")
    actions = ["undo"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Undo the latest change of the same model, hospital and kind")
    def undo(self, request, queryset):
        for scope in {(c.model, c.tenant, c.kind) for c in queryset.select_related("model", "tenant")}:
            model, tenant, kind = scope
            try:
                undone = rollout_undo(model=model, tenant=tenant, kind=kind, undone_by=request.user, request=request)
            except DomainError as exc:
                messages.error(request, exc.message)
            else:
                messages.success(request, f"Undone: {undone.kind} of {model.name} back to {undone.before}")
