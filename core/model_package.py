"""The model package format: a zip holding ``manifest.json`` and ``weights.pt`` (a state_dict).

Shared by the web process (registration reads the manifest) and the engine (which loads the
weights, in ``workers/engine/package.py``); standard library only, so neither drags the other in.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
FRAMEWORKS = ("torchvision", "torchscript")
TASKS = ("single-label", "multi-label")
MAX_MANIFEST_BYTES = 64 * 1024
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024


class PackageError(ValueError):
    """The package is malformed, or its weights are not the ones that were registered."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...]
    weights_sha256: str
    task: str = "single-label"
    framework: str = "torchvision"
    description: str = ""
    demo: bool = False
    metrics: dict = field(default_factory=dict)
    thresholds: tuple[float, ...] = ()  # multi-label: one per label (default 0.5)
    gradcam_layer: str = ""  # a CNN layer to explain with Grad-CAM, e.g. "layer4"
    max_batch_size: int | None = None  # batching limits for this version; None: the worker's default
    max_wait_ms: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        try:
            manifest = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                architecture=str(data["architecture"]),
                input_size=int(data["input_size"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                labels=tuple(str(v) for v in data["labels"]),
                weights_sha256=str(data["weights_sha256"]).lower(),
                task=str(data.get("task", "single-label")),
                framework=str(data.get("framework", "torchvision")),
                description=str(data.get("description", "")),
                demo=bool(data.get("demo", False)),
                metrics=dict(data.get("metrics", {})),
                thresholds=tuple(float(v) for v in data.get("thresholds", ())),
                gradcam_layer=str(data.get("gradcam_layer", "")),
                max_batch_size=int(data["max_batch_size"]) if data.get("max_batch_size") else None,
                max_wait_ms=float(data["max_wait_ms"]) if data.get("max_wait_ms") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"manifest.json is incomplete or malformed: {exc}") from exc
        if manifest.framework not in FRAMEWORKS:
            raise PackageError(f"framework {manifest.framework!r} is not supported")
        if manifest.task not in TASKS:
            raise PackageError(f"task {manifest.task!r} is not supported")
        if len(manifest.mean) != 3 or len(manifest.std) != 3 or min(manifest.std) <= 0:
            raise PackageError("mean and std need three values each, std above zero")
        if len(manifest.labels) < 2 or not 16 <= manifest.input_size <= 1024:
            raise PackageError("a model needs at least two labels and an input size of 16-1024")
        if manifest.thresholds and (
            len(manifest.thresholds) != len(manifest.labels) or not all(0 < t < 1 for t in manifest.thresholds)
        ):
            raise PackageError("thresholds need one value between 0 and 1 per label")
        if manifest.max_batch_size is not None and not 1 <= manifest.max_batch_size <= 1024:
            raise PackageError("max_batch_size must be 1-1024")
        return manifest

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"], data["labels"] = list(self.mean), list(self.std), list(self.labels)
        data["thresholds"] = list(self.thresholds)
        return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError as exc:
        raise PackageError(f"the package has no {name}") from exc
    if info.file_size > limit:
        raise PackageError(f"{name} is larger than {limit} bytes")
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except zipfile.BadZipFile as exc:  # CRC mismatch: the bytes changed after packing
        raise PackageError(f"{name} is damaged: {exc}") from exc
    if len(data) > limit:
        raise PackageError(f"{name} is larger than {limit} bytes")
    return data


def read_manifest(path: Path) -> Manifest:
    try:
        with zipfile.ZipFile(path) as archive:
            raw = read_member(archive, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except zipfile.BadZipFile as exc:
        raise PackageError("the model package is not a zip archive") from exc
    try:
        return Manifest.from_dict(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise PackageError("manifest.json is not valid JSON") from exc


TORCHSCRIPT_REFUSED = (
    "TorchScript packages carry code as well as weights, and this platform accepts them only when "
    "SIGHTLINE_ALLOW_TORCHSCRIPT is on; package the model as a torchvision architecture and a state_dict"
)


def file_sha256(path: Path) -> str:
    """The sha256 of a whole file (a package), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
