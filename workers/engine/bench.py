"""Engine throughput for a model package: decode + preprocess + forward, by batch size.

    python -m workers.engine.bench PACKAGE [--batch-sizes 1,8,16,32] [--seconds 3] [--json OUT]

Prints a table and writes JSON. Run by `make bench` on the demo model.

Backends, forward only (uint8 batch in, probabilities out), random weights, no package needed:

    python -m workers.engine.bench --backends eager-nchw,eager,compile,onnx \
        --architectures resnet18,resnet50 --input-size 224 --batch-sizes 1,8 [--json OUT]

``eager-nchw`` is eager PyTorch in the default memory layout, ``eager`` the engine's (channels_last);
the first compile's seconds and the ONNX export's are reported per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from core.model_package import CHANNELS, Manifest, read_manifest

from . import backends, synthetic
from .handler import Handler, build_model, configure_cpu_threads

MS_PER_SECOND = 1000
# a model built here, without a package: any normalisation will do, and no weights to check
_MEAN, _STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
_NO_CHECKSUM = "0" * 64
# defaults of the command line: ImageNet's input size, a few seconds per batch size, and a pool of
# phantom PNGs the size of a typical upload
DEFAULT_INPUT_SIZE = 224
DEFAULT_SECONDS = 3.0
DEFAULT_IMAGE_SIZE = 512
IMAGE_POOL = 64  # images rendered once; the largest batch size measured takes its first ones


def measure(handler: Handler, items: list[bytes], seconds: float) -> dict:
    handler.predict(items)  # warm-up for this shape
    batches, started = 0, time.perf_counter()
    forward = 0.0
    while time.perf_counter() - started < seconds:
        batch, _ = handler.preprocess(items)
        t0 = time.perf_counter()
        handler.infer(batch)
        forward += time.perf_counter() - t0
        batches += 1
    elapsed = time.perf_counter() - started
    return {
        "batch_size": len(items),
        "images_per_second": round(batches * len(items) / elapsed, 1),
        "forward_only_images_per_second": round(batches * len(items) / forward, 1),
        "ms_per_batch": round(elapsed / batches * MS_PER_SECOND, 2),
    }


def images_per_second(runner: backends.Runner, batch: torch.Tensor, seconds: float) -> float:
    runner(batch)  # warm-up for this shape (a compiled graph's first call of it compiles)
    batches, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or batches < 2:
        runner(batch)
        batches += 1
    return round(batches * len(batch) / (time.perf_counter() - started), 1)


def _eager_nchw(model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> backends.Runner:
    """The plain model in the default memory layout: the baseline the backends are measured against."""

    def runner(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = (batch.float().div_(255.0) - mean) / std
            return torch.softmax(model(x), dim=1)

    return runner


def backend_rows(architecture: str, names: list[str], sizes: list[int], input_size: int, seconds: float) -> dict:
    """Forward-only images/s of each backend on a random-weight torchvision model."""
    torch.manual_seed(0)
    manifest = Manifest(
        name=architecture,
        version="bench",
        architecture=architecture,
        input_size=input_size,
        mean=_MEAN,
        std=_STD,
        labels=("a", "b"),
        weights_sha256=_NO_CHECKSUM,
    )
    model = build_model(architecture, 2).eval()
    mean = torch.tensor(manifest.mean).view(1, CHANNELS, 1, 1)
    std = torch.tensor(manifest.std).view(1, CHANNELS, 1, 1)
    handler = Handler(manifest, build_model(architecture, 2).eval(), torch.device("cpu"))
    handler.model.load_state_dict(model.state_dict())
    handler.model.to(memory_format=torch.channels_last)
    probe = backends.probe_batch(handler, max(sizes))
    reference = handler.torch_infer(handler.model, probe)
    result: dict = {"model": f"{architecture} (random weights, {input_size} px)", "rows": {}, "build_seconds": {}}
    for name in names:
        started = time.perf_counter()
        runner = _eager_nchw(model, mean, std) if name == "eager-nchw" else backends.build(handler, name)
        if name == "compile":  # the first call of each shape compiles: time the first on its own
            runner(probe[:1])
            result["build_seconds"]["compile_first_shape"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            runner(probe)
            result["build_seconds"]["compile_second_shape"] = round(time.perf_counter() - started, 1)
        elif name == "onnx":
            result["build_seconds"]["onnx_export_and_session"] = round(time.perf_counter() - started, 1)
        diff = backends.max_abs_diff(runner, reference, probe)
        row = {"max_abs_diff": float(f"{diff:.3g}")}
        for size in sizes:
            row[f"batch_{size}"] = images_per_second(runner, probe[:size], seconds)
        result["rows"][name] = row
    return result


def main_backends(args) -> None:
    threads = configure_cpu_threads()
    names = args.backends.split(",")
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    report = {"torch": torch.__version__, "threads": threads, "machine": platform.machine(), "models": []}
    for architecture in args.architectures.split(","):
        result = backend_rows(architecture, names, sizes, args.input_size, args.seconds)
        report["models"].append(result)
        print(f"{result['model']}, {threads} threads, forward only, images/s; built in {result['build_seconds']} s")
        print(f"{'backend':>12}  " + "  ".join(f"{'batch ' + str(s):>9}" for s in sizes) + "  max |diff|")
        for name, row in result["rows"].items():
            cells = "  ".join(f"{row[f'batch_{s}']:>9}" for s in sizes)
            print(f"{name:>12}  {cells}  {row['max_abs_diff']:.2g}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written: {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path, nargs="?")
    parser.add_argument("--backends", help="compare backends (forward only) instead: eager-nchw,eager,compile,onnx")
    parser.add_argument("--architectures", default="resnet18,resnet50")
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE)
    parser.add_argument("--backend", default="eager", help="with a package: eager, compile, onnx or auto")
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.backends:
        main_backends(args)
        return
    if args.package is None:
        parser.error("a package, or --backends")

    threads = configure_cpu_threads()
    manifest = read_manifest(args.package)
    handler = Handler.initialize(args.package, manifest.weights_sha256, backend=args.backend)
    handler.wait_for_backend()
    rng = np.random.default_rng(0)
    pool = [synthetic.render_png(rng, args.image_size, i % 2 == 1) for i in range(IMAGE_POOL)]
    rows = [measure(handler, pool[:size], args.seconds) for size in (int(v) for v in args.batch_sizes.split(","))]
    report = {
        "model": f"{manifest.name} {manifest.version} ({manifest.architecture}, {manifest.input_size} px)",
        "device": str(handler.device),
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.machine(),
        "backend": handler.backend,
        "backend_report": handler.backend_report,
        "input": f"{args.image_size}x{args.image_size} PNG",
        "rows": rows,
    }
    print(f"{report['model']} on {report['device']} ({handler.backend}), {threads} threads, inputs {report['input']}")
    print(f"{'batch':>5}  {'img/s (decode+forward)':>22}  {'img/s (forward only)':>20}  {'ms/batch':>8}")
    for row in rows:
        print(
            f"{row['batch_size']:>5}  {row['images_per_second']:>22}  "
            f"{row['forward_only_images_per_second']:>20}  {row['ms_per_batch']:>8}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
