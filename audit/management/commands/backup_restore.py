"""``manage.py backup_restore SRC --identity KEY``: into an empty database and an empty storage."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit.backups import BackupError, backup_restore


class Command(BaseCommand):
    help = (
        "Restore a backup made by backup_create into this deployment's database and storage, both empty "
        "(a non-empty one is refused). Run `manage.py verify_audit_log` afterwards."
    )

    def add_arguments(self, parser):
        parser.add_argument("source", type=Path, help="the backup's folder (manifest.json and the .age files)")
        parser.add_argument("--identity", type=Path, required=True, help="the age identity (private key) file")
        parser.add_argument(
            "--operator",
            default="",
            help="who runs it (a name or staff id, never a patient identifier), recorded in the access log "
            "with the OS user (SUDO_USER where set); default: the OS user alone",
        )

    def handle(self, *args, source: Path, identity: Path, operator: str, **options):
        try:
            manifest = backup_restore(source=source, identity=identity, operator=operator)
        except BackupError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            self.style.SUCCESS(f"Restored backup {manifest.backup_id}: the database and {manifest.objects} objects.")
        )
