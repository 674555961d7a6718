"""Load a model once, then preprocess → one batched forward pass → postprocess.

Shaped like a TorchServe handler: ``predict(list[bytes])`` returns exactly one
``ItemResult`` per input, in input order. An input that cannot be decoded gets an error
of its own and the rest of the batch runs. The forward pass runs on one of the backends in
``backends.py`` (eager PyTorch, torch.compile, onnxruntime), chosen at load.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError

from core.model_package import CHANNELS, Manifest, PackageError

from . import backends
from .package import read_weights
from .results import ItemResult

logger = logging.getLogger(__name__)

# Inputs reaching the engine were validated and re-encoded on upload; this cap only stops a
# file that changed in storage from exhausting a worker.
MAX_DECODE_PIXELS = 50_000_000
PROBABILITY_DIGITS = 6  # decimals of a stored probability


def choose_device(preferred: str = "auto") -> torch.device:
    """CUDA when present, CPU otherwise; ``preferred`` may force either."""
    if preferred == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preferred)


def configure_cpu_threads(threads: int | None = None) -> int:
    """Intra-op threads = the cores this process owns (its affinity mask), unless told."""
    count = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def build_model(architecture: str, num_classes: int) -> torch.nn.Module:
    try:
        return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise PackageError(f"unknown torchvision architecture {architecture!r}") from exc


def open_image(data: bytes) -> Image.Image:
    """Open (not yet decode) an image, refusing one larger than the engine's pixel cap."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > MAX_DECODE_PIXELS:
        image.close()
        raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
    return image


DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: stretch the stored range onto 8 bits.
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale).astype(np.uint8))
    return image.convert("RGB")


