"""Make an optimised version of a registered model and register it:

manage.py optimise_model sightline-demo 1.0.0 --to onnx-int8
manage.py optimise_model NAME 1.2.0 --to onnx-int8 --calibration DIR --holdout DIR/labels.csv
manage.py optimise_model NAME 1.2.0 --to onnx-fp32 --holdout DIR/labels.csv --no-wait

The new version (``1.0.0+onnx-int8``) is exported (torch.onnx) and, for int8, quantised
(onnxruntime static QDQ, per channel) here, in the operator's shell, calibrated on ``--calibration``'s
images or, for the demo model, the demo generator's. It is registered like any package
(``model_version_submit``): a worker runs the registration checks and measures it against its
parent on the held-out set (``--holdout``: a ``filename,label`` CSV beside its images, carried
inside the package so that any worker can read it; the demo generator's for the demo model).
The command waits for the worker's numbers and prints them, unless ``--no-wait``.
"""

import json
import tempfile
from pathlib import Path

import torch
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.errors import DomainError
from core.model_package import PackageError
from recognition.models import ModelVersion
from recognition.services.registry import derived_below_floor, model_version_submit
from workers.engine import optimise
from workers.engine.handler import Handler, configure_cpu_threads
from workers.management.commands.register_model import version_wait
from workers.model_cache import local_package
from workers.registration import model_version_validate

_HINT = "Its numbers appear on its admin page once measured."
VERDICT_TIMEOUT_SECONDS = 900.0  # a worker loads both versions, checks and measures them: minutes on a CPU
_MB = 1e6


class Command(BaseCommand):
    help = "Make an optimised (ONNX fp32 or int8) version of a registered model and register it."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("version")
        parser.add_argument("--to", dest="transform", choices=optimise.TRANSFORMS, required=True)
        parser.add_argument("--calibration", type=Path, help="a folder of images to calibrate int8 on")
        parser.add_argument(
            "--calibration-images", type=int, default=optimise.DEFAULT_CALIBRATION_IMAGES, help="at most this many"
        )
        parser.add_argument("--holdout", type=Path, help="a filename,label CSV; its images beside it")
        parser.add_argument("--no-wait", action="store_true", help="submit and return; the worker measures later")
        parser.add_argument(
            "--validate-here",
            action="store_true",
            help="run the registration checks and the measurement in this process (no worker running)",
        )
        parser.add_argument("--timeout", type=float, default=VERDICT_TIMEOUT_SECONDS)

    def handle(self, *args, model, version, transform, calibration, calibration_images, holdout, **options):
        parent = ModelVersion.objects.select_related("model").filter(model__name=model, version=version).first()
        if parent is None:
            raise CommandError(f"{model} has no version {version!r}")
        if parent.status != ModelVersion.Status.READY:
            raise CommandError(f"{parent} is {parent.status}: only a ready version can be optimised")
        if holdout is not None and not holdout.is_file():
            raise CommandError(f"{holdout} is not a labels CSV")
        made = ModelVersion.objects.filter(
            model=parent.model, version=optimise.derived_version(parent.version, transform)
        ).first()
        if made is not None:  # versions are immutable, and a second export's bytes would differ
            self.stdout.write(f"Already made: {made.label} ({made.status})")
            self._report(parent, made if options["no_wait"] else version_wait(made, options["timeout"], hint=_HINT))
            return
        demo = parent.model.is_demo and parent.manifest.get("demo", False)
        if holdout is None and not demo:
            raise CommandError("--holdout CSV is needed: the worker measures the new version against this one on it")
        configure_cpu_threads()
        try:
            handler = Handler.initialize(
                local_package(parent),
                parent.weights_sha256,
                device=torch.device("cpu"),
                expected_manifest=parent.manifest,
                allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
            )
            images = None
            if transform == "onnx-int8":
                if calibration is not None:
                    images = optimise.folder_images(handler, calibration, calibration_images)
                elif demo:
                    images, _ = optimise.demo_images(
                        optimise.DEMO_CALIBRATION_SEED, calibration_images, handler.manifest.input_size
                    )
                else:
                    raise CommandError("--calibration DIR is needed: int8 is calibrated on images like the model's")
            with tempfile.TemporaryDirectory(prefix="sightline-optimise-") as folder:
                derived = optimise.optimise(
                    handler, Path(folder) / "package.zip", transform=transform, calibration=images, holdout=holdout
                )
                self.stdout.write(
                    f"Made {derived.manifest.version} in {derived.seconds:.1f} s "
                    f"({derived.graph_bytes / _MB:.1f} MB model.onnx); registering it…"
                )
                row, _ = model_version_submit(
                    package_path=derived.path, registered_by=None, enqueue=not options["validate_here"]
                )
        except PackageError as exc:
            raise CommandError(str(exc)) from exc
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"Stored {row.label} ({row.status})")
        if options["validate_here"] and row.status == ModelVersion.Status.VALIDATING:
            row = model_version_validate(version_id=row.pk)
        elif options["no_wait"]:
            self.stdout.write(
                "Not waiting: the worker's numbers appear on its admin page and in `manage.py model list`."
            )
            return
        else:
            row = version_wait(row, options["timeout"], hint=_HINT)
        self._report(parent, row)

    def _report(self, parent: ModelVersion, row: ModelVersion) -> None:
        if row.status == ModelVersion.Status.REFUSED:
            raise CommandError(f"Refused {row}: {row.refusal_reason}")
        if row.status == ModelVersion.Status.VALIDATING:
            self.stdout.write("Still validating: its numbers appear on its admin page once a worker measured it.")
            return
        self.stdout.write(self.style.SUCCESS(f"Registered {row.label} (ready), derived from {parent.label}"))
        self.stdout.write(json.dumps(row.evaluation, indent=2))
        below = derived_below_floor(row)
        if below:
            self.stdout.write(self.style.WARNING(f"{below}: production needs --force."))
