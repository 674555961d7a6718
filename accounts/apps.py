from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Hospitals and people"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (login, logout and failed-login auditing)
