"""Model packages on the engine's side: write one (training, the bench) and load its weights.

Weights are read with ``torch.load(weights_only=True)``, never unpickled, and their sha256
must match both the manifest and the checksum the registry recorded when the version was
registered: a package whose bytes changed since registration is refused. The format itself
(manifest fields, limits, reading the manifest) is ``core.model_package``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from core.model_package import (
    MANIFEST_NAME,
    MAX_WEIGHTS_BYTES,
    SHORT_HASH_CHARS,
    TORCHSCRIPT_REFUSED,
    WEIGHTS_NAME,
    Manifest,
    PackageError,
    read_manifest,
    read_member,
    sha256_bytes,
)

if TYPE_CHECKING:
    import torch


def write_package(path: Path, state_dict: dict, **manifest_fields) -> Manifest:
    import torch

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    weights = buffer.getvalue()
    manifest = Manifest.from_dict({**manifest_fields, "weights_sha256": sha256_bytes(weights)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2))
        archive.writestr(WEIGHTS_NAME, weights)
    tmp.replace(path)
    return manifest


def read_weights(
    path: Path, expected_sha256: str, *, allow_torchscript: bool = False
) -> tuple[Manifest, dict | torch.jit.ScriptModule]:
    """Manifest and weights (a state_dict, or a TorchScript module when ``allow_torchscript``),
    after both checksums agree with ``expected_sha256``."""
    manifest = read_manifest(path)
    if manifest.framework == "torchscript" and not allow_torchscript:
        raise PackageError(TORCHSCRIPT_REFUSED)
    try:
        with zipfile.ZipFile(path) as archive:
            weights = read_member(archive, WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
    except zipfile.BadZipFile as exc:
        raise PackageError("the model package is not a readable zip archive") from exc
    actual = sha256_bytes(weights)
    if actual != manifest.weights_sha256 or actual != expected_sha256.lower():
        raise PackageError(
            f"checksum mismatch for {manifest.name} {manifest.version}: weights are {actual[:SHORT_HASH_CHARS]}…, "
            f"registered {expected_sha256[:SHORT_HASH_CHARS]}…; the model is refused"
        )
    import torch

    if manifest.framework == "torchscript":
        try:  # TorchScript archives hold code and tensors, read by TorchScript's own loader
            return manifest, torch.jit.load(io.BytesIO(weights), map_location="cpu")
        except Exception as exc:
            raise PackageError(f"weights.pt is not a TorchScript archive: {exc}") from exc
    try:
        state_dict = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise PackageError(f"weights.pt is not a plain state_dict and was not loaded: {exc}") from exc
    if not isinstance(state_dict, dict):
        raise PackageError("weights.pt does not hold a state_dict")
    return manifest, state_dict
