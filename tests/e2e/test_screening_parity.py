"""The browser's screen sees what the server sees (issue 17): for 200 generated PNG and JPEG files
of several sizes, grey and colour, screen.js in headless Chromium (the vendored ONNX Runtime Web
and the real screening package's model.onnx) against the server's preprocessing and the
server-side onnxruntime run of the same graph.

screen.js runs unchanged on a static page of the bench's (bench/screening_browser.py), which
serves templates/static and the model as the platform does; the page config is what
screening_page_config hands a page, for that server's URLs. Run with ``-m browser``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.screening_browser import CHROMIUM, CHROMIUM_ARGS, harness, page_config, read_package, screen_in_browser
from tests.screening_fixtures import screening_package  # noqa: F401  (the fixture)
from workers.engine import screening, synthetic

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FILES = 200
SIZES = (64, 97, 128, 181, 256, 300, 512)  # equal, up and down by odd factors, non-square below
MAX_TENSOR_DIFF = 0.02  # the bound, after normalisation
MIN_AGREEMENT = 0.99  # the bound on browser-vs-server labels
CHUNK = 25  # files per page call: each answers a 3×64×64 float tensor per file as JSON


def generated_files(count: int, seed: int = 17) -> list[tuple[str, str, bytes]]:
    """PNG and JPEG, grey and colour, square and not, half with the finding."""
    rng = np.random.default_rng(seed)
    files = []
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        grey = synthetic.render(rng, size, bool(index % 2))
        image = Image.fromarray(grey)
        if index % 3 == 1:  # colour: three channels that differ
            image = Image.fromarray(np.stack([grey, np.roll(grey, size // 7, axis=0), 255 - grey], axis=-1))
        if index % 5 == 2:
            image = image.resize((size, max(8, size * 2 // 3)), Image.Resampling.BICUBIC)  # not square
        kind = "JPEG" if index % 2 else "PNG"
        buffer = io.BytesIO()
        image.save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
        files.append((f"{index}.{kind.lower()}", f"image/{kind.lower()}", buffer.getvalue()))
    return files


def test_the_browser_tensor_and_label_match_the_servers_for_200_files(screening_package):  # noqa: F811
    from playwright.sync_api import sync_playwright

    manifest, model = read_package(screening_package)
    config = page_config(manifest, len(model))
    files = generated_files(FILES)
    assert {kind for _, kind, _ in files} == {"image/png", "image/jpeg"}
    server = screening.screen_images(model, [data for _, _, data in files])

    found = []
    with sync_playwright() as playwright, harness(config, model, isolated=False) as url:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            for start in range(0, FILES, CHUNK):
                found += screen_in_browser(page, "", files[start : start + CHUNK], {"tensor": True})["found"]
        finally:
            browser.close()

    assert [item["status"] for item in found] == ["screened"] * FILES
    worst, agree = 0.0, 0
    for (_, _, data), item, (probabilities, _logits) in zip(files, found, server, strict=True):
        want = screening.server_tensor(data, mean=manifest["mean"], std=manifest["std"])
        got = np.asarray(item["tensor"], dtype=np.float32).reshape(want.shape)
        worst = max(worst, float(np.abs(got - want).max()))
        agree += item["label"] == manifest["labels"][int(np.argmax(probabilities))]
    flagged = sum(bool(item["quality"]["flags"]) for item in found)
    print(
        f"\nbrowser vs server, {FILES} files: max |tensor diff| {worst:.4f}, labels agree {agree}/{FILES}, "
        f"quality gate flagged {flagged} (generated like the training set: few should be)"
    )
    assert worst <= MAX_TENSOR_DIFF
    assert agree / FILES >= MIN_AGREEMENT