class Handler:
    def __init__(self, manifest: Manifest, model: torch.nn.Module, device: torch.device):
        self.manifest = manifest
        self.device = device
        self.model = model  # eager: Grad-CAM's hooks and the cache's memory count use it
        self.package_path: Path | None = None
        self.compiled = False
        size = manifest.input_size
        self._size = (size, size)
        self._mean = torch.tensor(manifest.mean, device=device).view(1, CHANNELS, 1, 1)
        self._std = torch.tensor(manifest.std, device=device).view(1, CHANNELS, 1, 1)
        # what infer runs, as one (name, runner) pair so that a switch is a single assignment
        self._active: tuple[str, backends.Runner] = ("eager", backends.eager_runner(self))
        self.backend_report: dict = {"backend": "eager", "requested": "eager", "device": device.type, "candidates": {}}
        self.compile_thread: threading.Thread | None = None
        self.selection_thread: threading.Thread | None = None

    @property
    def backend(self) -> str:
        """The backend ``infer`` runs now: eager, compile or onnx."""
        return self._active[0]

    @property
    def active_runner(self) -> backends.Runner:
        return self._active[1]

    @property
    def input_shape(self) -> tuple[int, int]:
        return self._size

    def use(self, name: str, runner: backends.Runner) -> None:
        """Switch what ``infer`` runs, atomically: a call in flight finishes on the old one."""
        self._active = (name, runner)
        self.backend_report["backend"] = name

    @classmethod
    def initialize(
        cls,
        package_path: Path,
        expected_sha256: str,
        device: torch.device | None = None,
        expected_manifest: dict | None = None,
        compile_for: tuple[int, ...] = (),
        allow_torchscript: bool = False,
        backend: str = "eager",
        background: bool = False,
    ) -> Handler:
        """Load, check and warm up. ``expected_manifest`` is what the registry recorded: labels,
        normalisation and sizes that changed since registration refuse the model too.
        ``compile_for``: batch sizes to compile the forward pass for (``torch.compile``); with
        ``backend="eager"`` now, before returning, as before; otherwise in the background.
        ``allow_torchscript``: TorchScript packages (code, not only weights) load only when set.
        ``backend``: eager, compile (eager now, compiled in a background thread, switched to once
        it agrees), onnx, or auto (the fastest that agrees; see ``backends.select``).
        ``background``: return as soon as the eager model answers, and choose the backend in a
        thread (``selection_thread``); a disagreement found there keeps eager, logged, rather
        than refusing a model its registration checks already passed."""
        manifest, weights = read_weights(package_path, expected_sha256, allow_torchscript=allow_torchscript)
        if expected_manifest is not None and manifest != Manifest.from_dict(expected_manifest):
            raise PackageError(
                f"the manifest of {manifest.name} {manifest.version} differs from the registered one; "
                "the model is refused"
            )
        if isinstance(weights, torch.jit.ScriptModule):
            model = weights
        else:
            model = build_model(manifest.architecture, len(manifest.labels))
            try:
                model.load_state_dict(weights, strict=True)
            except RuntimeError as exc:
                raise PackageError(f"weights do not fit {manifest.architecture}: {exc}") from exc
        device = device or choose_device()
        model = model.eval().to(device, memory_format=torch.channels_last)
        handler = cls(manifest, model, device)
        handler.package_path = Path(package_path)
        handler._warm_up()
        if backend == "eager":
            if manifest.runtime.backends and "eager" not in manifest.runtime.backends:
                backend = "auto"  # the manifest vouches for other backends only
            elif compile_for:
                handler.compile(compile_for)
                return handler
            else:
                return handler
        # a manifest that does not vouch for eager (an int8 version) chooses before it serves:
        # eager would answer with weights it does not run on
        if background and "eager" in (manifest.runtime.backends or ("eager",)):
            handler.selection_thread = backends.start_background_select(handler, backend, compile_for)
        else:
            backends.select(handler, backend, compile_for)
        return handler

    def wait_for_backend(self, timeout: float | None = None) -> str:
        """Wait for background selection and compiling to finish (tests, the bench); the backend."""
        if self.selection_thread is not None:
            self.selection_thread.join(timeout)
        if self.compile_thread is not None:  # read after selection: it may have started it
            self.compile_thread.join(timeout)
        return self.backend

    def compile(self, batch_sizes: tuple[int, ...]) -> None:
        """``torch.compile`` with frozen weights, one graph with a dynamic batch dimension,
        compiled now (seconds per shape) for the sizes given rather than on a request's time.
        Outputs are checked against the eager model; a mismatch keeps what ran before."""
        backends.compile_and_switch(self, batch_sizes)

    def compile_in_background(self, batch_sizes: tuple[int, ...], only_if_faster: bool = False) -> threading.Thread:
        """``compile`` in a daemon thread: the handler serves with its current backend meanwhile
        and switches once the compiled forward agrees (and, ``only_if_faster``, beats it)."""
        self.compile_thread = backends.start_background_compile(self, batch_sizes, only_if_faster)
        return self.compile_thread

    def _warm_up(self) -> None:
        dummy = torch.zeros((1, CHANNELS, *self._size), dtype=torch.uint8)
        probabilities = self.infer(dummy)
        if probabilities.shape != (1, len(self.manifest.labels)):
            raise PackageError(
                f"the model answers {tuple(probabilities.shape)[1:]} outputs for {len(self.manifest.labels)} labels"
            )

    def decode(self, data: bytes) -> torch.Tensor:
        """Bytes → uint8 tensor (3, H, W) at the model's input size."""
        with open_image(data) as image:
            # JPEG: decode at reduced scale when possible; never for a screening model, whose
            # browser twin cannot scale in the DCT and must see the same pixels as the server
            if not self.manifest.screening:
                image.draft("RGB", self._size)
            return self.from_image(image)

    def from_image(self, image: Image.Image) -> torch.Tensor:
        """A decoded image → uint8 tensor (3, H, W) at the model's input size."""
        rgb = _to_rgb(image).resize(self._size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)

    def preprocess(self, items: list[bytes]) -> tuple[torch.Tensor | None, list[str]]:
        tensors, errors = [], []
        for data in items:
            try:
                tensors.append(self.decode(data))
                errors.append("")
            except DECODE_ERRORS as exc:
                errors.append(f"the image could not be decoded: {exc}")
        batch = torch.stack(tensors) if tensors else None
        return batch, errors

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) → probabilities (N, labels) on the CPU, on ``self.backend``."""
        return self._active[1](batch)

    def torch_infer(self, forward: torch.nn.Module | backends.Runner, batch: torch.Tensor) -> torch.Tensor:
        """``infer`` through a PyTorch module: the eager model, or its compiled form."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).float().div_(255.0)
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            with (
                backends.GRAPH_LOCK,  # never while torch.compile traces (backends.GRAPH_LOCK)
                torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"),
            ):
                logits = forward(x)
            if self.manifest.task == "multi-label":  # independent findings, one sigmoid each
                return torch.sigmoid(logits.float()).cpu()
            return torch.softmax(logits.float(), dim=1).cpu()

    def postprocess(self, probabilities: torch.Tensor | None, errors: list[str]) -> list[ItemResult]:
        labels = self.manifest.labels
        rows = iter(probabilities.tolist() if probabilities is not None else [])
        results = []
        for error in errors:
            if error:
                results.append(ItemResult(error=error))
                continue
            row = next(rows)
            best = max(range(len(labels)), key=row.__getitem__)
            positive: tuple[str, ...] = ()
            if self.manifest.task == "multi-label":
                thresholds = self.manifest.thresholds or (0.5,) * len(labels)
                positive = tuple(label for label, p, t in zip(labels, row, thresholds, strict=True) if p >= t)
            results.append(
                ItemResult(
                    probabilities={label: round(p, PROBABILITY_DIGITS) for label, p in zip(labels, row, strict=True)},
                    top_label=labels[best],
                    top_probability=round(row[best], PROBABILITY_DIGITS),
                    positive_labels=positive,
                )
            )
        return results

    def predict(self, items: list[bytes]) -> list[ItemResult]:
        batch, errors = self.preprocess(items)
        probabilities = self.infer(batch) if batch is not None else None
        return self.postprocess(probabilities, errors)
