"""Ways to run a loaded model's forward pass, all behind ``Handler.infer`` (uint8 N×3×H×W in,
probabilities N×labels on the CPU out):

``eager``
    PyTorch as loaded, channels_last. The reference every other backend is checked against,
    and the module Grad-CAM hooks into; always built.
``compile``
    ``torch.compile`` with frozen weights and a dynamic batch dimension. Compiling takes seconds
    to a minute per model, so a worker compiles in a background thread after the eager model is
    ready and switches to it once its outputs agree (``Handler.compile_in_background``).
``onnx``
    The model exported to ONNX (normalisation and softmax/sigmoid inside the graph, a dynamic
    batch axis), run by onnxruntime's CPUExecutionProvider with the process's intra-op threads.
    CPU only: onnxruntime-gpu cannot be installed beside onnxruntime, and on CUDA PyTorch is the
    fast path anyway.

``auto`` (``select``) on the CPU builds the candidates, keeps those that agree with eager within
the tolerance, times each on a few warm batches and runs the fastest; ``compile``, being slow to
build, joins only when the manifest lists it or the worker asks for it, in the background, and
takes over only if it measures faster. On CUDA it stays with PyTorch (eager, or compile).

A backend the manifest lists under ``runtime.backends`` is required: if it cannot be built or
disagrees, the model is refused (PackageError). Any other backend that disagrees is simply not
used, and the report says why. What runs and what was measured is on ``handler.backend`` and
``handler.backend_report``.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
import warnings
import weakref
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.model_package import CHANNELS, ONNX_NAME, RUNTIME_BACKENDS, PackageError, read_member, sha256_bytes

if TYPE_CHECKING:
    from .handler import Handler

logger = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], torch.Tensor]

# Agreement with eager PyTorch, as the largest absolute difference in any probability.
# fp32 on the CPU: the backends compute the same arithmetic in another order (batch-norm folded
# into the convolutions, other GEMM/convolution kernels, fused ops), which moves logits by a few
# 1e-6 relative; through softmax (slope at most 1/4) that is ~1e-5 in a probability. 1e-3 leaves
# two orders of magnitude for deeper nets and larger inputs, yet is far below anything that
# could move a reading: probabilities are reported to 6 places but judged at thresholds such as
# 0.5, and a wrong graph (a perturbed weight, a dropped normalisation) differs by 1e-2 or more.
AGREEMENT_ATOL = 1e-3
# CUDA runs under fp16 autocast (10-bit mantissa, ~1e-3 relative per op): 2e-2 on probabilities.
AGREEMENT_ATOL_CUDA = 2e-2
PROBE_BATCH = 4  # images in the probe batch: agreement and timing at load
TIMING_REPEATS = 3  # warm batches timed per candidate; the median counts
ONNX_OPSET = 17
MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit on one message: no larger .onnx loads
PIXEL_LEVELS = 256  # values of an 8-bit pixel
_RAMP_FLOOR = 0.2  # the probe's gradient images fade to a fifth of full scale, not to black
MS_PER_SECOND = 1000
ONNX_INPUT, ONNX_OUTPUT = "pixels", "probabilities"


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (not installed, not on this device, export failed)."""


# A lossy derived version (int8) answers a few 1e-2 away from its weights by design: its
# registration measures it against its parent on a held-out set instead. Here any finite answer
# of the right shape passes (a probability moves at most 1); NaN and wrong shapes (inf) still fail.
LOSSY_ATOL = 1.0


def tolerance(handler: Handler) -> float:
    if handler.manifest.lossy:
        return LOSSY_ATOL
    if handler.manifest.runtime.atol is not None:
        return handler.manifest.runtime.atol
    return AGREEMENT_ATOL_CUDA if handler.device.type == "cuda" else AGREEMENT_ATOL


def probe_batch(handler: Handler, size: int = PROBE_BATCH, seed: int = 0) -> torch.Tensor:
    """A fixed uint8 batch: seeded noise and smooth gradients (saturated softmax outputs would
    hide differences that noise alone does not reach)."""
    height, width = handler.input_shape
    rng = np.random.default_rng(seed)
    images = rng.integers(0, PIXEL_LEVELS, size=(size, CHANNELS, height, width), dtype=np.uint8)
    ramp = (
        np.linspace(0, 255, width, dtype=np.float32)[None, :]
        * np.linspace(_RAMP_FLOOR, 1.0, height, dtype=np.float32)[:, None]
    )
    for index in range(1, size, 2):
        images[index] = ramp.astype(np.uint8)[None] // (1 + index % 3)
    return torch.from_numpy(images)


