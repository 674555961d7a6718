"""Train the browser screening model on generated images, package it with its ONNX graph, and
register it as ``sightline-screen`` (a model of its own: a screen, never a hospital's reads)."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.errors import DomainError
from recognition.models import ModelVersion
from workers.engine import screening
from workers.registration import model_version_register


class Command(BaseCommand):
    help = (
        "Train the demo screening model (MobileNetV3-small, CPU, about a minute), export it to ONNX and "
        "register it as sightline-screen for browsers. Platform staff only."
    )

    def add_arguments(self, parser):
        parser.add_argument("--output", type=Path, help="folder to write the package to (default: var/models/)")
        parser.add_argument("--force", action="store_true", help="train again even if a package exists")

    def handle(self, *args, output=None, force=False, **options):
        folder = output or Path(settings.SIGHTLINE_MODEL_BUILD_DIR)
        package = folder / f"{screening.SCREEN_NAME}-{screening.SCREEN_VERSION}.zip"
        registered = ModelVersion.objects.filter(
            model__name=screening.SCREEN_NAME, version=screening.SCREEN_VERSION
        ).exists()
        if registered and not force:
            self.stdout.write(f"{screening.SCREEN_NAME} {screening.SCREEN_VERSION} is already registered.")
            return
        if force or not package.exists():
            self.stdout.write("Training the screening model on generated images (DEMO ONLY, not for diagnosis)…")
            try:
                report = screening.build_screening_package(folder)
            except ValueError as exc:  # below the accuracy it must reach, or ONNX disagreeing
                raise CommandError(f"{exc}; not registered") from exc
            self.stdout.write(
                f"Held-out accuracy {report.accuracy:.1%} on {report.held_out_images} generated images, "
                f"{report.seconds:.1f} s; model.onnx {report.onnx_bytes:,} bytes, "
                f"ONNX vs PyTorch at most {report.max_onnx_diff:.1e} apart."
            )
        try:
            # the demo's own weights, trained here: the platform may ship them to browsers
            version, created = model_version_register(
                package_path=package, alias=None, browser_distribution_allowed=True
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        state = "Registered" if created else "Already registered:"
        evaluation = version.evaluation or {}
        self.stdout.write(
            self.style.SUCCESS(
                f"{state} {version} for browser screening ({package}); held-out accuracy "
                f"{evaluation.get('held_out_accuracy')}, {evaluation.get('onnx_bytes')} bytes to a browser."
            )
        )
