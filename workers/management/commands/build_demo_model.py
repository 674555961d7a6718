from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.errors import DomainError
from recognition.models import ModelVersion
from workers.engine import training
from workers.registration import model_version_register


class Command(BaseCommand):
    help = "Train the demo model on generated images (CPU, under a minute) and register it as production."

    def add_arguments(self, parser):
        parser.add_argument("--output", type=Path, help="where to write the package (default: var/models/)")
        parser.add_argument("--force", action="store_true", help="train again even if a package exists")

    def handle(self, *args, output=None, force=False, **options):
        output = output or Path(settings.SIGHTLINE_MODEL_BUILD_DIR) / (
            f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip"
        )
        registered = ModelVersion.objects.filter(model__name=training.DEMO_NAME, version=training.DEMO_VERSION).exists()
        if registered and not force:
            self.stdout.write(f"{training.DEMO_NAME} {training.DEMO_VERSION} is already registered.")
            return
        if force or not output.exists():
            self.stdout.write("Training the demo model on generated images (DEMO ONLY, not for diagnosis)…")
            report = training.train_demo_model(output)
            self.stdout.write(
                f"Held-out accuracy {report.accuracy:.1%} on {report.held_out_images} generated images; "
                f"trained on {report.train_images} in {report.seconds:.1f} s."
            )
            if report.accuracy < training.REQUIRED_ACCURACY:
                output.unlink(missing_ok=True)
                raise CommandError(
                    f"accuracy {report.accuracy:.1%} is below {training.REQUIRED_ACCURACY:.0%}; not registered"
                )
        try:
            version, created = model_version_register(package_path=output)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        state = "Registered" if created else "Already registered:"
        self.stdout.write(self.style.SUCCESS(f"{state} {version} as production ({output})."))
