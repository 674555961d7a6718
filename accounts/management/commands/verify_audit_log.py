"""Check every hash chain of the access log (or one hospital's) and name the first bad entry."""

from django.core.management.base import BaseCommand, CommandError

from accounts.audit import chains_verify
from accounts.models import Tenant


class Command(BaseCommand):
    help = "Verify the access log's hash chains; exit 1 and name the first entry that does not verify."

    def add_arguments(self, parser):
        parser.add_argument("--tenant", metavar="SLUG", help="only this hospital's chain")

    def handle(self, *args, tenant=None, **options):
        hospital = None
        if tenant:
            hospital = Tenant.objects.filter(slug=tenant).first()
            if hospital is None:
                raise CommandError(f"No hospital with the slug {tenant!r}.")
        reports = chains_verify(hospital)
        for report in reports:
            self.stdout.write(str(report) if report.ok else self.style.ERROR(str(report)))
        bad = [report for report in reports if not report.ok]
        if bad:
            raise CommandError(f"{len(bad)} of {len(reports)} chains do not verify.")
        self.stdout.write(
            self.style.SUCCESS(f"{len(reports)} chains, {sum(r.checked for r in reports)} entries verify.")
        )
