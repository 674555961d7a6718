"""Register a model package: stored, then checked by a worker; this command waits and prints
the outcome (ready, or refused and why).

``--validate-here`` runs the same checks in this process instead of a worker's. It is for a
deployment with no worker running yet (the first model of a fresh install, CI); this is a
platform operator's shell, never the web process, so loading the model here costs nothing a
hospital's request waits for. Without it, the command needs a worker consuming the
``maintenance`` queue, like the admin page's registration.

A screening package (manifest ``role: screening``) runs in readers' browsers, so its weights
are downloaded by every reader's computer: ``--browser-distribution-allowed`` is the operator's
confirmation that its licence allows that; without it the package is refused.
"""

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from core.errors import DomainError
from recognition.models import ModelAlias, ModelVersion
from recognition.services.registry import model_version_submit
from workers.registration import model_version_validate

POLL_SECONDS = 0.5
VERDICT_TIMEOUT_SECONDS = 600.0  # a worker loads, exports and checks the model: minutes on a CPU


class Command(BaseCommand):
    help = "Register a model package (zip with manifest.json and weights.pt). Platform staff only."

    def add_arguments(self, parser):
        parser.add_argument("package", type=Path)
        parser.add_argument(
            "--alias",
            choices=[*ModelAlias.Name.values, "none"],
            default="none",
            help="move this alias to it once it is ready",
        )
        parser.add_argument(
            "--validate-here",
            action="store_true",
            help="run the registration checks in this process instead of a worker (no worker running yet)",
        )
        parser.add_argument(
            "--browser-distribution-allowed",
            action="store_true",
            help="a screening model: I confirm its licence allows shipping its weights to readers' browsers",
        )
        parser.add_argument(
            "--timeout", type=float, default=VERDICT_TIMEOUT_SECONDS, help="seconds to wait for a worker's verdict"
        )

    def handle(
        self,
        *args,
        package: Path,
        alias: str,
        validate_here: bool,
        timeout: float,
        browser_distribution_allowed: bool = False,
        **options,
    ):
        if not package.is_file():
            raise CommandError(f"{package} is not a file")
        try:
            version, created = model_version_submit(
                package_path=package,
                alias=None if alias == "none" else alias,
                enqueue=not validate_here,
                browser_distribution_allowed=browser_distribution_allowed,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        if not created and version.status == ModelVersion.Status.READY:
            self.stdout.write(self.style.SUCCESS(f"Already registered: {version} (ready)"))
            return
        self.stdout.write(f"Stored {version}; checking it{' here' if validate_here else ' on a worker'}…")
        version = (
            model_version_validate(version_id=version.pk)
            if validate_here
            else version_wait(version, timeout, hint=_HINT)
        )
        if version.status == ModelVersion.Status.REFUSED:
            raise CommandError(f"Refused {version}: {version.refusal_reason}")
        self.stdout.write(self.style.SUCCESS(f"Registered {version} (ready)"))


_HINT = "Its status shows on the admin page and in `manage.py model list`; or run this again with --validate-here."


def version_wait(version: ModelVersion, timeout: float, *, hint: str) -> ModelVersion:
    """Poll until a worker has decided on ``version`` (ready or refused); past ``timeout``, a
    CommandError that asks whether a worker consumes the maintenance queue, then ``hint``."""
    deadline = time.monotonic() + timeout
    while version.status == ModelVersion.Status.VALIDATING:
        if time.monotonic() > deadline:
            raise CommandError(
                f"{version} is still validating after {timeout:.0f} s: is a worker consuming the maintenance "
                f"queue? {hint}"
            )
        time.sleep(POLL_SECONDS)
        version.refresh_from_db()
    return version