# --- building each backend -----------------------------------------------------------------------


# torch.compile's tracing (FX, for frozen weights) patches ``torch.nn.Module.__call__`` for the
# whole process while it runs: a forward pass in another thread during it fails ("module is not
# installed as a submodule", seen in CI). Compiling holds this lock, and every PyTorch forward
# pass takes it (uncontended otherwise: well under a microsecond), so requests served while a
# model compiles in the background wait for that shape's compile instead of failing.
GRAPH_LOCK = threading.RLock()


def _torch_runner(handler: Handler, forward) -> Runner:
    """``handler.torch_infer(forward, batch)``, holding the handler weakly: the handler holds its
    runner, and a cycle would keep an evicted model (and its GPU memory) until the next collection."""
    handler_ref = weakref.ref(handler)

    def run(batch: torch.Tensor) -> torch.Tensor:
        live = handler_ref()
        if live is None:  # only a caller that outlived the handler's eviction gets here
            raise RuntimeError("the model this runner served has been evicted")
        return live.torch_infer(forward, batch)

    return run


def eager_runner(handler: Handler) -> Runner:
    return _torch_runner(handler, handler.model)


def compile_runner(handler: Handler) -> Runner:
    """``torch.compile`` with frozen weights, one graph with a dynamic batch dimension; the
    graph itself is built on the first call of each shape (which ``Handler.compile`` makes)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(handler.model, dynamic=True)
    return _torch_runner(handler, compiled)


class ProbabilityModel(torch.nn.Module):
    """uint8 pixels → probabilities: exactly ``Handler.infer``'s contract, as one graph to export."""

    def __init__(self, model: torch.nn.Module, mean, std, multi_label: bool):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, CHANNELS, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, CHANNELS, 1, 1))
        self.multi_label = multi_label

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255.0 - self.mean) / self.std
        logits = self.model(x)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def onnx_export(handler: Handler) -> bytes:
    """The handler's eager model as ONNX bytes (opset 17, dynamic batch). PyTorch's TorchScript
    -based exporter: the torch.export-based one needs onnxscript as well and is slower to run."""
    if handler.device.type != "cpu":
        raise BackendUnavailable("onnx runs on the CPU only")
    manifest = handler.manifest
    wrapper = ProbabilityModel(handler.model, manifest.mean, manifest.std, manifest.task == "multi-label").eval()
    try:
        return uint8_graph_export(wrapper, handler.input_shape, (ONNX_OUTPUT,))
    except Exception as exc:
        raise BackendUnavailable(f"the model could not be exported to ONNX: {exc}") from exc


def uint8_graph_export(module: torch.nn.Module, input_shape: tuple[int, int], outputs: tuple[str, ...]) -> bytes:
    """``module`` (uint8 ``pixels`` N×3×H×W in, ``outputs`` out, every axis 0 the batch) as ONNX
    bytes: the package format's graph, for the reads backends and the browser's screen alike."""
    example = torch.zeros((2, CHANNELS, *input_shape), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, *outputs)},
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


def onnx_from_package(handler: Handler) -> bytes | None:
    """The package's own ``model.onnx``, when the manifest names its checksum; None otherwise."""
    expected = handler.manifest.runtime.onnx_sha256
    if not expected:
        return None
    if handler.package_path is None:
        raise PackageError(f"the manifest names {ONNX_NAME} but no package was loaded")
    try:
        with zipfile.ZipFile(handler.package_path) as archive:
            data = read_member(archive, ONNX_NAME, MAX_ONNX_BYTES)
    except zipfile.BadZipFile as exc:
        raise PackageError("the model package is not a readable zip archive") from exc
    if sha256_bytes(data) != expected:
        raise PackageError(f"{ONNX_NAME} does not match the checksum in the manifest; the model is refused")
    return data


