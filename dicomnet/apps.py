from django.apps import AppConfig


class DicomnetConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "dicomnet"
    verbose_name = "DICOM networking"
