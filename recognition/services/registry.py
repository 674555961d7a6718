"""The model registry: register immutable versions, move aliases, load for inference."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from accounts.services import access_event_record
from config.errors import Invalid
from workers.engine.cache import HandlerCache
from workers.engine.package import PackageError, read_manifest

if TYPE_CHECKING:
    from workers.engine.handler import Handler

from ..models import AIModel, ModelAlias, ModelPin, ModelVersion, TrafficSplit
from ..storage import model_package_key

_handlers = HandlerCache(budget_bytes=settings.SIGHTLINE_MODEL_CACHE_MB * 1024 * 1024)


def model_version_register(
    *, package_path: Path, registered_by=None, alias: str | None = ModelAlias.Name.PRODUCTION
) -> tuple[ModelVersion, bool]:
    """Register a package after loading it and running a dummy batch. Returns (version, created).

    Registering the same bytes again changes nothing; different bytes under an existing
    version number are refused, since versions are immutable.
    """
    import torch  # registration loads the model once; only then is torch needed in this process

    from workers.engine.handler import Handler

    try:
        manifest = read_manifest(package_path)
        Handler.initialize(package_path, manifest.weights_sha256, device=torch.device("cpu"))
    except PackageError as exc:
        raise Invalid(f"The model package was refused: {exc}", code="model_refused") from exc

    existing = ModelVersion.objects.filter(model__name=manifest.name, version=manifest.version).first()
    if existing is not None:
        if existing.weights_sha256 != manifest.weights_sha256:
            raise Invalid(
                f"{manifest.name} {manifest.version} is already registered with other weights; "
                "versions are immutable, register a new version number.",
                code="version_exists",
            )
        return existing, False

    package_sha256 = _file_sha256(package_path)
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
            )
            access_event_record(
                action="model.register", user=registered_by, target_type="model_version", target_id=version.pk
            )
            if alias:
                model_alias_move(model=model, alias=alias, version=version, moved_by=registered_by)
    except BaseException:
        if stored_here:
            default_storage.delete(stored_name)
        raise
    return version, True


def _version_of(model: AIModel, version: ModelVersion) -> None:
    if version.model_id != model.pk:
        raise Invalid(f"{version} is not a version of {model.name}.", code="wrong_model")


def model_alias_move(*, model: AIModel, alias: str, version: ModelVersion, moved_by=None, request=None) -> ModelAlias:
    if alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    _version_of(model, version)
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

    device = choose_device(settings.SIGHTLINE_INFERENCE_DEVICE)
    return _handlers.get(
        f"{version.package_sha256 or version.pk}:{version.weights_sha256}:{device}",
        lambda: Handler.initialize(
            _local_package(version),
            version.weights_sha256,
            device=device,
            expected_manifest=version.manifest,
            compile_for=_compile_batch_sizes(version),
        ),
    )


def loaded_models() -> tuple[list[str], str]:
    """(weights checksums of the models this process holds, its device), for the heartbeat."""
    from workers.engine.handler import choose_device

    weights = [key.split(":")[1] for key in _handlers.keys()]  # noqa: SIM118  (a method, not a dict)
    return weights, str(choose_device(settings.SIGHTLINE_INFERENCE_DEVICE))
