from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from config.errors import DomainError
from recognition.models import ModelAlias
from recognition.services.registry import model_version_register


class Command(BaseCommand):
    help = "Register a model package (zip with manifest.json and weights.pt). Platform staff only."

    def add_arguments(self, parser):
        parser.add_argument("package", type=Path)
        parser.add_argument(
            "--alias", choices=[*ModelAlias.Name.values, "none"], default="none", help="move this alias to it"
        )

    def handle(self, *args, package: Path, alias: str, **options):
        if not package.is_file():
            raise CommandError(f"{package} is not a file")
        try:
            version, created = model_version_register(package_path=package, alias=None if alias == "none" else alias)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(self.style.SUCCESS(f"{'Registered' if created else 'Already registered:'} {version}"))
