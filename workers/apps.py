from django.apps import AppConfig


class WorkersConfig(AppConfig):
    """The worker side: the inference runtime, registration checks and the commands that need
    torch (building the demo model, seeding, registering with ``--validate-here``). It has no
    models; ``workers/engine/`` below it stays free of Django."""

    name = "workers"
    default_auto_field = "django.db.models.BigAutoField"
