"""Make an optimised version of a model: its forward pass exported to ONNX (fp32), or that graph
quantised to int8 by onnxruntime's static quantisation, packed as a new version of the same
model. No Django: ``recognition/management/commands/optimise_model.py`` drives it and registers
the result; the worker's registration measures it against its parent (``evaluate`` below).

A derived package is the usual format (``core.model_package``) with:

- ``model.onnx``: the graph that runs it, with the engine's contract (input ``pixels`` uint8
  N×3×H×W, output ``probabilities``, normalisation and softmax inside), its sha256 in
  ``runtime.onnx_sha256`` and ``runtime.backends == ["onnx"]``: it runs only that graph;
- ``weights.pt``: the parent's weights, unchanged (loaded ``weights_only=True`` and checked like
  any version's; they are what Grad-CAM explains, and what the int8 graph was made from);
- ``derived_from`` ``{"version", "weights_sha256"}`` of the parent and ``transform``
  (``onnx-fp32`` or ``onnx-int8``);
- optionally a held-out set (``holdout/labels.csv`` naming ``holdout/<file>``, label) the
  worker measures it on, carried in the package so that any worker can find it, covered by the
  package's checksum; the manifest's ``holdout`` names the CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.model_package import (
    CHANNELS,
    MANIFEST_NAME,
    MAX_WEIGHTS_BYTES,
    ONNX_NAME,
    WEIGHTS_NAME,
    Manifest,
    PackageError,
    read_member,
    sha256_bytes,
)

from . import backends, synthetic
from .handler import Handler

TRANSFORMS = ("onnx-fp32", "onnx-int8")
HOLDOUT_DIR = "holdout/"
HOLDOUT_LABELS = HOLDOUT_DIR + "labels.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_HOLDOUT_IMAGES = 5000  # more says nothing new about agreement and makes the package large
MAX_HOLDOUT_IMAGE_BYTES = 32 * 1024 * 1024
# calibration: onnxruntime's MinMax calibrater sees every image; 256 demo images settle the
# activation ranges (measured: 512 moved agreement on the demo held-out set by < 0.2%)
DEFAULT_CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 32
# the demo model's sets, each from the generator with its own seed: training used
# training.DEMO_SEED (7) and its held-out check DEMO_SEED + 1000; these stay clear of both
DEMO_CALIBRATION_SEED = 20_001
DEMO_HOLDOUT_SEED = 30_001
DEMO_HOLDOUT_IMAGES = 512
EVAL_BATCH = 32  # images per forward pass while measuring: a full bulk batch
SPEED_REPEATS = 3  # passes over the held-out set timed; the fastest counts
_DIGITS = 6
# nodes left in fp32: the normalisation before the network (Cast, Sub, Div) and the softmax or
# sigmoid after it (a quantised output would round every probability to 1/256); everything else
# (convolutions, the classifier, adds, pools) runs in int8
FP32_OPS = ("Cast", "Sub", "Div", "Softmax", "Sigmoid")


def derived_version(parent_version: str, transform: str) -> str:
    """``1.0.0`` → ``1.0.0+onnx-int8`` (semver build metadata: same release, another build)."""
    return f"{parent_version}+{transform}"


# --- images --------------------------------------------------------------------------------------


def demo_images(seed: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo generator's images as uint8 N×3×H×W (grey, repeated per channel) and labels."""
    images, labels = synthetic.dataset(seed, count, size)
    return np.repeat(images[:, None], CHANNELS, axis=1), labels


def folder_images(handler: Handler, folder: Path, limit: int = DEFAULT_CALIBRATION_IMAGES) -> np.ndarray:
    """Up to ``limit`` images of a folder, decoded and resized as the engine does (uint8 N×3×H×W)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise PackageError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return torch.stack([handler.decode(p.read_bytes()) for p in files]).numpy()


def read_labels_csv(path: Path) -> list[tuple[str, str]]:
    """``filename,label`` rows (a header row ``filename,label`` is skipped)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if not row or row[0].strip().lower() == "filename":
                continue
            if len(row) != 2:  # noqa: PLR2004  (filename, label)
                raise PackageError(f"{path}: every row is filename,label; got {row!r}")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise PackageError(f"{path} names no images")
    if len(rows) > MAX_HOLDOUT_IMAGES:
        raise PackageError(f"{path} names {len(rows)} images; at most {MAX_HOLDOUT_IMAGES}")
    return rows