def onnx_runner(model: bytes, threads: int | None = None) -> Runner:
    """An onnxruntime CPU session over ``model`` (ONNX bytes), ``threads`` intra-op threads
    (default: PyTorch's, which ``configure_cpu_threads`` set from the process's cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between batches: two worker processes (lanes) share the node's cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendUnavailable(f"onnxruntime cannot load the graph: {exc}") from exc

    def run(batch: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(batch.cpu().numpy(), dtype=np.uint8)
        # by name: a screening graph has a second output (logits), and probabilities is the read
        (probabilities,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})
        return torch.from_numpy(probabilities)

    return run


def onnx_build(handler: Handler) -> Runner:
    # a lossy version has no other forward pass than its graph: a GPU worker runs it on its CPU
    if handler.device.type != "cpu" and not handler.manifest.lossy:
        raise BackendUnavailable("onnx runs on the CPU only")
    model = onnx_from_package(handler)
    return onnx_runner(model if model is not None else onnx_export(handler))


def build(handler: Handler, name: str) -> Runner:
    """A runner for backend ``name`` (BackendUnavailable when it cannot run here). A compile
    runner has not compiled anything yet: its first call of each shape does."""
    if name == "eager":
        return eager_runner(handler)
    if name == "compile":
        return compile_runner(handler)
    if name == "onnx":
        return onnx_build(handler)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(RUNTIME_BACKENDS)}")


# --- agreement and timing ------------------------------------------------------------------------


def max_abs_diff(runner: Runner, reference: torch.Tensor, probe: torch.Tensor) -> float:
    """Largest difference against ``reference`` over the probe batch, as a whole and one by one
    (a dynamic batch axis must give the same answers at batch 1). inf for a wrong shape or NaN."""
    worst = 0.0
    for got, want in ((runner(probe), reference), (runner(probe[:1]), reference[:1])):
        if got.shape != want.shape:
            return math.inf
        diff = (got.float() - want.float()).abs().max().item()
        if not math.isfinite(diff):
            return math.inf
        worst = max(worst, diff)
    return worst


def agreement(
    handler: Handler, probe: torch.Tensor | None = None, backends: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Each backend's largest probability difference against eager PyTorch on ``probe``: a pure
    check (the handler keeps running what it ran). ``backends`` default: the manifest's list, or
    every backend but compile (seconds to a minute to build). One that cannot be built here is
    left out (see ``verify`` for required ones); one that fails while running counts as inf."""
    probe = probe_batch(handler) if probe is None else probe
    names = backends or handler.manifest.runtime.backends or tuple(b for b in RUNTIME_BACKENDS if b != "compile")
    reference = handler.torch_infer(handler.model, probe)
    result = {}
    for name in names:
        try:
            runner = build(handler, name)
        except BackendUnavailable as exc:
            logger.info("backend %s not checked for %s: %s", name, handler.manifest.name, exc)
            continue
        try:
            result[name] = max_abs_diff(runner, reference, probe)
        except Exception:  # a graph that loads but cannot run this input
            logger.exception("backend %s fails on the probe batch for %s", name, handler.manifest.name)
            result[name] = math.inf
    return result


def verify(handler: Handler, probe: torch.Tensor | None = None) -> dict[str, float]:
    """The registration check: every backend the manifest requires builds and agrees within the
    tolerance, else PackageError in words. Returns ``agreement`` (optional backends included:
    onnx, checked so that a package's shipped model.onnx is always compared with its weights)."""
    required = handler.manifest.runtime.backends
    names = tuple(dict.fromkeys((*required, "eager", "onnx")))
    diffs = agreement(handler, probe, names)
    atol = tolerance(handler)
    for name in required:
        if name not in diffs:
            raise PackageError(f"the manifest requires the {name} backend, which cannot run this model")
        if diffs[name] == math.inf:
            raise PackageError(
                f"the {name} backend fails on a probe batch, or answers NaN or the wrong shape; "
                "the manifest requires it, so the model is refused"
            )
        if diffs[name] > atol:
            raise PackageError(
                f"the {name} backend answers up to {diffs[name]:.2g} away from eager PyTorch "
                f"(allowed {atol:g}); the manifest requires it, so the model is refused"
            )
    if "onnx" in diffs and handler.manifest.runtime.onnx_sha256 and diffs["onnx"] > atol:
        raise PackageError(
            f"the package's {ONNX_NAME} answers up to {diffs['onnx']:.2g} away from its weights (allowed {atol:g})"
        )
    return diffs


