"""The canvas image viewer (templates/static/js/viewer.js) in headless Chromium, under a strict CSP.

No Django here: a thread serves tests/e2e/viewer_fixture.html, copies of the static files and generated images,
and the tests read what the viewer painted back from the canvas. Run with ``-m browser`` like the other browser tests.
"""

from __future__ import annotations

import math
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

expect.set_options(timeout=10_000)

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "templates" / "static"
FIXTURE = Path(__file__).with_name("viewer_fixture.html")
CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"

W, H = 256, 192  # the fixture's data-width / data-height
ROW = 96.5  # image row sampled (any row: the images vary along x only)
# Raw values along x: -1000 HU left, a 40 HU band in the middle, +1000 HU right.
AIR, BAND, BONE = 40.5, 112.5, 220.5  # columns inside each region (pixel centres)
HEATED_BAND = 144.5  # the band again, under the heatmap (red for x >= 128)


def hu_column(x: int) -> float:
    return -1000.0 if x < 96 else 40.0 if x < 160 else 1000.0


def windowed(value: float, centre: float, width: float) -> int:
    """What viewer.js paints for a value: floor((v - (C - W/2)) * 256 / W), clamped to 0..255."""
    return max(0, min(255, math.floor((value - (centre - width / 2)) * 256 / width)))


def gradient(x: float) -> int:
    """The red channel of colour.png (and grey of scan.png) at column x."""
    return round(int(x) * 255 / (W - 1))


