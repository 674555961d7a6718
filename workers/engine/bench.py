"""Engine throughput for a model package: decode + preprocess + forward, by batch size.

    python -m workers.engine.bench PACKAGE [--batch-sizes 1,8,16,32] [--seconds 3] [--json OUT]

Prints a table and writes JSON. Run by `make bench` on the demo model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from core.model_package import read_manifest

from . import synthetic
from .handler import Handler, configure_cpu_threads


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
        "ms_per_batch": round(elapsed / batches * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("package", type=Path)
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    threads = configure_cpu_threads()
    manifest = read_manifest(args.package)
    handler = Handler.initialize(args.package, manifest.weights_sha256)
    rng = np.random.default_rng(0)
    pool = [synthetic.render_png(rng, args.image_size, i % 2 == 1) for i in range(64)]
    rows = [measure(handler, pool[:size], args.seconds) for size in (int(v) for v in args.batch_sizes.split(","))]
    report = {
        "model": f"{manifest.name} {manifest.version} ({manifest.architecture}, {manifest.input_size} px)",
        "device": str(handler.device),
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.machine(),
        "input": f"{args.image_size}x{args.image_size} PNG",
        "rows": rows,
    }
    print(f"{report['model']} on {report['device']}, {threads} threads, inputs {report['input']}")
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
