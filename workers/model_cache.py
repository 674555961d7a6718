"""The models this worker process holds: a version's package fetched once from storage and
checked against its registered checksum, loaded once, kept within a memory budget."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.conf import settings

from core.model_package import PackageError, file_sha256
from recognition.models import ModelVersion
from workers.engine.cache import HandlerCache
from workers.engine.handler import Handler, choose_device

_handlers = HandlerCache(budget_bytes=settings.SIGHTLINE_MODEL_CACHE_MB * 1024 * 1024)


def local_package(version: ModelVersion) -> Path:
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
        if version.package_sha256 and file_sha256(copied) != version.package_sha256:
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
    if version.status != ModelVersion.Status.READY:
        raise PackageError(f"{version} is {version.status}, not ready: it did not pass the registration checks")
    device = choose_device(settings.SIGHTLINE_INFERENCE_DEVICE)
    return _handlers.get(
        f"{version.package_sha256 or version.pk}:{version.weights_sha256}:{device}",
        lambda: Handler.initialize(
            local_package(version),
            version.weights_sha256,
            device=device,
            expected_manifest=version.manifest,
            compile_for=_compile_batch_sizes(version),
            allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
            backend=settings.SIGHTLINE_INFERENCE_BACKEND,
            background=True,  # eager serves while the backends are measured; the worker is ready at once
        ),
    )


def model_cache_clear() -> None:
    """Forget every loaded model (tests; a worker that must fetch its packages again)."""
    _handlers.clear()


def loaded_models() -> tuple[list[str], str]:
    """(weights checksums of the models this process holds, its device), for the heartbeat."""
    weights = [key.split(":")[1] for key in _handlers.keys()]  # noqa: SIM118  (a method, not a dict)
    return weights, str(choose_device(settings.SIGHTLINE_INFERENCE_DEVICE))
