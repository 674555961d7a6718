from django.apps import AppConfig


class ProtocolsConfig(AppConfig):
    """The model servers' own protocols (KServe v2, TF Serving, TorchServe), outside /api/v1/."""

    name = "protocols"
    default_auto_field = "django.db.models.BigAutoField"
