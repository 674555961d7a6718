"""Browser screening benchmark (issue 17): the screen's latency per image in headless Chromium, on
ONNX Runtime Web's WebAssembly backend, single-threaded and with threads on a page served
cross-origin isolated, and what the page downloads (the model, the runtime).

    .venv/bin/python bench/screening_browser.py [--images 50] [--json bench/screening_browser.json]
                                                [--package var/test-cache/sightline-screen-1.0.0.zip]

A benchmark, not a test: it prints a table and writes JSON. It serves the platform's own static
files (templates/static: screen.js and the vendored runtime) and the screening package's model.onnx
from a small static server of its own, once plainly and once with COOP/COEP headers (the only way a
page gets SharedArrayBuffer, which the runtime's threads need), and runs screen.js there, as the
upload page does, on generated PNGs (workers/engine/synthetic.py). Latency is screen.js's own:
from the File to the preliminary finding (decode, RGB, Pillow's BILINEAR, the model, the quality
gate), first image left out (the runtime's warm-up), median and 95th percentile. The package is built
when it is not there (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import statistics
import sys
import threading
import zipfile
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STATIC = ROOT / "templates" / "static"
ORT_DIR = STATIC / "vendor" / "onnxruntime-web"
PACKAGE = ROOT / "var" / "test-cache" / "sightline-screen-1.0.0.zip"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
IMAGE_SIZE = 512  # a typical downsized film export; the resize's cost grows with it
WARM_UP = 1  # the first run compiles the runtime's kernels: left out of the latency
ISOLATED_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}

HARNESS = """<!doctype html><html><head><meta charset="utf-8"><title>screen harness</title></head><body>
<script type="application/json" id="sightline-screening">{config}</script>
<script src="/static/js/screen.js"></script></body></html>"""


def page_config(manifest: dict, model_bytes: int) -> dict:
    """What screening_page_config hands the page, for the harness's own URLs."""
    return {
        "version_id": 0,
        "label": f"{manifest['name']} · {manifest['version']}",
        "model_url": "/model.onnx",
        "model_bytes": model_bytes,
        "model_sha256": manifest["runtime"]["onnx_sha256"],  # checked by the page, as on the platform's
        "input_size": manifest["input_size"],
        "mean": manifest["mean"],
        "std": manifest["std"],
        "labels": manifest["labels"],
        "negative_label": manifest["labels"][0],
        "reference": manifest.get("metrics", {}).get("reference", {}),
        "ort": {
            "script": "/static/vendor/onnxruntime-web/ort.wasm.min.js",
            "mjs": "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.mjs",
            "wasm": "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm",
        },
        "route_negatives": False,
        "negative_threshold": 0.95,
    }


def read_package(package: Path) -> tuple[dict, bytes]:
    with zipfile.ZipFile(package) as archive:
        return json.loads(archive.read("manifest.json")), archive.read("model.onnx")


