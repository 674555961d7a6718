"""The CUDA path, checked once on a lent GPU machine: one short script, no Django, no network.

Run it where a GPU is (the device tool's machine has torch but none of the web stack):

    python3 bench/gpu_check.py --package var/test-cache/sightline-demo-1.0.0.zip --out "$OUT"

It checks what the CPU-only CI cannot: the engine loads on CUDA and agrees with the CPU, Grad-CAM
runs there, the model cache evicts on a CUDA host without raising, NVML reads the GPU, and it
measures the forward pass (eager fp32, fp16 autocast as the handler runs it, and torch.compile)
at the batch sizes the worker runs. Every check prints PASS or FAIL; the exit code counts FAILs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.model_package import read_manifest  # noqa: E402
from workers.engine import synthetic  # noqa: E402
from workers.engine.backpressure import nvml_sampler  # noqa: E402
from workers.engine.cache import HandlerCache  # noqa: E402
from workers.engine.gradcam import heatmaps_for  # noqa: E402
from workers.engine.handler import Handler, build_model  # noqa: E402

RESULTS: dict = {"checks": {}, "throughput": []}


def check(name: str):
    def wrap(fn):
        try:
            detail = fn()
            RESULTS["checks"][name] = {"ok": True, "detail": detail}
            print(f"PASS {name}: {detail}")
        except Exception as exc:  # noqa: BLE001 — every failure is reported, the rest go on
            RESULTS["checks"][name] = {"ok": False, "detail": repr(exc)}
            print(f"FAIL {name}: {exc!r}")
            traceback.print_exc()
        return fn

    return wrap


def images(count: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    return [synthetic.render_png(rng, 256, bool(i % 2)) for i in range(count)]


def rate(fn, batch: torch.Tensor, seconds: float = 2.0) -> float:
    for _ in range(3):
        fn(batch)
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        done += batch.shape[0]
    torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    sha = read_manifest(args.package).weights_sha256
    RESULTS["torch"] = torch.__version__
    RESULTS["cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    print("torch", torch.__version__, "device", RESULTS["cuda"])
    inputs = images(8)
    state: dict = {}

    @check("engine on CUDA agrees with the CPU")
    def _():
        cpu = Handler.initialize(args.package, sha, device=torch.device("cpu"))
        cuda = Handler.initialize(args.package, sha, device=torch.device("cuda"))
        state["cpu"], state["cuda"] = cpu, cuda
        a, b = cpu.predict(inputs), cuda.predict(inputs)
        worst = max(abs(x.top_probability - y.top_probability) for x, y in zip(a, b, strict=True))
        assert [x.top_label for x in a] == [y.top_label for y in b], "top labels differ"
        assert worst < 0.02, f"probabilities differ by {worst}"
        return f"8 images, same labels, max |Δp| {worst:.4f}"

    @check("Grad-CAM on CUDA matches the CPU")
    def _():
        layer = state["cuda"].manifest.gradcam_layer or "layer3"
        on_cpu = heatmaps_for(state["cpu"], inputs[:3], layer)
        on_cuda = heatmaps_for(state["cuda"], inputs[:3], layer)
        worst = max(float(np.abs(x - y).max()) for x, y in zip(on_cpu, on_cuda, strict=True))
        assert worst < 0.05, f"heatmaps differ by {worst}"
        return f"max |Δ| {worst:.4f}"

    @check("the model cache evicts on a CUDA host without raising")
    def _():
        cache = HandlerCache(budget_bytes=1)
        cache.get("a", lambda: Handler.initialize(args.package, sha, device=torch.device("cuda")))
        cache.get("b", lambda: Handler.initialize(args.package, sha, device=torch.device("cuda")))
        assert cache.keys() == ["b"], cache.keys()
        return "evicted 'a', kept 'b'"

    @check("NVML reads the GPU")
    def _():
        sampler = nvml_sampler(0)
        assert sampler is not None, "no NVML sampler"
        try:
            value = sampler()
        finally:
            sampler.close()
        assert value is not None and 0 <= value <= 100
        return f"utilisation {value}%"

    @check("forward-pass throughput (img/s)")
    def _():
        rows = []
        for arch in ("resnet18", "resnet50"):
            model = build_model(arch, 2).eval().cuda().to(memory_format=torch.channels_last)
            compiled = torch.compile(model)

            def eager(x, model=model):
                with torch.inference_mode():
                    return model(x)

            def fp16(x, model=model):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    return model(x)

            def comp(x, compiled=compiled):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    return compiled(x)

            for batch in (1, 8, 32):
                x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
                row = {"model": arch, "batch": batch}
                for name, fn in (("eager_fp32", eager), ("fp16_autocast", fp16), ("compiled_fp16", comp)):
                    row[name] = round(rate(fn, x, 1.0), 1)
                rows.append(row)
                print("   ", row)
        RESULTS["throughput"] = rows
        return f"{len(rows)} rows"

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    failures = sum(not c["ok"] for c in RESULTS["checks"].values())
    print(f"{len(RESULTS['checks']) - failures} passed, {failures} failed")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
