"""``manage.py dicom_ae_title HOSPITAL_SLUG AE``: give a hospital its called AE title (platform
staff; the same as the admin page, logged in the access log)."""

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from core.errors import DomainError
from dicomnet.nodes import hospital_ae_title_assign


class Command(BaseCommand):
    help = "Assign a hospital's called AE title (unique across the platform)."

    def add_arguments(self, parser):
        parser.add_argument("hospital", help="the hospital's slug")
        parser.add_argument("ae_title", help="at most 16 characters, e.g. SIGHTLINE_GEN")

    def handle(self, *args, hospital: str, ae_title: str, **options):
        tenant = Tenant.objects.filter(slug=hospital).first()
        if tenant is None:
            raise CommandError(f"No hospital with the slug {hospital!r}.")
        try:
            assigned = hospital_ae_title_assign(tenant=tenant, ae_title=ae_title)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"{tenant.slug} is called {assigned.ae_title}")
