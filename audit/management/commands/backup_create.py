"""``manage.py backup_create DEST``: the database and the storage's objects, encrypted with age."""

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.backups import BackupError, backup_create

RECIPIENTS_ENV = "SIGHTLINE_BACKUP_RECIPIENTS"


class Command(BaseCommand):
    help = (
        "Back up the database (pg_dump --format=custom, or SQLite's backup API) and every stored object, "
        "each encrypted with age to the operator's public key(s); the run is written to the access log."
    )

    def add_arguments(self, parser):
        parser.add_argument("destination", type=Path, help="a new or empty folder for this backup")
        parser.add_argument(
            "--recipient",
            action="append",
            default=[],
            help=f"an age public key (age1...); repeatable; default: {RECIPIENTS_ENV}, comma- or space-separated",
        )
        parser.add_argument(
            "--operator",
            default="",
            help="who runs it (a name or staff id, never a patient identifier), recorded in the access log "
            "with the OS user (SUDO_USER where set); default: the OS user alone",
        )

    def handle(self, *args, destination: Path, recipient: list[str], operator: str, **options):
        recipients = recipient or os.environ.get(RECIPIENTS_ENV, "").replace(",", " ").split()
        try:
            manifest = backup_create(destination=destination, recipients=recipients, operator=operator)
        except BackupError as error:
            raise CommandError(str(error)) from error
        total = sum(part.size for part in manifest.parts)
        self.stdout.write(
            self.style.SUCCESS(
                f"Backup {manifest.backup_id}: {manifest.objects} objects, {total} encrypted bytes in {destination}."
            )
        )
