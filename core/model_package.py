"""The model package format: a zip holding ``manifest.json`` and ``weights.pt`` (a state_dict).

Shared by the web process (registration reads the manifest) and the engine (which loads the
weights, in ``workers/engine/package.py``); standard library only, so neither drags the other in.

Manifest fields beyond the model itself (all optional; a manifest without them loads as before,
and ``to_dict`` leaves them out while they hold their defaults, so older manifests round-trip
byte for byte):

``framework``
    What ``weights.pt`` is: ``torchvision`` (a state_dict for a stock architecture) or
    ``torchscript``. These weights are the reference: every faster way of running them is
    checked against their eager PyTorch outputs.
``runtime``
    How the engine may run the model (``workers/engine/backends.py``)::

        "runtime": {"backends": ["onnx", "compile", "eager"], "atol": 0.001, "onnx_sha256": "…"}

    ``backends``: the forward passes the package author vouches for, from ``RUNTIME_BACKENDS``:
    ``eager`` (PyTorch), ``compile`` (``torch.compile``, frozen weights), ``onnx`` (onnxruntime on
    the CPU). Listed backends are *required*: each must agree with eager PyTorch at registration
    or the version is refused; the worker picks among them only. Without the field every backend
    is a candidate and none is required: one that disagrees is simply not used.
    ``atol``: the largest difference in any probability allowed against eager PyTorch (default:
    the engine's ``AGREEMENT_ATOL``, 1e-3 on the CPU).
    ``onnx_sha256``: the package also carries ``model.onnx`` (input ``pixels``: uint8 N×3×H×W;
    output ``probabilities``: N×labels, normalisation and softmax/sigmoid inside the graph), this
    is its checksum; without it the engine exports the graph from the weights at load.
``derived_from``, ``transform`` (reserved for derived versions, e.g. quantised)
    ``derived_from``: ``{"version": "1.0.0", "weights_sha256": "…"}``, the version of the same model
    this one was made from; ``transform``: how, a short lowercase name such as ``int8-dynamic``.
    Both or neither. Transforms made here: ``onnx-fp32`` (the forward pass exported) and
    ``onnx-int8`` (that graph quantised; lossy, so measured against the parent on a held-out set
    at registration rather than held to eager PyTorch's tolerance).
``holdout`` (derived versions only)
    The path inside the package of a labels CSV (``filename,label``; images beside it, under
    the same folder) the worker measures the derived version on; empty: the demo generator's
    held-out set for a demo model, none otherwise.
``targets``
    Where the version may run: ``server`` (the workers; the default) and/or ``browser``
    (screening models run in the reader's browser), from ``TARGETS``.
``role``
    What the version is for, from ``ROLES``: ``reads`` (the default: the server's reads, the
    findings) or ``screening`` (a preliminary screen run in the reader's browser before upload;
    untrusted, never a finding). A screening version names ``browser`` among its targets, carries
    ``model.onnx`` (the graph the browser runs), and can never be routed to, aliased, split or
    pinned as the model that makes a hospital's reads.
``label_codes``
    Standard codes for the labels, where the operator supplies them, for the DICOM SR and FHIR
    the platform makes of a finding (dicomnet/objects.py, recognition/fhir.py)::

        "label_codes": {"round_opacity": {"scheme": "SCT", "value": "263716002", "meaning": "Opacity"}}

    ``scheme``: a DICOM coding scheme designator (``SCT`` SNOMED CT, ``RADLEX`` RadLex, ``LN``
    LOINC, ``DCM``, a private ``99…``); ``value`` the code, ``meaning`` its words. A label without
    one is coded in the platform's private scheme (``PRIVATE_CODING_SCHEME``) by its own name.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
ONNX_NAME = "model.onnx"
FRAMEWORKS = ("torchvision", "torchscript")
RUNTIME_BACKENDS = ("eager", "compile", "onnx")
TARGETS = ("server", "browser")
ROLES = ("reads", "screening")
ROLE_READS, ROLE_SCREENING = ROLES
SCREENING_MODEL_NAME = "sightline-screen"  # the demo's screening model: a model of its own, screening only
MAX_ATOL = 0.05  # looser than this is not "the same model" any more
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRANSFORM = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_HOLDOUT = re.compile(r"[A-Za-z0-9_-]+/[A-Za-z0-9_.-]+\.csv")
LOSSY_TRANSFORMS = ("onnx-int8",)  # measured against the parent, not held to eager's tolerance
TASKS = ("single-label", "multi-label")
MAX_MANIFEST_BYTES = 64 * 1024
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024
CHANNELS = 3  # every model takes RGB: mean and std have one value per channel
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024  # pixels a side
MAX_BATCH_SIZE_LIMIT = 1024  # the largest max_batch_size a manifest may ask for
_READ_CHUNK_BYTES = 1 << 20  # 1 MiB
SHORT_HASH_CHARS = 12  # of a sha256 shown to a person: enough to tell versions apart
PRIVATE_CODING_SCHEME = "99SIGHTLINE"  # PS3.16 8.2: a private scheme designator begins with "99"
# PS3.3 8.1: Coding Scheme Designator is SH (16 characters), Code Meaning LO (64); a Code Value
# longer than 16 (a SNOMED CT id may have 18 digits) goes to Long Code Value, up to 64 here
_CODING_SCHEME = re.compile(r"[A-Z0-9][A-Z0-9_.-]{0,15}")
CODE_VALUE_MAX, CODE_MEANING_MAX = 64, 64


class PackageError(ValueError):
    """The package is malformed, or its weights are not the ones that were registered."""


@dataclass(frozen=True)
class Runtime:
    """The manifest's ``runtime`` block; the defaults mean "no block"."""

    backends: tuple[str, ...] = ()  # required backends; () = all candidates, none required
    atol: float | None = None  # None: the engine's default tolerance
    onnx_sha256: str = ""  # "" = no model.onnx in the package

    @classmethod
    def from_dict(cls, data: object) -> Runtime:
        if not isinstance(data, dict):
            raise PackageError('runtime must be an object such as {"backends": ["onnx", "eager"]}')
        unknown = sorted(set(data) - {"backends", "atol", "onnx_sha256"})
        if unknown:
            raise PackageError(f"runtime has unknown fields {unknown}; known: backends, atol, onnx_sha256")
        backends = data.get("backends", [])
        if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
            raise PackageError("runtime.backends must be a list of backend names")
        bad = [b for b in backends if b not in RUNTIME_BACKENDS]
        if bad:
            raise PackageError(f"runtime.backends names {bad}, not among {list(RUNTIME_BACKENDS)}")
        if len(set(backends)) != len(backends):
            raise PackageError("runtime.backends names a backend twice")
        atol = data.get("atol")
        if atol is not None:
            if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 < atol <= MAX_ATOL:
                raise PackageError(f"runtime.atol must be a number above 0 and at most {MAX_ATOL}")
            atol = float(atol)
        onnx_sha256 = data.get("onnx_sha256", "")
        if not isinstance(onnx_sha256, str) or (onnx_sha256 and not _SHA256.fullmatch(onnx_sha256.lower())):
            raise PackageError(f"runtime.onnx_sha256 must be the 64 hex digits of {ONNX_NAME}'s sha256")
        return cls(backends=tuple(backends), atol=atol, onnx_sha256=onnx_sha256.lower())

    def to_dict(self) -> dict:
        data: dict = {}
        if self.backends:
            data["backends"] = list(self.backends)
        if self.atol is not None:
            data["atol"] = self.atol
        if self.onnx_sha256:
            data["onnx_sha256"] = self.onnx_sha256
        return data