def build_site(root: Path) -> None:
    html = FIXTURE.read_text()
    assert html.count("../../templates/static/") == 3
    (root / "viewer.html").write_text(html.replace("../../templates/static/", "/static/"))
    for name in ("js/viewer.js", "css/viewer.css", "css/site.css"):
        (root / "static" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STATIC / name, root / "static" / name)
    ramp = np.array([gradient(x) for x in range(W)], dtype=np.uint8)
    Image.fromarray(np.tile(ramp, (H, 1)), "L").save(root / "scan.png")
    colour = np.zeros((H, W, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = ramp, 100, 255 - ramp
    Image.fromarray(colour, "RGB").save(root / "colour.png")
    heat = np.zeros((H, W, 4), dtype=np.uint8)
    heat[:, W // 2 :] = (255, 0, 0, 255)
    Image.fromarray(heat, "RGBA").save(root / "heatmap.png")
    values = np.tile(np.array([hu_column(x) for x in range(W)], dtype="<f4"), (H, 1))
    (root / "pixels.f32").write_bytes(values.astype("<f4").tobytes())
    (root / "bad.html").write_text(
        '<!doctype html><p style="color: red">inline style</p><script>window.inlineRan = true</script>'
    )


class StrictHandler(SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-site")
    build_site(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(StrictHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class Viewer:
    """One page of the fixture, with the console errors and CSP violations it produced."""

    def __init__(self, context, url: str):
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.add_init_script(
            "window.__csp = [];"
            "document.addEventListener('securitypolicyviolation',"
            " e => window.__csp.push(e.effectiveDirective + ' ' + e.blockedURI));"
        )
        self.page.goto(url)

    def ready(self, figure: str) -> Viewer:
        expect(self.page.locator(figure)).to_have_attribute("data-ready", "1")
        return self

    def canvas(self, figure: str):
        return self.page.locator(f"{figure} canvas")

    def settle(self) -> None:
        """Two animation frames: anything an event asked to redraw has been painted."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def geometry(self, figure: str) -> dict:
        return self.page.evaluate(
            """sel => { const c = document.querySelector(sel + ' canvas');
                        return {w: c.width, h: c.height, cw: c.clientWidth, ch: c.clientHeight,
                                window: c.dataset.window, zoom: Number(c.dataset.zoom)}; }""",
            figure,
        )

    def pixel(self, figure: str, x: float, y: float) -> list[int]:
        """RGBA of the canvas backing store at device pixel (x, y)."""
        return self.page.evaluate(
            """([sel, x, y]) => Array.from(document.querySelector(sel + ' canvas').getContext('2d')
                                            .getImageData(Math.floor(x), Math.floor(y), 1, 1).data)""",
            [figure, x, y],
        )

    def at_image(self, figure: str, x: float, y: float = ROW, zoom: float = 1.0) -> list[int]:
        """The canvas pixel over image point (x, y), with the image fitted and centred at this zoom."""
        geo = self.geometry(figure)
        s = min(geo["w"] / W, geo["h"] / H) * zoom
        return self.pixel(figure, geo["w"] / 2 + (x - W / 2) * s, geo["h"] / 2 + (y - H / 2) * s)

    def window(self, figure: str) -> tuple[float, float]:
        centre, width = self.geometry(figure)["window"].split("/")
        return float(centre), float(width)

    def drag(self, figure: str, start: tuple[float, float], by: tuple[float, float], button="left", shift=False):
        box = self.canvas(figure).bounding_box()
        x, y = box["x"] + start[0], box["y"] + start[1]
        mouse = self.page.mouse
        mouse.move(x, y)
        if shift:
            self.page.keyboard.down("Shift")
        mouse.down(button=button)
        mouse.move(x + by[0], y + by[1], steps=8)
        mouse.up(button=button)
        if shift:
            self.page.keyboard.up("Shift")
        self.settle()

    def assert_clean(self) -> None:
        assert self.page.evaluate("window.__csp") == []
        assert self.errors == []


def grey(rgba: list[int]) -> int:
    assert rgba[3] == 255 and rgba[0] == rgba[1] == rgba[2], rgba
    return rgba[0]


def close(actual: int, expected: int, tolerance: int = 2) -> bool:
    return abs(actual - expected) <= tolerance


def assert_bands(viewer: Viewer, centre: float, width: float, zoom: float = 1.0) -> None:
    for column in (AIR, BAND, BONE):
        painted = grey(viewer.at_image("#viewer", column, zoom=zoom))
        expected = windowed(hu_column(int(column)), centre, width)
        assert close(painted, expected), (column, painted, expected, centre, width)


def test_it_fits_the_image_and_paints_the_raw_values_through_the_default_window(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer")
    canvas = viewer.canvas("#viewer")
    expect(canvas).to_have_attribute("data-window", "40/400")
    expect(canvas).to_have_attribute("data-zoom", "1")
    expect(viewer.page.locator("#viewer .viewer-status")).to_have_text("W 400 / L 40 · 100%")
    assert grey(viewer.at_image("#viewer", AIR)) == 0
    assert close(grey(viewer.at_image("#viewer", BAND)), 128, 1)
    assert grey(viewer.at_image("#viewer", BONE)) == 255
    # fitted by height, centred, aspect kept: opaque just inside the image, transparent letterbox just outside it
    geo = viewer.geometry("#viewer")
    s = min(geo["w"] / W, geo["h"] / H)
    assert geo["w"] == geo["cw"] and geo["h"] == geo["ch"] and geo["h"] < geo["w"] * H / W
    left, right = geo["w"] / 2 - W / 2 * s, geo["w"] / 2 + W / 2 * s
    assert viewer.pixel("#viewer", left + 2, geo["h"] / 2)[3] == 255
    assert viewer.pixel("#viewer", right - 2, geo["h"] / 2)[3] == 255
    assert viewer.pixel("#viewer", left - 2, geo["h"] / 2)[3] == 0
    assert viewer.pixel("#viewer", right + 2, geo["h"] / 2)[3] == 0
    assert viewer.pixel("#viewer", geo["w"] / 2, 1)[3] == 255 and viewer.pixel("#viewer", geo["w"] / 2, geo["h"] - 1)[3]
    pressed = viewer.page.locator("#viewer [data-preset][aria-pressed=true]")
    expect(pressed).to_have_count(1)
    expect(pressed).to_have_attribute("data-preset", "soft")
    expect(viewer.page.locator("#viewer-png [data-preset]")).to_have_count(0)
    viewer.assert_clean()


def test_presets_rewindow_the_raw_values_and_reset_restores_the_default(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer")
    canvas = viewer.canvas("#viewer")
    viewer.page.click("#viewer [data-preset=lung]")
    expect(canvas).to_have_attribute("data-window", "-600/1500")
    expect(viewer.page.locator("#viewer .viewer-status")).to_have_text("W 1500 / L -600 · 100%")
    air = grey(viewer.at_image("#viewer", AIR))
    assert 40 < air < 80 and close(air, windowed(-1000, -600, 1500))  # air is dark grey now, not black
    assert grey(viewer.at_image("#viewer", BONE)) == 255
    assert_bands(viewer, -600, 1500)
    expect(viewer.page.locator("#viewer [data-preset=lung]")).to_have_attribute("aria-pressed", "true")
    for preset, window in [("bone", (400, 1800)), ("brain", (40, 80)), ("soft", (40, 400))]:
        viewer.page.click(f"#viewer [data-preset={preset}]")
        expect(canvas).to_have_attribute("data-window", f"{window[0]}/{window[1]}")
        assert_bands(viewer, *window)
    viewer.page.click("#viewer [data-preset=bone]")
    expect(canvas).to_have_attribute("data-window", "400/1800")
    viewer.page.click("#viewer [data-action=reset]")
    expect(canvas).to_have_attribute("data-window", "40/400")
    viewer.settle()
    assert_bands(viewer, 40, 400)
    viewer.assert_clean()


def test_right_drag_and_shift_drag_set_window_width_and_centre(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer")
    geo = viewer.geometry("#viewer")
    middle = (geo["cw"] / 2, geo["ch"] / 2)
    viewer.drag("#viewer", middle, (60, 30), button="right")  # right: wider, down: higher centre
    centre, width = viewer.window("#viewer")
    assert width > 400 and centre > 40, (centre, width)
    assert viewer.geometry("#viewer")["zoom"] == 1  # windowing does not zoom or pan
    assert_bands(viewer, centre, width)
    band = grey(viewer.at_image("#viewer", BAND))
    assert band < 120  # a higher centre paints 40 HU darker

    viewer.drag("#viewer", middle, (-120, -90), shift=True)  # shift+left-drag windows too: narrower, lower centre
    centre2, width2 = viewer.window("#viewer")
    assert width2 < width and centre2 < centre, (centre2, width2)
    assert width2 < 400 and centre2 < 40
    assert_bands(viewer, centre2, width2)
    assert grey(viewer.at_image("#viewer", BAND)) > 140  # 40 HU is now above the centre: brighter
    # the change is proportional to the distance dragged, the same along both axes
    assert math.isclose((width - 400) / 60, (width - width2) / 120, rel_tol=0.05)
    assert math.isclose((centre - 40) / 30, (centre - centre2) / 90, rel_tol=0.05)
    expect(viewer.page.locator("#viewer [data-preset][aria-pressed=true]")).to_have_count(0)
    viewer.page.keyboard.press("0")  # the canvas has focus since the drag
    expect(viewer.canvas("#viewer")).to_have_attribute("data-window", "40/400")
    viewer.assert_clean()


def test_the_wheel_zooms_about_the_cursor_and_reset_restores_the_fit(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer-png")
    canvas = viewer.canvas("#viewer-png")
    canvas.scroll_into_view_if_needed()
    geo = viewer.geometry("#viewer-png")
    s0 = min(geo["w"] / W, geo["h"] / H)
    cursor = (geo["w"] / 2 + (64.5 - W / 2) * s0, geo["h"] / 2)  # over column 64 of the gradient
    centre = (geo["w"] / 2, geo["h"] / 2)
    under_cursor = viewer.pixel("#viewer-png", *cursor)[0]
    under_centre = viewer.pixel("#viewer-png", *centre)[0]
    assert close(under_cursor, gradient(64)) and close(under_centre, gradient(128))

    box = canvas.bounding_box()
    viewer.page.mouse.move(box["x"] + cursor[0], box["y"] + cursor[1])
    viewer.page.mouse.wheel(0, -240)
    expect(canvas).not_to_have_attribute("data-zoom", "1")
    viewer.settle()
    zoom = viewer.geometry("#viewer-png")["zoom"]
    assert 1.2 < zoom <= 20
    expect(viewer.page.locator("#viewer-png .viewer-status")).to_contain_text(f"· {round(zoom * 100)}%")
    # the point under the cursor stayed put; the one under the centre moved towards it
    assert close(viewer.pixel("#viewer-png", *cursor)[0], under_cursor)
    expected_centre = W / 2 + (64.5 - W / 2) * (1 - 1 / zoom)
    now_under_centre = viewer.pixel("#viewer-png", *centre)[0]
    assert close(now_under_centre, gradient(expected_centre), 3), (now_under_centre, expected_centre)
    assert now_under_centre < under_centre - 10

    viewer.page.mouse.wheel(0, 100_000)  # far out: clamped at 0.1
    expect(canvas).to_have_attribute("data-zoom", "0.1")
    viewer.page.click("#viewer-png [data-action=reset]")
    expect(canvas).to_have_attribute("data-zoom", "1")
    expect(canvas).to_have_attribute("data-window", "128/256")
    viewer.settle()
    assert close(viewer.pixel("#viewer-png", *cursor)[0], under_cursor)
    assert close(viewer.pixel("#viewer-png", *centre)[0], under_centre)
    viewer.assert_clean()


def test_a_burst_of_events_is_painted_once_on_the_next_animation_frame(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer")
    during, after, zoom = viewer.page.evaluate(
        """() => new Promise(resolve => {
            const canvas = document.querySelector('#viewer canvas'), ctx = canvas.getContext('2d');
            const drawImage = ctx.drawImage;
            let calls = 0;
            ctx.drawImage = function (...args) { calls += 1; return drawImage.apply(this, args); };
            for (let i = 0; i < 10; i++) {
                canvas.dispatchEvent(new WheelEvent('wheel', {deltaY: -20, clientX: 10, cancelable: true}));
            }
            const during = calls;
            requestAnimationFrame(() => requestAnimationFrame(() => resolve([during, calls, canvas.dataset.zoom])));
        })"""
    )
    assert (during, after) == (0, 1)  # nothing painted inside the handlers; one frame for the ten events
    assert math.isclose(float(zoom), math.exp(0.002 * 20) ** 10)
    viewer.assert_clean()


def test_left_drag_pans_and_the_keyboard_zooms_moves_and_resets(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer-png")
    canvas = viewer.canvas("#viewer-png")
    canvas.scroll_into_view_if_needed()
    geo = viewer.geometry("#viewer-png")
    start = (geo["w"] / 2 - 100, geo["h"] / 2)
    before = viewer.pixel("#viewer-png", *start)[0]
    viewer.drag("#viewer-png", start, (150, 0))
    assert close(viewer.pixel("#viewer-png", start[0] + 150, start[1])[0], before)  # the image moved with the mouse
    assert viewer.pixel("#viewer-png", *start)[0] < before - 20
    assert viewer.geometry("#viewer-png")["window"] == "128/256" and viewer.geometry("#viewer-png")["zoom"] == 1

    expect(canvas).to_be_focused()
    viewer.page.keyboard.press("0")
    viewer.settle()
    assert close(viewer.pixel("#viewer-png", *start)[0], before)
    viewer.page.keyboard.press("+")
    expect(canvas).to_have_attribute("data-zoom", "1.25")
    viewer.page.keyboard.press("-")
    viewer.page.keyboard.press("-")
    viewer.settle()
    assert math.isclose(viewer.geometry("#viewer-png")["zoom"], 0.8)
    viewer.page.keyboard.press("0")
    expect(canvas).to_have_attribute("data-zoom", "1")
    viewer.settle()
    centre = (geo["w"] / 2, geo["h"] / 2)
    at_centre = viewer.pixel("#viewer-png", *centre)[0]
    viewer.page.keyboard.press("ArrowRight")  # moves the image right: the centre shows a darker column
    viewer.settle()
    assert viewer.pixel("#viewer-png", *centre)[0] < at_centre - 5
    viewer.assert_clean()


def test_the_heatmap_is_hidden_until_toggled_and_follows_the_opacity_and_the_zoom(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer")
    page = viewer.page
    expect(page.locator("#heatmap-opacity")).to_have_value("50")
    assert close(grey(viewer.at_image("#viewer", HEATED_BAND)), 128, 1)  # off: the grey image
    page.check("#heatmap-toggle")
    viewer.settle()
    red, green, blue, alpha = viewer.at_image("#viewer", HEATED_BAND)
    assert close(red, 191, 3) and close(green, 64, 3) and close(blue, 64, 3) and alpha == 255  # half and half
    page.locator("#heatmap-opacity").fill("100")
    viewer.settle()
    assert viewer.at_image("#viewer", HEATED_BAND) == [255, 0, 0, 255]
    assert close(grey(viewer.at_image("#viewer", BAND)), 128, 1)  # the heatmap is transparent left of x=128
    page.locator("#heatmap-opacity").fill("0")
    viewer.settle()
    assert close(grey(viewer.at_image("#viewer", HEATED_BAND)), 128, 1)
    # drawn with the image's transform: after zooming it still covers exactly the right half
    page.locator("#heatmap-opacity").fill("100")
    viewer.canvas("#viewer").focus()
    page.keyboard.press("+")
    page.keyboard.press("+")
    expect(viewer.canvas("#viewer")).to_have_attribute("data-zoom", "1.5625")
    viewer.settle()
    assert viewer.at_image("#viewer", 130.5, zoom=1.5625) == [255, 0, 0, 255]
    assert close(grey(viewer.at_image("#viewer", 125.5, zoom=1.5625)), 128, 1)
    page.uncheck("#heatmap-toggle")
    viewer.settle()
    assert close(grey(viewer.at_image("#viewer", 130.5, zoom=1.5625)), 128, 1)
    viewer.assert_clean()


def test_a_png_only_figure_has_no_presets_and_windows_each_channel(browser_context, site):
    viewer = Viewer(browser_context, f"{site}/viewer.html").ready("#viewer-png")
    page = viewer.page
    expect(page.locator("#viewer-png [data-preset]")).to_have_count(0)
    expect(page.locator("#viewer-png #heatmap-toggle")).to_have_count(0)
    canvas = viewer.canvas("#viewer-png")
    expect(canvas).to_have_attribute("data-window", "128/256")
    expect(page.locator("#viewer-png .viewer-status")).to_have_text("W 256 / L 128 · 100%")
    for column in (10.5, 64.5, 200.5):  # C128 W256 shows the PNG as it is
        assert viewer.at_image("#viewer-png", column) == [gradient(column), 100, 255 - gradient(column), 255]

    canvas.scroll_into_view_if_needed()
    geo = viewer.geometry("#viewer-png")
    viewer.drag("#viewer-png", (geo["cw"] / 2, geo["ch"] / 2), (-150, 40), button="right")  # narrower, higher
    centre, width = viewer.window("#viewer-png")
    assert width < 256 and centre > 128, (centre, width)
    for column in (10.5, 64.5, 200.5):
        painted = viewer.at_image("#viewer-png", column)
        source = (gradient(column), 100, 255 - gradient(column))
        expected = [windowed(v, centre, width) for v in source]
        assert all(close(p, e) for p, e in zip(painted[:3], expected, strict=True)), (column, painted, expected)
    assert viewer.at_image("#viewer-png", 64.5)[1] < 80  # green 100 sits below the new centre: darker
    viewer.assert_clean()


def test_the_backing_store_follows_the_device_pixel_ratio(chromium, site):
    context = chromium.new_context(device_scale_factor=2, viewport={"width": 1000, "height": 700})
    try:
        viewer = Viewer(context, f"{site}/viewer.html").ready("#viewer")
        geo = viewer.geometry("#viewer")
        assert geo["w"] == 2 * geo["cw"] and geo["h"] == 2 * geo["ch"]
        assert close(geo["ch"], 0.75 * 700, 1)  # the height is capped at 75vh
        assert_bands(viewer, 40, 400)
        viewer.assert_clean()
    finally:
        context.close()


def test_the_fixture_server_enforces_the_csp(browser_context, site):
    """The checks above mean something only if inline style and script really are refused here."""
    viewer = Viewer(browser_context, f"{site}/bad.html")
    expect(viewer.page.locator("p")).to_have_text("inline style")
    assert viewer.page.evaluate("window.inlineRan") is None
    directives = {violation.split()[0] for violation in viewer.page.evaluate("window.__csp")}
    assert {"style-src-attr", "script-src-elem"} <= directives, directives
    assert viewer.errors
