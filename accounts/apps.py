from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Hospitals and people"

    def ready(self) -> None:
        # signals: login, logout and failed-login auditing; authentication first, so that its
        # receiver refuses a service account's session before the sign-in is logged as a success
        from . import authentication, signals  # noqa: F401
