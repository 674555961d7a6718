"""Platform staff: each hospital's called AE title (unique across the platform). Nodes are the
hospital's own (its tenant admins register them on the DICOM nodes page); staff see them read-only."""

from django import forms
from django.contrib import admin

from core.errors import DomainError

from .models import DicomNode, HospitalAETitle
from .nodes import ae_title_clean, hospital_ae_title_assign


class HospitalAETitleForm(forms.ModelForm):
    class Meta:
        model = HospitalAETitle
        fields = ("tenant", "ae_title")

    def clean_ae_title(self):
        try:
            return ae_title_clean(self.cleaned_data["ae_title"])
        except DomainError as exc:
            raise forms.ValidationError(exc.message) from exc


@admin.register(HospitalAETitle)
class HospitalAETitleAdmin(admin.ModelAdmin):
    form = HospitalAETitleForm
    list_display = ("ae_title", "tenant", "assigned_by", "created")
    search_fields = ("ae_title", "tenant__slug", "tenant__name")
    readonly_fields = ("assigned_by", "created")

    def save_model(self, request, obj, form, change):
        # the service: uniqueness in words and the access-log entry, in one transaction
        assigned = hospital_ae_title_assign(
            tenant=obj.tenant, ae_title=obj.ae_title, assigned_by=request.user, request=request
        )
        obj.pk = assigned.pk


@admin.register(DicomNode)
class DicomNodeAdmin(admin.ModelAdmin):
    list_display = ("name", "ae_title", "host", "bind_host", "tenant", "is_active", "last_seen")
    list_filter = ("tenant", "is_active")

    def has_add_permission(self, request):
        return False  # a node comes with its service account: the hospital's page makes both

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
