"""End to end in headless Chromium: sign in, upload, watch the AI result arrive without a reload.

Run in a pytest process of its own (``-m browser``): Playwright's event loop upsets async tests
that follow it in the same process.
"""

import time

import pytest
from playwright.sync_api import expect

from tests.conftest import png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

expect.set_options(timeout=30_000)


def sign_in(page, stack, username, password):
    """Through the login page; a clinician lands on the worklist, then opens the image list."""
    page.goto(f"{stack.base_url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_contain_text("Worklist")
    page.goto(f"{stack.base_url}/images/")
    expect(page.locator("h1")).to_contain_text("Images")


def canvas_painting(page) -> str:
    """What the viewer's canvas shows, once anything it was asked to redraw has been painted."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return page.evaluate("() => document.querySelector('#viewer canvas').toDataURL()")


def test_a_clinician_uploads_and_sees_the_result_appear_without_a_reload(stack, live_demo, browser_context, tmp_path):
    watcher = browser_context.new_page()
    sign_in(watcher, stack, "clinician", live_demo["password"])
    expect(watcher.locator("#live")).to_have_attribute("data-state", "live")
    watcher.evaluate("window.__sameDocument = true")

    uploader = browser_context.new_page()
    uploader.goto(f"{stack.base_url}/upload/")
    opacity, clear = tmp_path / "opacity.png", tmp_path / "clear.png"
    opacity.write_bytes(png_bytes(opacity=True, seed=41, size=384))
    clear.write_bytes(png_bytes(opacity=False, seed=42, size=384))
    uploader.set_input_files("#files", [str(opacity), str(clear)])
    started = time.monotonic()
    uploader.click("#upload-form button[type=submit]")
    expect(uploader.locator(".messages")).to_contain_text("2 images uploaded")

    rows = watcher.locator("#images tbody tr[data-image]")
    expect(rows).to_have_count(2)
    for row in (rows.nth(0), rows.nth(1)):
        expect(row.locator("[data-role=status]")).to_have_text("done")
    elapsed = time.monotonic() - started
    findings = sorted(rows.locator("[data-role=finding]").all_inner_texts())
    assert findings[0].startswith("no_finding") and findings[1].startswith("round_opacity")
    assert watcher.evaluate("window.__sameDocument") is True  # no reload happened
    print(f"\nbrowser upload of 2 → both results on the open list page: {elapsed * 1000:.0f} ms")

    # the uploader's own list page (reached by redirect) shows them too, and the image page the result
    expect(uploader.locator("#images [data-role=status]").first).to_have_text("done")
    uploader.locator("#images tbody tr[data-image] a").first.click()
    expect(uploader.locator(".bars")).to_contain_text("round_opacity")
    expect(uploader.locator(".badge")).to_contain_text("demo model, not for diagnosis")
    expect(uploader.locator("figure#viewer")).to_have_attribute("data-ready", "1")  # the image is painted
    toggle = uploader.locator("#heatmap-toggle")
    expect(toggle).to_be_visible()  # still shown once the viewer is set up: the heatmap PNG loaded
    expect(toggle).not_to_be_checked()
    plain = canvas_painting(uploader)
    uploader.check("#heatmap-toggle")  # the Grad-CAM overlay over the image
    assert canvas_painting(uploader) != plain
    uploader.screenshot(path=str(stack.logs / "image-page.png"), full_page=True)


def test_another_hospitals_clinician_sees_none_of_it(stack, live_demo, browser_context, tmp_path):
    outsider = browser_context.new_page()
    sign_in(outsider, stack, "clinician-b", live_demo["password"])
    expect(outsider.locator("#live")).to_have_attribute("data-state", "live")

    other_context = browser_context.browser.new_context()
    try:
        member = other_context.new_page()
        sign_in(member, stack, "clinician", live_demo["password"])
        image = tmp_path / "scan.png"
        image.write_bytes(png_bytes(seed=43))
        member.goto(f"{stack.base_url}/upload/")
        member.set_input_files("#files", str(image))
        member.click("#upload-form button[type=submit]")
        expect(member.locator("#images [data-role=status]").first).to_have_text("done")
        image_url = member.locator("#images tbody tr[data-image] a").first.get_attribute("href")
    finally:
        other_context.close()
    expect(outsider.locator("#images tbody tr[data-image]")).to_have_count(0)
    response = outsider.goto(f"{stack.base_url}{image_url}")
    assert response.status == 404


def test_pages_run_under_the_content_security_policy_without_violations(stack, live_demo, browser_context):
    page = browser_context.new_page()
    violations = []
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))
    sign_in(page, stack, "clinician", live_demo["password"])
    expect(page.locator("#live")).to_have_attribute("data-state", "live")  # the live script ran
    page.goto(f"{stack.base_url}/upload/")
    page.goto(f"{stack.base_url}/accounts/two-factor/")
    expect(page.locator(".qr svg")).to_be_visible()
    page.goto(f"{stack.base_url}/api/v1/docs/")
    expect(page.locator("#swagger-ui .title").first).to_contain_text("Sightline API")
    assert violations == []


# every state the viewer's heatmap goes through, and whether "computing…" was on screen in it
RECORD_HEATMAP_STATES = """
window.__heatmapStates = [];
new MutationObserver(function (changes) {
  changes.forEach(function (change) {
    var note = change.target.querySelector(".heatmap-state");
    window.__heatmapStates.push(change.target.dataset.heatmap + (note && !note.hidden ? ":shown" : ":hidden"));
  });
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-heatmap"]});
"""


def test_the_viewer_shows_computing_until_the_heatmap_arrives_over_the_websocket(stack, live_demo, browser_context):
    import json

    import requests
    from celery import Celery

    from tests.e2e.test_api_live import token

    headers = {"Authorization": f"Bearer {token(stack, 'clinician', live_demo['password'])}"}
    response = requests.post(
        f"{stack.base_url}/api/v1/images/",
        headers=headers,
        files={"file": ("scan.png", png_bytes(opacity=True, seed=71), "image/png")},
        timeout=30,
    )
    image_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()[
        "status"
    ] not in ("done", "failed"):
        assert time.monotonic() < deadline, "the read did not finish"
        time.sleep(0.2)

    # the worker stops taking interactive work (Celery's own remote control), so the heatmap the
    # viewer asks for waits in the queue until the test has seen "computing…", however fast the
    # worker would have been
    control = Celery("viewer-test", broker=stack.redis_url, set_as_current=False).control
    assert control.cancel_consumer("interactive", reply=True, timeout=10), "the stack's worker did not answer"
    try:
        page = browser_context.new_page()
        frames: list[str] = []
        page.on("websocket", lambda socket: socket.on("framereceived", lambda frame: frames.append(frame)))
        page.add_init_script(RECORD_HEATMAP_STATES)
        page.goto(f"{stack.base_url}/accounts/login/?next=/images/{image_id}/")
        page.fill("#id_username", "clinician")
        page.fill("#id_password", live_demo["password"])
        page.click("button[type=submit]")
        expect(page.locator("figure#viewer")).to_have_attribute("data-ready", "1")
        expect(page.locator("figure#viewer")).to_have_attribute("data-heatmap", "computing")
        expect(page.locator("#heatmap-state")).to_be_visible()  # the read made none: the viewer asked, and says so
        expect(page.locator("#heatmap-toggle")).to_be_hidden()
    finally:
        assert control.add_consumer("interactive", reply=True, timeout=10), "the stack's worker did not answer"
    toggle = page.locator("#heatmap-toggle")
    expect(toggle).to_be_visible()  # the overlay arrived and its controls with it
    expect(page.locator("#heatmap-state")).to_be_hidden()
    states = page.evaluate("window.__heatmapStates")
    assert "computing:shown" in states, states
    assert states[-1] == "ready:hidden", states
    pushed = [json.loads(frame) for frame in frames if isinstance(frame, str)]
    assert any(m.get("type") == "heatmap.ready" and m.get("image") == image_id for m in pushed), pushed
    plain = canvas_painting(page)
    page.check("#heatmap-toggle")
    assert canvas_painting(page) != plain  # the Grad-CAM overlay over the image