def _label_codes(data: object, labels: tuple[str, ...]) -> dict:
    if data in (None, {}):
        return {}
    if not isinstance(data, dict):
        raise PackageError('label_codes must map labels to {"scheme": …, "value": …, "meaning": …}')
    codes: dict = {}
    for label, code in data.items():
        if label not in labels:
            raise PackageError(f"label_codes names {label!r}, which is not one of the labels")
        if not isinstance(code, dict) or set(code) != {"scheme", "value", "meaning"}:
            raise PackageError(f'label_codes[{label!r}] must be {{"scheme": …, "value": …, "meaning": …}}')
        scheme, value, meaning = code["scheme"], code["value"], code["meaning"]
        if not isinstance(scheme, str) or not _CODING_SCHEME.fullmatch(scheme):
            raise PackageError(
                f"label_codes[{label!r}].scheme must be a coding scheme designator such as SCT, RADLEX or 99LOCAL "
                "(capitals, digits, at most 16 characters)"
            )
        for name, text, limit in (("value", value, CODE_VALUE_MAX), ("meaning", meaning, CODE_MEANING_MAX)):
            if not isinstance(text, str) or not text.strip() or len(text) > limit or "\\" in text:
                raise PackageError(f"label_codes[{label!r}].{name} must be 1-{limit} characters (no backslash)")
        codes[label] = {"scheme": scheme, "value": value.strip(), "meaning": meaning.strip()}
    return codes