class _Handler(SimpleHTTPRequestHandler):
    """templates/static under /static/, the harness page and the model; COOP/COEP when isolated."""

    pages: dict[str, tuple[bytes, str]] = {}
    isolated = False

    def log_message(self, *args):  # quiet
        pass

    def end_headers(self):
        if self.isolated:
            for name, value in ISOLATED_HEADERS.items():
                self.send_header(name, value)
        super().end_headers()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path in self.pages:
            body, kind = self.pages[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not self.path.startswith("/static/"):
            self.send_error(404)
            return
        self.path = self.path[len("/static") :]
        super().do_GET()


SimpleHTTPRequestHandler.extensions_map.update({".mjs": "text/javascript", ".wasm": "application/wasm"})


@contextmanager
def harness(config: dict, model: bytes, *, isolated: bool):
    """A static server on a free port for one harness page: yields its base URL."""
    handler = type("Handler", (_Handler,), {"isolated": isolated})
    handler.pages = {
        "/": (HARNESS.format(config=json.dumps(config)).encode(), "text/html; charset=utf-8"),
        "/model.onnx": (model, "application/octet-stream"),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(STATIC)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# In the page: each file (base64) becomes a File and goes through SightlineScreen.screen.
SCREEN_ALL = """async ([files, options]) => {
  const screener = await window.SightlineScreen.load();
  const found = [];
  for (const [name, kind, data] of files) {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    found.push(await screener.screen(new File([bytes], name, {type: kind}), options));
  }
  return {found, threads: ort.env.wasm.numThreads, isolated: window.crossOriginIsolated, load_ms: screener.load_ms};
}"""


def screen_in_browser(page, url: str, files: list[tuple[str, str, bytes]], options: dict | None = None) -> dict:
    """Open the harness (or any page with screen.js and its config) and screen ``files``."""
    if url:
        page.goto(url)
    payload = [[name, kind, base64.b64encode(data).decode()] for name, kind, data in files]
    return page.evaluate(SCREEN_ALL, [payload, options or {}])


def generated_pngs(count: int, size: int = IMAGE_SIZE, seed: int = 5) -> list[tuple[str, str, bytes]]:
    from workers.engine import synthetic

    rng = np.random.default_rng(seed)
    return [(f"{i}.png", "image/png", synthetic.render_png(rng, size, bool(i % 2))) for i in range(count)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def measure(images: int, package: Path) -> dict:
    from playwright.sync_api import sync_playwright

    manifest, model = read_package(package)
    config = page_config(manifest, len(model))
    files = generated_pngs(images + WARM_UP)
    runtime = {name: (ORT_DIR / name).stat().st_size for name in ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs")}
    wasm = (ORT_DIR / "ort-wasm-simd-threaded.wasm").read_bytes()
    report = {
        "images": images,
        "image_size": IMAGE_SIZE,
        "model": f"{manifest['name']} {manifest['version']}",
        "model_bytes": len(model),
        "model_gzip_bytes": len(gzip.compress(model)),
        "runtime_bytes": sum(runtime.values()) + len(wasm),
        "runtime_gzip_bytes": sum(len(gzip.compress((ORT_DIR / n).read_bytes())) for n in runtime)
        + len(gzip.compress(wasm)),
        "modes": {},
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for mode, isolated in (("wasm, 1 thread", False), ("wasm, threads (cross-origin isolated)", True)):
                with harness(config, model, isolated=isolated) as url:
                    page = browser.new_page()
                    answer = screen_in_browser(page, url, files)
                    page.close()
                latencies = [item["latency_ms"] for item in answer["found"][WARM_UP:]]
                report["modes"][mode] = {
                    "threads": answer["threads"],
                    "cross_origin_isolated": answer["isolated"],
                    "load_ms": answer["load_ms"],
                    "median_ms": statistics.median(latencies),
                    "p95_ms": percentile(latencies, 0.95),
                    "first_ms": answer["found"][0]["latency_ms"],
                }
        finally:
            browser.close()
    return report


def ensure_package(package: Path) -> Path:
    if package.exists():
        return package
    from workers.engine.screening import build_screening_package

    package.parent.mkdir(parents=True, exist_ok=True)
    return build_screening_package(package.parent).package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--package", type=Path, default=PACKAGE)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "screening_browser.json")
    args = parser.parse_args()
    report = measure(args.images, ensure_package(args.package))
    mib = 1024 * 1024
    print(
        f"\nbrowser screen, {report['model']}, {args.images} PNGs of {IMAGE_SIZE}x{IMAGE_SIZE} px (headless Chromium)"
    )
    print(f"{'mode':<40} {'threads':>7} {'load ms':>8} {'first ms':>9} {'median ms':>10} {'p95 ms':>7}")
    for mode, row in report["modes"].items():
        print(
            f"{mode:<40} {row['threads']:>7} {row['load_ms']:>8} {row['first_ms']:>9} "
            f"{row['median_ms']:>10.1f} {row['p95_ms']:>7.1f}"
        )
    print(
        f"model over the wire: {report['model_bytes'] / mib:.2f} MiB ({report['model_gzip_bytes'] / mib:.2f} gzipped)"
    )
    print(
        f"runtime (js + mjs + wasm): {report['runtime_bytes'] / mib:.2f} MiB "
        f"({report['runtime_gzip_bytes'] / mib:.2f} gzipped); both cached by the browser after the first page"
    )
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
