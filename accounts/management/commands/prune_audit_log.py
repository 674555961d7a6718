"""Prune access-log entries older than each hospital's retention (hospitals without one keep all)."""

from django.core.management.base import BaseCommand, CommandError

from accounts.audit import chain_prune
from accounts.models import Tenant


class Command(BaseCommand):
    help = (
        "Delete access-log entries older than each hospital's audit_retention_days, oldest first. "
        "The pruning is recorded in the hospital's chain, which verifies from its first kept entry."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", metavar="SLUG", help="only this hospital")

    def handle(self, *args, tenant=None, **options):
        hospitals = Tenant.objects.exclude(audit_retention_days=None)
        if tenant:
            hospitals = Tenant.objects.filter(slug=tenant)
            if not hospitals.exists():
                raise CommandError(f"No hospital with the slug {tenant!r}.")
        for hospital in hospitals.order_by("slug"):
            report = chain_prune(hospital)
            if report is None:
                self.stdout.write(f"{hospital.slug}: no retention set, nothing pruned")
            else:
                self.stdout.write(
                    f"{hospital.slug}: pruned {report.pruned} entries older than "
                    f"{hospital.audit_retention_days} days; the chain starts at entry {report.first_kept}"
                )