def _derived_from(data: object) -> dict:
    if data in (None, {}):
        return {}
    if not isinstance(data, dict) or set(data) != {"version", "weights_sha256"}:
        raise PackageError('derived_from must be {"version": …, "weights_sha256": …}, the version it was made from')
    version, sha = data["version"], data["weights_sha256"]
    if not isinstance(version, str) or not version or not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise PackageError("derived_from needs the parent's version and the 64 hex digits of its weights' sha256")
    return {"version": version, "weights_sha256": sha.lower()}


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
    runtime: Runtime = field(default_factory=Runtime)
    derived_from: dict = field(default_factory=dict)  # {} or {"version": …, "weights_sha256": …}
    transform: str = ""  # with derived_from: how this version was made from it
    holdout: str = ""  # a derived version's held-out labels CSV inside the package
    targets: tuple[str, ...] = ("server",)
    label_codes: dict = field(default_factory=dict)  # label → {"scheme", "value", "meaning"}; {}: none
    role: str = ROLE_READS

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
                runtime=Runtime.from_dict(data.get("runtime", {})),
                derived_from=_derived_from(data.get("derived_from")),
                transform=str(data.get("transform", "")),
                holdout=str(data.get("holdout", "")),
                targets=tuple(str(v) for v in data.get("targets", ("server",))),
                label_codes=_label_codes(data.get("label_codes"), tuple(str(v) for v in data["labels"])),
                role=str(data.get("role", ROLE_READS)),
            )
        except PackageError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"manifest.json is incomplete or malformed: {exc}") from exc
        if manifest.framework not in FRAMEWORKS:
            raise PackageError(f"framework {manifest.framework!r} is not supported")
        if manifest.task not in TASKS:
            raise PackageError(f"task {manifest.task!r} is not supported")
        if len(manifest.mean) != CHANNELS or len(manifest.std) != CHANNELS or min(manifest.std) <= 0:
            raise PackageError("mean and std need three values each, std above zero")
        if len(manifest.labels) < 2 or not MIN_INPUT_SIZE <= manifest.input_size <= MAX_INPUT_SIZE:
            raise PackageError(
                f"a model needs at least two labels and an input size of {MIN_INPUT_SIZE}-{MAX_INPUT_SIZE}"
            )
        if manifest.thresholds and (
            len(manifest.thresholds) != len(manifest.labels) or not all(0 < t < 1 for t in manifest.thresholds)
        ):
            raise PackageError("thresholds need one value between 0 and 1 per label")
        if manifest.max_batch_size is not None and not 1 <= manifest.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            raise PackageError(f"max_batch_size must be 1-{MAX_BATCH_SIZE_LIMIT}")
        if bool(manifest.derived_from) != bool(manifest.transform):
            raise PackageError("derived_from and transform go together: a derived version names both")
        if manifest.transform and not _TRANSFORM.fullmatch(manifest.transform):
            raise PackageError("transform must be a short lowercase name such as int8-dynamic")
        if manifest.holdout and (not manifest.derived_from or not _HOLDOUT.fullmatch(manifest.holdout)):
            raise PackageError("holdout names a labels CSV inside a derived package, such as holdout/labels.csv")
        if not manifest.targets or len(set(manifest.targets)) != len(manifest.targets):
            raise PackageError(f"targets must name each of {list(TARGETS)} at most once, and at least one")
        if any(t not in TARGETS for t in manifest.targets):
            raise PackageError(f"targets {list(manifest.targets)} are not among {list(TARGETS)}")
        if manifest.role not in ROLES:
            raise PackageError(f"role {manifest.role!r} is not among {list(ROLES)}")
        if manifest.role == ROLE_SCREENING and "browser" not in manifest.targets:
            raise PackageError('a screening model runs in the browser: its targets must include "browser"')
        if manifest.role == ROLE_SCREENING and manifest.task != "single-label":
            raise PackageError("a screening model is single-label: one preliminary label per image")
        if manifest.role == ROLE_SCREENING and not manifest.runtime.onnx_sha256:
            raise PackageError(
                f"a screening model carries {ONNX_NAME}, the graph the browser runs: runtime.onnx_sha256 names it"
            )
        if manifest.name == SCREENING_MODEL_NAME and manifest.role != ROLE_SCREENING:
            raise PackageError(f"{SCREENING_MODEL_NAME} is the screening model's name: its versions are screening")
        return manifest

    @property
    def screening(self) -> bool:
        return self.role == ROLE_SCREENING

    @property
    def lossy(self) -> bool:
        """A derived version whose outputs are expected to move (quantised): measured against
        its parent at registration, not against its own weights at 1e-3."""
        return self.transform in LOSSY_TRANSFORMS

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"], data["std"], data["labels"] = list(self.mean), list(self.std), list(self.labels)
        data["thresholds"] = list(self.thresholds)
        # the fields added for backends and derived versions appear only when set, so that a
        # manifest written before them round-trips unchanged
        del data["runtime"], data["derived_from"], data["transform"], data["targets"], data["holdout"]
        del data["label_codes"], data["role"]
        if runtime := self.runtime.to_dict():
            data["runtime"] = runtime
        if self.derived_from:
            data["derived_from"], data["transform"] = dict(self.derived_from), self.transform
        if self.holdout:
            data["holdout"] = self.holdout
        if self.targets != ("server",):
            data["targets"] = list(self.targets)
        if self.role != ROLE_READS:
            data["role"] = self.role
        if self.label_codes:
            data["label_codes"] = {label: dict(code) for label, code in self.label_codes.items()}
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
        for chunk in iter(lambda: handle.read(_READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
