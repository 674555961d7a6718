"""The model registry: register immutable versions, move aliases, load for inference."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.services import access_event_record
from config.errors import Conflict, Invalid
from core.model_package import TORCHSCRIPT_REFUSED, PackageError, read_manifest
from core.transient import is_transient
from workers.engine.cache import HandlerCache

if TYPE_CHECKING:
    from workers.engine.handler import Handler

from ..models import AIModel, ModelAlias, ModelPin, ModelVersion, TrafficSplit
from ..storage import model_package_key

logger = logging.getLogger(__name__)
_handlers = HandlerCache(budget_bytes=settings.SIGHTLINE_MODEL_CACHE_MB * 1024 * 1024)


def model_version_submit(
    *, package_path: Path, registered_by=None, alias: str | None = None, enqueue: bool = True
) -> tuple[ModelVersion, bool]:
    """Store a package and create its version ``validating``; a worker runs the registration
    checks (``model_version_validate``, after commit) and makes it ready or refused. Nothing
    here loads the model: this runs in the web process. Returns (version, created).

    Registering the same bytes again changes nothing (a refused version is checked again, for
    a setting may have changed); other bytes under an existing version number are refused,
    since versions are immutable. ``alias`` moves to the version once it is ready.
    """
    if alias and alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    try:
        manifest = read_manifest(package_path)
    except PackageError as exc:
        raise Invalid(f"The model package was refused: {exc}", code="model_refused") from exc
    package_sha256 = _file_sha256(package_path)

    existing = ModelVersion.objects.filter(model__name=manifest.name, version=manifest.version).first()
    if existing is not None:
        if existing.weights_sha256 != manifest.weights_sha256 or (
            existing.package_sha256 and existing.package_sha256 != package_sha256
        ):
            raise Invalid(
                f"{manifest.name} {manifest.version} is already registered with other contents; "
                "versions are immutable, register a new version number.",
                code="version_exists",
            )
        if existing.status == ModelVersion.Status.REFUSED:
            _validate_again(existing, registered_by=registered_by, alias=alias, enqueue=enqueue)
        elif existing.status == ModelVersion.Status.VALIDATING and enqueue:
            # its first message may have been lost (a broker outage): ask again; the checks
            # decide once, whichever task runs them first
            transaction.on_commit(lambda: _enqueue_validation(existing.pk), robust=True)
        return existing, False

    # named by the whole package's checksum: the same bytes are stored once, however often
    # a registration is retried or rolled back
    stored_name = model_package_key(name=manifest.name, version=manifest.version, sha256=package_sha256)
    stored_here = not default_storage.exists(stored_name)
    if stored_here:
        with open(package_path, "rb") as handle:
            stored_name = default_storage.save(stored_name, File(handle))
    try:
        with transaction.atomic():
            model, _ = AIModel.objects.get_or_create(
                name=manifest.name, defaults={"description": manifest.description, "is_demo": manifest.demo}
            )
            version = ModelVersion.objects.create(
                model=model,
                version=manifest.version,
                manifest=manifest.to_dict(),
                package=stored_name,
                weights_sha256=manifest.weights_sha256,
                package_sha256=package_sha256,
                registered_by=registered_by,
                status=ModelVersion.Status.VALIDATING,
                requested_alias=alias or "",
            )
            access_event_record(
                action="model.register", user=registered_by, target_type="model_version", target_id=version.pk
            )
            if enqueue:
                transaction.on_commit(lambda: _enqueue_validation(version.pk), robust=True)
    except BaseException:
        if stored_here:
            default_storage.delete(stored_name)
        raise
    return version, True


def _validate_again(version: ModelVersion, *, registered_by, alias: str | None, enqueue: bool) -> None:
    with transaction.atomic():
        updated = ModelVersion.objects.filter(pk=version.pk, status=ModelVersion.Status.REFUSED).update(
            status=ModelVersion.Status.VALIDATING, refusal_reason="", validated_at=None, requested_alias=alias or ""
        )
        if updated:
            access_event_record(
                action="model.revalidate", user=registered_by, target_type="model_version", target_id=version.pk
            )
            if enqueue:
                transaction.on_commit(lambda: _enqueue_validation(version.pk), robust=True)
    version.refresh_from_db()


def _enqueue_validation(version_id: int) -> None:
    from core.transient import is_transient
    from workers.tasks import model_validate  # the task module imports this one

    try:
        model_validate.delay(version_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # the version stays validating; registering the same package again, or
        # `register_model --validate-here`, runs the checks
        logger.warning("broker unavailable; model version %s waits for its checks", version_id)


def model_version_register(
    *, package_path: Path, registered_by=None, alias: str | None = ModelAlias.Name.PRODUCTION
) -> tuple[ModelVersion, bool]:
    """Submit and validate in this process, for shell tools and tests (never the web process):
    the synchronous path of the same service. Returns (version, created); a refused package
    raises ``Invalid`` with the reason, and its version stays recorded as refused."""
    version, created = model_version_submit(
        package_path=package_path, registered_by=registered_by, alias=alias, enqueue=False
    )
    if version.status == ModelVersion.Status.VALIDATING:
        version = model_version_validate(version_id=version.pk)
    if version.status == ModelVersion.Status.REFUSED:
        raise Invalid(f"The model package was refused: {version.refusal_reason}", code="model_refused")
    return version, created


# --- registration checks -------------------------------------------------------------------------


class Refused(Exception):
    """A registration check says no; the message is the reason, in words."""


@dataclass
class Candidate:
    """What the registration checks look at: the version row, its package as a local file
    (fetched from storage and checked against the registered checksum), and the model loaded
    on the CPU by the check that loads it, for the checks after it."""

    version: ModelVersion
    package: Path | None = None
    handler: Handler | None = None


def check_framework_allowed(candidate: Candidate) -> None:
    if candidate.version.manifest.get("framework") == "torchscript" and not settings.SIGHTLINE_ALLOW_TORCHSCRIPT:
        raise Refused(TORCHSCRIPT_REFUSED)


def check_stored_package(candidate: Candidate) -> None:
    """The stored bytes are the ones registered (the whole package's sha256)."""
    candidate.package = _local_package(candidate.version)


def check_loads_and_answers(candidate: Candidate) -> None:
    """The weights match their checksum, fit the architecture, the manifest is the registered
    one, and a dummy batch answers one output per label."""
    import torch  # the worker's; the web process never gets here

    from workers.engine.handler import Handler

    candidate.handler = Handler.initialize(
        candidate.package,
        candidate.version.weights_sha256,
        device=torch.device("cpu"),
        expected_manifest=candidate.version.manifest,
        allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
    )


# In order; each raises Refused or PackageError to refuse, a transient error to be tried again.
# Later checks (agreement across backends, derived-version measurements, screening models)
# are appended here and find the loaded model on ``candidate.handler``.
REGISTRATION_CHECKS: list[Callable[[Candidate], None]] = [
    check_framework_allowed,
    check_stored_package,
    check_loads_and_answers,
]


def model_version_validate(*, version_id: int) -> ModelVersion:
    """Run the registration checks on a validating version: ready (and its requested alias
    moved) or refused with the reason. A version already decided is returned as it is, so a
    redelivered task changes nothing. Transient errors (storage away) are raised, for the task
    to try again; any other error refuses the version, in words."""
    version = ModelVersion.objects.select_related("model", "registered_by").get(pk=version_id)
    if version.status != ModelVersion.Status.VALIDATING:
        return version
    candidate = Candidate(version=version)
    for check in REGISTRATION_CHECKS:
        try:
            check(candidate)
        except (Refused, PackageError) as exc:
            return _decide(version, refusal=str(exc))
        except Exception as exc:
            if is_transient(exc):
                raise
            logger.exception("registration check %s failed on %s", check.__name__, version)
            return _decide(version, refusal=f"the check {check.__name__} failed unexpectedly ({type(exc).__name__})")
    return _decide(version, refusal="")


def model_version_reconcile() -> int:
    """Periodic (Celery beat): a version still validating after
    ``SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS`` lost its task (Redis keeps nothing, a worker
    died mid-check): send it again. The checks decide once, whichever task runs them first."""
    before = timezone.now() - timedelta(seconds=settings.SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS)
    stalled = list(
        ModelVersion.objects.filter(status=ModelVersion.Status.VALIDATING, created__lt=before).values_list(
            "pk", flat=True
        )
    )
    for version_id in stalled:
        _enqueue_validation(version_id)
    return len(stalled)


def model_version_give_up(*, version_id: int, reason: str) -> ModelVersion:
    """The checks could not run (storage away on every attempt): refused, saying so."""
    version = ModelVersion.objects.select_related("model", "registered_by").get(pk=version_id)
    if version.status != ModelVersion.Status.VALIDATING:
        return version
    return _decide(version, refusal=f"the registration checks could not run: {reason}")


def _decide(version: ModelVersion, *, refusal: str) -> ModelVersion:
    status = ModelVersion.Status.REFUSED if refusal else ModelVersion.Status.READY
    with transaction.atomic():
        updated = ModelVersion.objects.filter(pk=version.pk, status=ModelVersion.Status.VALIDATING).update(
            status=status, refusal_reason=refusal[:2000], validated_at=timezone.now()
        )
        if updated:
            access_event_record(
                action="model.ready" if status == ModelVersion.Status.READY else "model.refused",
                user=version.registered_by,
                target_type="model_version",
                target_id=version.pk,
            )
            version.refresh_from_db()
            if status == ModelVersion.Status.READY and version.requested_alias:
                model_alias_move(
                    model=version.model, alias=version.requested_alias, version=version, moved_by=version.registered_by
                )
    if updated:
        logger.info("model version %s is %s%s", version, status, f": {refusal}" if refusal else "")
    version.refresh_from_db()
    return version


def model_version_require_ready(*, version: ModelVersion | None) -> None:
    """Aliases, splits and pins point only at versions that passed the registration checks."""
    if version is not None and version.status != ModelVersion.Status.READY:
        reason = f" ({version.refusal_reason})" if version.refusal_reason else ""
        raise Conflict(
            f"{version} is {version.status}{reason}: only a version that passed the registration checks "
            "can be given an alias, a split or a pin.",
            code="model_not_ready",
        )


def _version_of(model: AIModel, version: ModelVersion) -> None:
    if version.model_id != model.pk:
        raise Invalid(f"{version} is not a version of {model.name}.", code="wrong_model")


def model_alias_move(*, model: AIModel, alias: str, version: ModelVersion, moved_by=None, request=None) -> ModelAlias:
    if alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    _version_of(model, version)
    model_version_require_ready(version=version)
    with transaction.atomic():
        row, _ = ModelAlias.objects.update_or_create(
            model=model, name=alias, defaults={"version": version, "updated": timezone.now()}
        )
        access_event_record(
            action="model.alias_move", request=request, user=moved_by, target_type="model_alias", target_id=row.pk
        )
    return row


def traffic_split_set(
    *, tenant, model: AIModel, version: ModelVersion | None, percent: int, changed_by=None, request=None
) -> TrafficSplit | None:
    """Send ``percent`` of the hospital's images to ``version``; 0 (or no version) ends the split."""
    with transaction.atomic():
        current = TrafficSplit.objects.for_tenant(tenant).filter(model=model).first()
        if not percent or version is None:
            if current is not None:
                current.delete()
            split = None
        else:
            if not 1 <= percent <= 99:
                raise Invalid("A split sends 1-99% of images to the other version.", code="bad_percent")
            _version_of(model, version)
            model_version_require_ready(version=version)
            split, _ = TrafficSplit.objects.update_or_create(
                tenant=tenant,
                model=model,
                defaults={"version": version, "percent": percent, "updated": timezone.now(), "updated_by": changed_by},
            )
        access_event_record(
            action="model.split_change",
            request=request,
            user=changed_by,
            tenant=tenant,
            target_type="model",
            target_id=model.pk,
        )
    return split


def model_pin_set(*, tenant, model: AIModel, version: ModelVersion | None, changed_by=None, request=None):
    """Keep the hospital on ``version`` whatever the aliases say; None removes the pin."""
    with transaction.atomic():
        if version is None:
            ModelPin.objects.for_tenant(tenant).filter(model=model).delete()
            pin = None
        else:
            _version_of(model, version)
            model_version_require_ready(version=version)
            pin, _ = ModelPin.objects.update_or_create(
                tenant=tenant,
                model=model,
                defaults={"version": version, "updated": timezone.now(), "updated_by": changed_by},
            )
        access_event_record(
            action="model.pin_change",
            request=request,
            user=changed_by,
            tenant=tenant,
            target_type="model",
            target_id=model.pk,
        )
    return pin


def model_version_list() -> QuerySet[ModelVersion]:
    """Every registered version, newest first, with its status (platform-wide, not tenant data).
    Kept beside the registry's writes: the registry is one small area with no selectors module
    of its own."""
    return ModelVersion.objects.select_related("model").order_by("-created", "-id")


def split_bucket(image_id: int) -> int:
    """0-99, fixed per image, so a retry of the same image lands on the same version."""
    return int(hashlib.sha256(f"sightline-split:{image_id}".encode()).hexdigest()[:8], 16) % 100


@dataclass(frozen=True)
class Routing:
    """Which version reads a hospital's images: read once per upload, asked per image."""

    pin: ModelVersion | None
    split: TrafficSplit | None
    production: ModelVersion | None

    def version_for(self, image_id: int | None) -> ModelVersion | None:
        """Pin, else split (when there is an image to place), else the production alias."""
        if self.pin is not None:
            return self.pin
        if self.split is not None and image_id is not None and split_bucket(image_id) < self.split.percent:
            return self.split.version
        return self.production


def model_routing(*, tenant, model_name: str) -> Routing:
    pin = ModelPin.objects.for_tenant(tenant).select_related("version").filter(model__name=model_name).first()
    split = TrafficSplit.objects.for_tenant(tenant).select_related("version").filter(model__name=model_name).first()
    alias = (
        ModelAlias.objects.select_related("version__model")
        .filter(model__name=model_name, name=ModelAlias.Name.PRODUCTION)
        .first()
    )
    return Routing(pin.version if pin else None, split, alias.version if alias else None)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_package(version: ModelVersion) -> Path:
    """The package as a local file, copied once from storage (which may be S3) and named by the
    checksum of the whole package, so a cached copy can only be the registered bytes."""
    cache_dir = Path(settings.SIGHTLINE_MODEL_CACHE_DIR)
    path = cache_dir / f"{version.package_sha256 or f'v{version.pk}-{version.weights_sha256}'}.zip"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with (
            version.package.open("rb") as source,
            tempfile.NamedTemporaryFile(dir=cache_dir, delete=False, suffix=".part") as target,
        ):
            shutil.copyfileobj(source, target)
        copied = Path(target.name)
        if version.package_sha256 and _file_sha256(copied) != version.package_sha256:
            copied.unlink()
            raise PackageError(f"the stored package of {version} differs from the one registered; the model is refused")
        copied.replace(path)
    return path


def _compile_batch_sizes(version: ModelVersion) -> tuple[int, ...]:
    """With SIGHTLINE_TORCH_COMPILE: a lone request, a pair and a full batch are compiled at load."""
    if not settings.SIGHTLINE_TORCH_COMPILE:
        return ()
    largest = version.manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE
    return tuple(sorted({1, min(2, largest), largest}))


def model_handler(version: ModelVersion) -> Handler:
    """The loaded model for a version; the checksum recorded at registration is enforced."""
    from workers.engine.handler import Handler, choose_device

    if version.status != ModelVersion.Status.READY:
        raise PackageError(f"{version} is {version.status}, not ready: it did not pass the registration checks")
    device = choose_device(settings.SIGHTLINE_INFERENCE_DEVICE)
    return _handlers.get(
        f"{version.package_sha256 or version.pk}:{version.weights_sha256}:{device}",
        lambda: Handler.initialize(
            _local_package(version),
            version.weights_sha256,
            device=device,
            expected_manifest=version.manifest,
            compile_for=_compile_batch_sizes(version),
            allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
        ),
    )


def loaded_models() -> tuple[list[str], str]:
    """(weights checksums of the models this process holds, its device), for the heartbeat."""
    from workers.engine.handler import choose_device

    weights = [key.split(":")[1] for key in _handlers.keys()]  # noqa: SIM118  (a method, not a dict)
    return weights, str(choose_device(settings.SIGHTLINE_INFERENCE_DEVICE))
