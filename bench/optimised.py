"""Optimised variants benchmark: int8 (onnxruntime static QDQ, per channel) against fp32 (the same
graph unquantised, and eager PyTorch), on this CPU, made and measured exactly as ``optimise_model``
and the registration task make and measure them (``workers/engine/optimise.py``).

    .venv/bin/python bench/optimised.py [--models demo,resnet50] [--json bench/optimised.json] [--quick]

Per model: the parent (eager PyTorch, fp32), ``onnx-fp32`` and ``onnx-int8`` derived packages;
the bytes each runs and its package, images/s at batch 1 and at a bulk batch (the fastest of a few
warm passes), and against the parent and against each other: top-label agreement, mean and worst
probability difference, accuracy where labels are known. The demo model (trained on the demo
generator) is calibrated and measured on the generator's images, with seeds of their own; a
torchvision model with random weights (resnet18/resnet50 at 224 px) measures size and speed
only: its agreement says nothing, its outputs being near-uniform.

No Django, no servers: the engine alone, in this process, with the process's cores as threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INPUT_SIZE = 224
CALIBRATION_IMAGES = {"demo": 256, "torchvision": 64}  # the random nets' ranges need no more
HOLDOUT_IMAGES = {"demo": 512, "torchvision": 128}
QUICK_SHARE = 4  # --quick: a quarter of the images
SINGLE_REPEATS = 20  # batch-1 calls timed; the median counts
_MB = 1e6
RATIO_DIGITS = 3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parent_package(key: str, workdir: Path) -> Path:
    from workers.engine import training
    from workers.engine.package import write_package

    if key == "demo":
        for built in (
            ROOT / "var" / "models" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip",
            ROOT / "var" / "test-cache" / f"{training.DEMO_NAME}-{training.DEMO_VERSION}.zip",
        ):
            if built.exists():
                return built
        path = workdir / "demo.zip"
        training.train_demo_model(path)
        return path
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(key, weights=None, num_classes=2)
    path = workdir / f"bench-{key}-1.0.0.zip"
    write_package(
        path,
        model.state_dict(),
        name=f"bench-{key}",
        version="1.0.0",
        architecture=key,
        input_size=RANDOM_INPUT_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=("a", "b"),
        description="benchmark only: random weights",
    )
    return path


def single_image_per_second(handler, images) -> float:
    import statistics

    import torch

    one = torch.from_numpy(images[:1].copy())
    handler.infer(one)  # warm
    samples = []
    for _ in range(SINGLE_REPEATS):
        started = time.perf_counter()
        handler.infer(one)
        samples.append(time.perf_counter() - started)
    return round(1 / statistics.median(samples), 1)


def bench_model(key: str, workdir: Path, quick: bool) -> dict:
    import torch

    from core.model_package import read_manifest
    from workers.engine import optimise
    from workers.engine.handler import Handler

    kind = "demo" if key == "demo" else "torchvision"
    share = QUICK_SHARE if quick else 1
    package = parent_package(key, workdir)
    manifest = read_manifest(package)
    cpu = torch.device("cpu")
    parent = Handler.initialize(package, manifest.weights_sha256, device=cpu)
    size = manifest.input_size
    calibration, _ = optimise.demo_images(optimise.DEMO_CALIBRATION_SEED, CALIBRATION_IMAGES[kind] // share, size)
    holdout, labels = optimise.demo_images(optimise.DEMO_HOLDOUT_SEED, HOLDOUT_IMAGES[kind] // share, size)
    known = labels if kind == "demo" else None

    derived: dict = {}
    made: dict = {}
    for transform in optimise.TRANSFORMS:
        made[transform] = optimise.optimise(
            parent, workdir / f"{key}-{transform}.zip", transform=transform, calibration=calibration
        )
        derived[transform] = Handler.initialize(made[transform].path, manifest.weights_sha256, device=cpu)
    parent_measured = optimise.measure(parent, holdout)
    against_parent = {
        transform: optimise.evaluate(
            handler,
            parent,
            holdout,
            known,
            derived_package=made[transform].path,
            parent_package=package,
            holdout=f"demo generator, seed {optimise.DEMO_HOLDOUT_SEED}",
            parent_measured=parent_measured,
        )
        for transform, handler in derived.items()
    }
    int8_vs_fp32 = optimise.evaluate(
        derived["onnx-int8"],
        derived["onnx-fp32"],
        holdout,
        known,
        derived_package=made["onnx-int8"].path,
        parent_package=made["onnx-fp32"].path,
    )
    rows = {"eager fp32 (parent)": {**against_parent["onnx-fp32"]["parent"], "agreement": 1.0}}
    rows["eager fp32 (parent)"]["images_per_second_batch1"] = single_image_per_second(parent, holdout)
    for transform, evaluation in against_parent.items():
        row = {
            **evaluation["derived"],
            "agreement": evaluation["agreement"],
            "mean_abs_diff": evaluation["mean_abs_diff"],
            "max_abs_diff": evaluation["max_abs_diff"],
            "seconds_to_make": made[transform].seconds,
            "images_per_second_batch1": single_image_per_second(derived[transform], holdout),
        }
        rows[transform] = row
    return {
        "model": key,
        "architecture": manifest.architecture,
        "input_size": size,
        "weights": "trained (demo generator)" if kind == "demo" else "random: size and speed only",
        "calibration_images": len(calibration),
        "holdout_images": len(holdout),
        "batch": optimise.EVAL_BATCH,
        "rows": rows,
        "int8_vs_fp32": {
            "size_ratio": int8_vs_fp32["size_ratio"],
            "agreement": int8_vs_fp32["agreement"],
            "mean_abs_diff": int8_vs_fp32["mean_abs_diff"],
            "max_abs_diff": int8_vs_fp32["max_abs_diff"],
            "speed_ratio": round(
                int8_vs_fp32["derived"]["images_per_second"] / int8_vs_fp32["parent"]["images_per_second"], RATIO_DIGITS
            ),
            "int8_accuracy": int8_vs_fp32["derived"].get("accuracy"),
            "fp32_accuracy": int8_vs_fp32["parent"].get("accuracy"),
        },
    }


def print_report(report: dict) -> None:
    print(f"\nOptimised variants on {report['machine']['cpu']} ({report['machine']['threads']} threads):")
    for entry in report["models"]:
        print(
            f"\n{entry['model']} ({entry['architecture']}, {entry['input_size']} px, {entry['weights']}); "
            f"calibrated on {entry['calibration_images']}, measured on {entry['holdout_images']} held-out images"
        )
        header = f"{'variant':<22} {'backend':<7} {'model MB':>9} {'pkg MB':>7} {'img/s b1':>9} "
        header += f"{'img/s b' + str(entry['batch']):>10} {'agree':>7} {'mean diff':>10} {'worst':>8} {'acc':>7}"
        print(header)
        for name, row in entry["rows"].items():
            accuracy = f"{row['accuracy']:.3f}" if "accuracy" in row else "-"
            print(
                f"{name:<22} {row['backend']:<7} {row['model_bytes'] / _MB:>9.1f} {row['package_bytes'] / _MB:>7.1f} "
                f"{row['images_per_second_batch1']:>9.1f} {row['images_per_second']:>10.1f} "
                f"{row['agreement']:>7.1%} {row.get('mean_abs_diff', 0):>10.2g} {row.get('max_abs_diff', 0):>8.2g} "
                f"{accuracy:>7}"
            )
        versus = entry["int8_vs_fp32"]
        print(
            f"int8 vs onnx fp32: size x{versus['size_ratio']:.3f}, agreement {versus['agreement']:.1%}, "
            f"mean diff {versus['mean_abs_diff']:.2g}, worst {versus['max_abs_diff']:.2g}, "
            f"speed x{versus['speed_ratio']:.2f} at batch {entry['batch']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,resnet50", help="comma-separated: demo, resnet18, resnet50")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "optimised.json")
    parser.add_argument("--quick", action="store_true", help="a quarter of the images (a smoke run)")
    parser.add_argument("--print", type=Path, metavar="JSON", help="print an earlier run's tables, run nothing")
    args = parser.parse_args()
    if args.print:
        print_report(json.loads(args.print.read_text()))
        return 0
    from workers.engine.handler import configure_cpu_threads

    threads = configure_cpu_threads()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sightline-optimised-") as folder:
        models = [bench_model(key, Path(folder), args.quick) for key in args.models.split(",") if key]
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "threads": threads,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "quick": args.quick,
        "models": models,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
