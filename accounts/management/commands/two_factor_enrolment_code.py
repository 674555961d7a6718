"""Issue a two-factor enrolment code for a person (the first platform staff member, say, whom
no one else can issue one for yet). The code is printed once; issuing is in the access log."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.two_factor import enrolment_code_issue_by_staff


class Command(BaseCommand):
    help = "Print a one-time enrolment code that lets USERNAME set up their first authenticator."

    def add_arguments(self, parser):
        parser.add_argument("username")

    def handle(self, *args, username, **options):
        User = get_user_model()
        user = User._default_manager.filter(**{User.USERNAME_FIELD: username}, is_active=True).first()
        if user is None:
            raise CommandError(f"No active user {username!r}.")
        code, raw = enrolment_code_issue_by_staff(user=user)
        self.stdout.write(f"{raw}\n(works once, until {code.expires_at:%Y-%m-%d %H:%M} UTC)")
