from django.apps import AppConfig


class AuditConfig(AppConfig):
    """Reading the access log (pages, API, CSV export, the admin's log): above accounts/ and
    recognition/. It has no models: the log is accounts' (AccessEvent), written there."""

    name = "audit"
    verbose_name = "Access log"
