"""The vendored ONNX Runtime Web (issue 17): the files are the pinned release's, as the Makefile's
vendor-onnxruntime-web target wrote them, with their licence, and no page loads anything from a CDN."""

import hashlib
import re
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)
VENDOR = ROOT / "templates" / "static" / "vendor" / "onnxruntime-web"
# the runtime, its loader, its WebAssembly, and the source map the runtime names (collectstatic's
# manifest storage refuses a file naming a map it cannot find)
RUNTIME_FILES = {"ort.wasm.min.js", "ort.wasm.min.js.map", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"}
# script, module, stylesheet or fetch addresses on another host; the one documentation link the
# runtime prints in a warning (web.dev's cross-origin isolation guide) is text, not something loaded
URL = re.compile(r"""(?:src|href|import|fetch|wasmPaths)\s*[=(:]\s*["'`](?:https?:)?//""")
KNOWN_CDNS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "esm.sh", "skypack.dev")


def sums() -> dict[str, str]:
    lines = (VENDOR / "SHA256SUMS").read_text().splitlines()
    return {name.strip(): digest for digest, name in (line.split(None, 1) for line in lines if line.strip())}


def test_every_runtime_file_is_listed_and_matches_its_checksum():
    listed = sums()
    assert set(listed) == RUNTIME_FILES
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, f"{name} is not the vendored one"


def test_the_vendored_version_is_the_one_the_makefile_pins():
    pinned = re.search(r"^ORT_WEB_VERSION\s*=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert pinned, "the Makefile pins no ORT_WEB_VERSION"
    assert (VENDOR / "VERSION").read_text().strip() == pinned.group(1)


def test_its_licence_ships_with_it():
    licence = (VENDOR / "LICENSE").read_text()
    assert "MIT" in licence and "Permission is hereby granted" in licence


def test_no_page_script_or_template_loads_from_a_cdn():
    sources = [*(ROOT / "templates" / "static").rglob("*.js"), *(ROOT / "templates" / "static").rglob("*.mjs")]
    sources += list((ROOT / "templates").rglob("*.html"))
    assert any(path.name == "screen.js" for path in sources)
    for path in sources:
        text = path.read_text(errors="replace")
        assert not URL.search(text), f"{path.relative_to(ROOT)} loads something from another host"
        for host in KNOWN_CDNS:
            assert host not in text, f"{path.relative_to(ROOT)} names {host}"