def time_runner(runner: Runner, probe: torch.Tensor, repeats: int = TIMING_REPEATS) -> float:
    """Median milliseconds per probe batch, after the warm-up calls agreement already made."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner(probe)
        samples.append((time.perf_counter() - started) * MS_PER_SECOND)
    return round(sorted(samples)[len(samples) // 2], 2)


# --- choosing one --------------------------------------------------------------------------------


def select(handler: Handler, requested: str = "auto", compile_for: tuple[int, ...] = ()) -> None:
    """Set what ``handler.infer`` runs, from the worker's ``requested`` backend (eager, compile,
    onnx or auto) and the manifest's list; fill ``handler.backend_report``. PackageError when a
    backend the manifest requires disagrees. compile (requested, listed, or ``compile_for``
    given under auto) is built in a background thread: ``handler.compile_thread``."""
    if requested not in (*RUNTIME_BACKENDS, "auto"):
        raise ValueError(f"unknown backend {requested!r}; use auto, {', '.join(RUNTIME_BACKENDS)}")
    manifest = handler.manifest
    required = manifest.runtime.backends
    allowed = required or RUNTIME_BACKENDS
    atol = tolerance(handler)
    report = handler.backend_report
    report.update(requested=requested, device=handler.device.type, atol=atol, candidates={})
    candidates = report["candidates"]
    if requested != "auto" and requested not in allowed:
        logger.warning(
            "%s %s does not list the %s backend; choosing among %s",
            manifest.name,
            manifest.version,
            requested,
            list(allowed),
        )
        requested = "auto"
    if requested == "auto":
        eager_wanted = "eager" in allowed
        synchronous = [b for b in allowed if b == "onnx" and (handler.device.type == "cpu" or manifest.lossy)]
        background = "compile" in allowed and ("compile" in required or bool(compile_for))
    else:
        eager_wanted = requested == "eager"
        synchronous = [requested] if requested == "onnx" else []
        background = requested == "compile"
    if handler.device.type != "cpu" and not manifest.lossy:
        for name in [b for b in required if b == "onnx"]:
            candidates[name] = {"status": "not on this device (onnx runs on the CPU only)"}

    probe = probe_batch(handler)
    reference = handler.torch_infer(handler.model, probe)
    timings: dict[str, tuple[float, Runner]] = {}
    if eager_wanted or not synchronous:
        runner = eager_runner(handler)
        runner(probe)  # warm-up for this shape
        timings["eager"] = (time_runner(runner, probe), runner)
        candidates["eager"] = {"max_abs_diff": 0.0, "ms_per_batch": timings["eager"][0], "status": "agrees"}
    for name in synchronous:
        started = time.perf_counter()
        try:
            runner = build(handler, name)
            diff = max_abs_diff(runner, reference, probe)
        except PackageError:  # a shipped model.onnx that is not the one the manifest names
            raise
        except Exception as exc:  # not installed, export failed, or the graph cannot run this input
            if name in required and handler.device.type == "cpu":
                raise PackageError(
                    f"the manifest requires the {name} backend, which cannot run this model: {exc}"
                ) from exc
            candidates[name] = {"status": f"unavailable: {exc}"}
            logger.warning("backend %s unavailable for %s %s: %s", name, manifest.name, manifest.version, exc)
            continue
        entry: dict[str, float | str] = {"max_abs_diff": diff, "build_seconds": round(time.perf_counter() - started, 2)}
        candidates[name] = entry
        if diff > atol:
            entry["status"] = f"disagrees (allowed {atol:g})"
            if name in required:
                raise PackageError(
                    f"the {name} backend answers up to {diff:.2g} away from eager PyTorch (allowed {atol:g}); "
                    "the manifest requires it, so the model is refused"
                )
            logger.warning(
                "backend %s disagrees for %s %s by %.2g: not used", name, manifest.name, manifest.version, diff
            )
            continue
        entry["status"] = "agrees"
        entry["ms_per_batch"] = ms_per_batch = time_runner(runner, probe)
        timings[name] = (ms_per_batch, runner)
    if not timings:  # nothing asked for could run: the reference still can
        runner = eager_runner(handler)
        timings["eager"] = (time_runner(runner, probe), runner)
        candidates.setdefault("eager", {"max_abs_diff": 0.0, "ms_per_batch": timings["eager"][0], "status": "agrees"})
    best = min(timings, key=lambda name: timings[name][0])
    handler.use(best, timings[best][1])
    report["probe_batch"] = len(probe)
    if background:
        sizes = tuple(sorted({1, len(probe), *compile_for}))
        handler.compile_in_background(sizes, only_if_faster=requested == "auto")
    logger.info("%s %s runs %s: %s", manifest.name, manifest.version, best, candidates)


def compile_and_switch(handler: Handler, batch_sizes: tuple[int, ...], only_if_faster: bool = False) -> bool:
    """Compile (seconds to a minute), check every size against eager, then switch ``handler``
    to it in one assignment: requests served meanwhile run what ran before. With
    ``only_if_faster`` the compiled forward must also beat the current backend on the probe."""
    entry = handler.backend_report.setdefault("candidates", {}).setdefault("compile", {})
    entry["status"] = "compiling"
    atol = tolerance(handler)
    started = time.perf_counter()
    try:
        runner = compile_runner(handler)
        probe = probe_batch(handler, max(batch_sizes))
        reference = handler.torch_infer(handler.model, probe)
        diff = 0.0
        for size in sorted(set(batch_sizes)):
            with GRAPH_LOCK:  # the first call of a shape compiles it
                got = runner(probe[:size])
            diff = max(diff, (got - reference[:size]).abs().max().item())
        if not math.isfinite(diff):
            diff = math.inf
    except Exception as exc:  # inductor failures are many and varied; eager keeps running
        logger.exception(
            "torch.compile failed; %s %s runs %s", handler.manifest.name, handler.manifest.version, handler.backend
        )
        entry["status"] = f"failed: {exc}"
        return False
    entry.update(max_abs_diff=diff, build_seconds=round(time.perf_counter() - started, 2))
    if diff > atol:
        entry["status"] = f"disagrees (allowed {atol:g})"
        logger.error(
            "compiled outputs differ by %.2g; %s %s runs %s",
            diff,
            handler.manifest.name,
            handler.manifest.version,
            handler.backend,
        )
        return False
    entry["status"] = "agrees"
    timing_probe = probe[: handler.backend_report.get("probe_batch", PROBE_BATCH)]
    entry["ms_per_batch"] = time_runner(runner, timing_probe)
    if only_if_faster:
        current = handler.backend_report.get("candidates", {}).get(handler.backend, {})
        current_ms = time_runner(handler.active_runner, timing_probe)
        current["ms_per_batch"] = current_ms
        if entry["ms_per_batch"] >= current_ms:
            entry["status"] = "agrees, not faster"
            return False
    handler.use("compile", runner)
    handler.compiled = True
    return True


def select_or_keep_eager(handler: Handler, requested: str, compile_for: tuple[int, ...]) -> None:
    """``select`` for a background thread: whatever goes wrong, the eager model keeps serving."""
    try:
        select(handler, requested, compile_for)
        if handler.compile_thread is not None:
            handler.compile_thread.join()
    except Exception as exc:
        logger.exception("choosing a backend failed; %s %s runs eager", handler.manifest.name, handler.manifest.version)
        handler.use("eager", eager_runner(handler))
        handler.backend_report["error"] = str(exc)
    # the background work is over (operators and the benchmark read this line: from here on the
    # worker's CPU goes to requests only)
    logger.info("backends settled: %s %s runs %s", handler.manifest.name, handler.manifest.version, handler.backend)


def _in_background(kind: str, handler: Handler, target, *args) -> threading.Thread:
    """``target(handler, *args)`` in a daemon thread named after the model."""
    name = f"{kind}-{handler.manifest.name}-{handler.manifest.version}"
    thread = threading.Thread(target=target, args=(handler, *args), name=name, daemon=True)
    thread.start()
    return thread


def start_background_select(handler: Handler, requested: str, compile_for: tuple[int, ...] = ()) -> threading.Thread:
    return _in_background("backend", handler, select_or_keep_eager, requested, compile_for)


def start_background_compile(
    handler: Handler, batch_sizes: tuple[int, ...], only_if_faster: bool = False
) -> threading.Thread:
    return _in_background("compile", handler, compile_and_switch, batch_sizes, only_if_faster)