# --- export and quantisation ---------------------------------------------------------------------


class _Calibration:
    """onnxruntime's CalibrationDataReader over uint8 N×3×H×W images, in batches."""

    def __init__(self, images: np.ndarray):
        self._batches: Iterator[np.ndarray] = iter(
            [np.ascontiguousarray(images[i : i + CALIBRATION_BATCH]) for i in range(0, len(images), CALIBRATION_BATCH)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {backends.ONNX_INPUT: batch}


def quantise_int8(fp32_graph: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 quantisation, QDQ format: weights signed int8 per output channel (symmetric),
    activations unsigned int8 (asymmetric), their ranges calibrated (MinMax) on ``calibration``.
    U8 activations with S8 weights is onnxruntime's fast path on x86 (measured on this AMD EPYC,
    demo model, batch 32: U8S8 with every op but FP32_OPS quantised ran 3.2x fp32's images/s;
    S8S8 ran slower than fp32, 0.7x; quantising only Conv/Gemm, 2.7x, and further from fp32)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load_from_string(fp32_graph)
    kept = [node.name for node in graph.graph.node if node.op_type in FP32_OPS]

    with tempfile.TemporaryDirectory(prefix="sightline-quantise-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32_graph)
        quantize_static(
            source,
            target,
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            nodes_to_exclude=kept,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return target.read_bytes()


@dataclass(frozen=True)
class Derived:
    manifest: Manifest
    path: Path
    graph_bytes: int
    seconds: float


def optimise(
    parent: Handler,
    output: Path,
    *,
    transform: str,
    calibration: np.ndarray | None = None,
    holdout: Path | None = None,
) -> Derived:
    """Write the derived package of ``parent`` (a loaded Handler of the parent's package) to
    ``output``. ``calibration``: uint8 N×3×H×W images for int8 (required for it). ``holdout``:
    a labels CSV (filename,label) whose images sit beside it, packed for the worker."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; use {', '.join(TRANSFORMS)}")
    if parent.manifest.derived_from:
        raise PackageError(f"{parent.manifest.version} is itself derived; optimise the version it came from")
    started = time.perf_counter()
    graph = backends.onnx_export(parent)
    if transform == "onnx-int8":
        if calibration is None or not len(calibration):
            raise PackageError("int8 quantisation needs calibration images")
        graph = quantise_int8(graph, calibration)
    if parent.package_path is None:
        raise PackageError("the parent was not loaded from a package")
    with zipfile.ZipFile(parent.package_path) as archive:
        weights = read_member(archive, WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
    base = parent.manifest.to_dict()
    base.pop("runtime", None)
    fields = {
        **base,
        "version": derived_version(parent.manifest.version, transform),
        "runtime": {"backends": ["onnx"], "onnx_sha256": sha256_bytes(graph)},
        "derived_from": {"version": parent.manifest.version, "weights_sha256": parent.manifest.weights_sha256},
        "transform": transform,
        "description": f"{parent.manifest.description} [{transform} of {parent.manifest.version}]".strip(),
    }
    holdout_rows = read_labels_csv(holdout) if holdout is not None else []
    holdout_folder = holdout.parent if holdout is not None else Path()
    if holdout_rows:
        unknown = sorted({label for _, label in holdout_rows} - set(parent.manifest.labels))
        if unknown:
            raise PackageError(f"the held-out labels {unknown} are not the model's labels")
        fields["holdout"] = HOLDOUT_LABELS
    manifest = Manifest.from_dict(fields)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2))
        archive.writestr(WEIGHTS_NAME, weights)
        archive.writestr(ONNX_NAME, graph)
        if holdout_rows:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["filename", "label"])
            for filename, label in holdout_rows:
                source = holdout_folder / filename
                if Path(filename).name != filename or not source.is_file():
                    raise PackageError(f"the held-out set names {filename!r}, not a file beside the CSV")
                archive.writestr(HOLDOUT_DIR + filename, source.read_bytes())
                writer.writerow([filename, label])
            archive.writestr(HOLDOUT_LABELS, buffer.getvalue())
    tmp.replace(output)
    return Derived(manifest, output, len(graph), round(time.perf_counter() - started, 2))


def package_holdout(handler: Handler, package: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out set a derived package carries: uint8 N×3×H×W and label indices."""
    labels = list(handler.manifest.labels)
    images, targets = [], []
    with zipfile.ZipFile(package) as archive:
        rows = list(csv.reader(io.StringIO(read_member(archive, HOLDOUT_LABELS, MAX_WEIGHTS_BYTES).decode())))
        for row in rows[1:]:
            filename, label = row
            data = read_member(archive, HOLDOUT_DIR + filename, MAX_HOLDOUT_IMAGE_BYTES)
            images.append(handler.decode(data))
            targets.append(labels.index(label))
    return torch.stack(images).numpy(), np.asarray(targets, dtype=np.int64)


# --- measuring a derived version against its parent ----------------------------------------------


def _predict(handler: Handler, images: np.ndarray) -> np.ndarray:
    batches = [
        handler.infer(torch.from_numpy(np.ascontiguousarray(images[i : i + EVAL_BATCH]))).numpy()
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return np.concatenate(batches).astype(np.float64)


def images_per_second(handler: Handler, images: np.ndarray, repeats: int = SPEED_REPEATS) -> float:
    """The fastest of ``repeats`` passes over ``images`` in batches of EVAL_BATCH (warm)."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        _predict(handler, images)
        best = min(best, time.perf_counter() - started)
    return round(len(images) / best, 1)


def measure(handler: Handler, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The handler's probabilities on ``images`` and its images/s over them."""
    return _predict(handler, images), images_per_second(handler, images)


def model_bytes(package: Path) -> int:
    """The bytes a version runs from: its ``model.onnx`` when its manifest runs only that graph
    (a derived version), else its ``weights.pt``."""
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
        manifest = json.loads(read_member(archive, MANIFEST_NAME, MAX_WEIGHTS_BYTES))
        onnx_only = manifest.get("runtime", {}).get("backends") == ["onnx"] and ONNX_NAME in names
        return archive.getinfo(ONNX_NAME if onnx_only else WEIGHTS_NAME).file_size


def evaluate(
    derived: Handler,
    parent: Handler,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    derived_package: Path,
    parent_package: Path,
    holdout: str = "",
    parent_measured: tuple[np.ndarray, float] | None = None,
) -> dict:
    """The derived version against its parent on ``images`` (uint8 N×3×H×W): top-label
    agreement, mean and worst probability difference, accuracy of each when ``labels`` are
    known, sizes (the whole package, and the model bytes each runs: the ratio compares those),
    images/s of each on this machine with the backend each runs. ``parent_measured``: the
    parent's ``measure`` on the same images, when the caller compares several versions with it."""
    derived_p, derived_speed = measure(derived, images)
    parent_p, parent_speed = parent_measured or measure(parent, images)
    diff = np.abs(derived_p - parent_p)
    arms: dict[str, dict] = {}
    for key, handler, package, probabilities, speed in (
        ("derived", derived, derived_package, derived_p, derived_speed),
        ("parent", parent, parent_package, parent_p, parent_speed),
    ):
        arms[key] = {
            "version": handler.manifest.version,
            "backend": handler.backend,
            "package_bytes": package.stat().st_size,
            "model_bytes": model_bytes(package),
            "images_per_second": speed,
        }
        if labels is not None:
            arms[key]["accuracy"] = round(float((probabilities.argmax(1) == labels).mean()), _DIGITS)
    return {
        "holdout": holdout,
        "images": len(images),
        "agreement": round(float((derived_p.argmax(1) == parent_p.argmax(1)).mean()), _DIGITS),
        "mean_abs_diff": round(float(diff.mean()), _DIGITS),
        "max_abs_diff": round(float(diff.max()), _DIGITS),
        "size_ratio": round(arms["derived"]["model_bytes"] / arms["parent"]["model_bytes"], _DIGITS),
        **arms,
        "batch": EVAL_BATCH,
        "threads": torch.get_num_threads(),
    }
