"""End to end in headless Chromium: the clinician workspace (worklist, canvas viewer, review and sign-off).

Everything runs on the real stack (Daphne, a Celery worker with the demo model, a private Redis). Images arrive
through the API as a PACS bridge would send them; the browser signs in through the login page and is never
reloaded where the page is meant to update itself. Run in a pytest process of its own (``-m browser``), like
tests/e2e/test_browser.py.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from playwright.sync_api import expect
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from accounts.models import Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from recognition.models import Image, Study
from tests.conftest import PASSWORD, png_bytes
from tests.unit.test_dicom import ct_dataset, ct_pixels, make_dataset, to_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

expect.set_options(timeout=30_000)
READ_SECONDS = 90
LABELS = ("no_finding", "round_opacity")  # the demo model's labels
WATCH_PAGE = (  # CSP violations, as the page itself sees them
    "window.__csp = [];"
    "document.addEventListener('securitypolicyviolation',"
    " e => window.__csp.push(e.effectiveDirective + ' ' + e.blockedURI));"
)


# -- through the API, as an integration would ----------------------------------------------------------------------


def api_headers(stack, username: str, password: str) -> dict:
    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": username, "password": password}, timeout=10
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access']}"}


def upload(stack, headers: dict, data: bytes, name: str, *, status: int = 201, **fields) -> dict:
    response = requests.post(
        f"{stack.base_url}/api/v1/images/",
        headers=headers,
        files={"file": (name, data, "application/octet-stream")},
        data=fields,
        timeout=30,
    )
    assert response.status_code == status, response.text
    return response.json()


def wait_for_read(stack, headers: dict, image_id: int) -> dict:
    """The image as the API shows it once its AI read is finished (done, or failed: then the test fails)."""
    deadline = time.monotonic() + READ_SECONDS
    while True:
        image = requests.get(f"{stack.base_url}/api/v1/images/{image_id}/", headers=headers, timeout=10).json()
        if image["status"] in ("done", "failed"):
            assert image["status"] == "done", image
            return image
        assert time.monotonic() < deadline, f"image {image_id} still {image['status']} after {READ_SECONDS} s"
        time.sleep(0.2)


def unreadable_dicom(**attrs) -> bytes:
    """Valid DICOM in an encoding no decoder here reads: the platform keeps it, marked unprocessable."""
    ds = ct_dataset(**attrs)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3"])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def multiframe_ct(frames: int = 3, **attrs) -> bytes:
    pixels = np.stack([(ct_pixels() + 100 * index) % 4096 for index in range(frames)]).astype(np.uint16)
    base = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    return to_bytes(make_dataset(pixels, bits=12, **(base | attrs)))


# -- in the browser ------------------------------------------------------------------------------------------------


def sign_in(context, stack, username: str, password: str):
    """A page signed in through the real login form; it lands where the role starts."""
    page = context.new_page()
    page.goto(f"{stack.base_url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{stack.base_url}/worklist/")
    return page


def settle(page) -> None:
    """Two animation frames: whatever an event asked the viewer to redraw has been painted."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def painted(page) -> str:
    settle(page)
    return page.evaluate("() => document.querySelector('#viewer canvas').toDataURL()")


def shown(text: str) -> re.Pattern:
    """A status or review cell's whole text, in whatever case the choice's label uses ("Done", "signed off")."""
    return re.compile(rf"^\s*{re.escape(text)}\s*$", re.IGNORECASE)


def heading(page):
    return page.locator("h1")


def row(page, study_id: int):
    return page.locator(f'#worklist tbody tr[data-study="{study_id}"]')


def selected_study(page) -> str:
    selected = page.locator("#worklist tbody tr.selected")
    expect(selected).to_have_count(1)
    return selected.get_attribute("data-study")


# -- the tests -----------------------------------------------------------------------------------------------------


def test_the_worklist_updates_rows_live_and_moves_with_the_keyboard(stack, live_demo, browser_context):
    headers = api_headers(stack, "clinician", live_demo["password"])
    suffix = uuid.uuid4().hex[:6]
    old_accession, new_accession = f"WL-OLD-{suffix}", f"WL-NEW-{suffix}"
    # the older study's only image is one the platform keeps but cannot read: listed, with no AI finding
    refused = upload(stack, headers, unreadable_dicom(AccessionNumber=old_accession), "old.dcm", status=415)
    old_first_image = refused["error"]["detail"]["image"]
    old_study = Study.objects.get(accession_number=old_accession).pk
    # the newer study is read and done
    new_image = upload(stack, headers, png_bytes(opacity=False, seed=51), "new.png", accession_number=new_accession)
    wait_for_read(stack, headers, new_image["id"])
    new_study = new_image["study"]["id"]

    page = sign_in(browser_context, stack, "clinician", live_demo["password"])
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    rows = page.locator("#worklist tbody tr[data-study]")
    expect(rows).to_have_count(2)
    assert [rows.nth(0).get_attribute("data-study"), rows.nth(1).get_attribute("data-study")] == [
        str(new_study),
        str(old_study),
    ]  # newest first
    expect(row(page, old_study).locator("[data-role=status]")).to_have_text(shown("unprocessable"))
    expect(row(page, old_study).locator("[data-role=finding]")).to_have_text("—")
    expect(row(page, old_study).locator("td").nth(4)).to_have_text("1")
    expect(row(page, new_study).locator("[data-role=status]")).to_have_text(shown("done"))
    expect(page.locator("#worklist-new")).to_be_hidden()
    page.evaluate("window.__sameDocument = true")

    # a readable image arrives for the older study, which is on the page: its row catches up by itself
    upload(stack, headers, png_bytes(opacity=True, seed=52), "old-2.png", accession_number=old_accession)
    expect(row(page, old_study).locator("[data-role=status]")).to_have_text(shown("done"), timeout=READ_SECONDS * 1000)
    expect(row(page, old_study).locator("[data-role=finding]")).to_contain_text("round_opacity")
    expect(row(page, old_study).locator("td").nth(4)).to_have_text("2")
    expect(page.locator("#worklist-new")).to_be_hidden()  # not a new study

    # a study the page does not show yet: a notice, no reshuffled rows
    upload(stack, headers, png_bytes(opacity=False, seed=53), "other.png", accession_number=f"WL-OTHER-{suffix}")
    expect(page.locator("#worklist-new")).to_be_visible()
    expect(rows).to_have_count(2)
    assert page.evaluate("window.__sameDocument") is True  # none of it reloaded the page

    # j / k move the selection; Enter opens the selected study (not the first row's) at its first image
    expect(page.locator("#worklist tbody tr.selected")).to_have_count(0)
    page.keyboard.press("j")
    assert selected_study(page) == str(new_study)
    page.keyboard.press("j")
    assert selected_study(page) == str(old_study)
    page.keyboard.press("k")
    assert selected_study(page) == str(new_study)
    page.keyboard.press("j")
    assert selected_study(page) == str(old_study)
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{stack.base_url}/images/{old_first_image}/")
    expect(heading(page)).to_contain_text("1 of 2 in the study")
    expect(page.locator(".unprocessable")).to_contain_text("not readable here")
    expect(page.locator("#next-image")).to_be_visible()


def test_the_viewer_windows_zooms_and_overlays_a_ct_and_walks_a_multiframe_series(stack, live_demo, browser_context):
    headers = api_headers(stack, "clinician", live_demo["password"])
    ct = upload(stack, headers, to_bytes(ct_dataset(WindowCenter=40, WindowWidth=400)), "ct.dcm")
    read = wait_for_read(stack, headers, ct["id"])
    (result,) = read["results"]
    # the demo model explains its finding with Grad-CAM, made when the viewer asks, never by the read
    assert result["has_heatmap"] is False and result["heatmap_status"] == "none"

    page = sign_in(browser_context, stack, "clinician", live_demo["password"])
    page.goto(f"{stack.base_url}/images/{ct['id']}/")
    viewer, canvas = page.locator("figure#viewer"), page.locator("figure#viewer canvas")
    expect(viewer).to_have_attribute("data-ready", "1")
    expect(canvas).to_have_attribute("data-window", "40/400")  # the file's own window
    expect(canvas).to_have_attribute("data-zoom", "1")
    expect(page.locator("#viewer [data-preset]")).to_have_count(4)

    soft = painted(page)
    page.click("#viewer [data-preset=lung]")
    expect(canvas).to_have_attribute("data-window", "-600/1500")
    expect(page.locator("#viewer [data-preset=lung]")).to_have_attribute("aria-pressed", "true")
    assert painted(page) != soft  # the raw values were painted through the new window

    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -240)
    expect(canvas).not_to_have_attribute("data-zoom", "1")
    assert float(canvas.get_attribute("data-zoom")) > 1

    plain = painted(page)
    expect(page.locator("#heatmap-toggle")).not_to_be_checked()
    page.check("#heatmap-toggle")
    overlaid = painted(page)
    assert overlaid != plain  # the Grad-CAM heatmap loaded and is drawn over the image
    page.uncheck("#heatmap-toggle")
    assert painted(page) == plain

    expect(page.locator(".disclaimer")).to_contain_text("AI assistance, not a diagnosis")
    expect(page.locator("#finding .model")).to_contain_text(
        f"{result['model']} v{result['model_version_serial']} · {result['model_version']}"  # the serial beside it
    )
    expect(page.locator(".bars li")).to_have_count(len(LABELS))
    expect(page.locator(".bars li.top .label")).to_have_text(result["top_label"])

    # a three-frame file is three images of one series, walked in frame order
    first = upload(stack, headers, multiframe_ct(3, SeriesNumber=2), "cine.dcm")
    frames = list(
        Image.objects.filter(study_id=first["study"]["id"]).order_by("frame_number").values_list("id", flat=True)
    )
    assert len(frames) == 3 and frames[0] == first["id"]
    for image_id in frames:  # finished reads: no page reloads itself for a result mid-walk
        wait_for_read(stack, headers, image_id)
    page.goto(f"{stack.base_url}/images/{first['id']}/")
    expect(heading(page)).to_contain_text("1 of 3 in the study")
    expect(page.locator("#previous-image")).to_have_count(0)
    for position, image_id in enumerate(frames[1:], start=2):
        page.click("#next-image")
        expect(page).to_have_url(f"{stack.base_url}/images/{image_id}/")
        expect(heading(page)).to_contain_text(f"{position} of 3 in the study")
        expect(page.locator("#previous-image")).to_be_visible()
        expect(page.locator(".side dl")).to_contain_text(f"frame {position}")
        expect(page.locator("figure#viewer")).to_have_attribute("data-ready", "1")
    expect(page.locator("#next-image")).to_have_count(0)  # the last frame
    page.click("#previous-image")
    expect(page).to_have_url(f"{stack.base_url}/images/{frames[1]}/")


def test_a_clinician_corrects_signs_off_and_amends_and_a_viewer_only_reads(stack, live_demo, browser_context):
    headers = api_headers(stack, "clinician", live_demo["password"])
    image = upload(stack, headers, png_bytes(opacity=True, seed=61), "chest.png", accession_number="REV-1")
    ai_label = wait_for_read(stack, headers, image["id"])["results"][0]["top_label"]
    corrected = next(label for label in LABELS if label != ai_label)
    study_id = image["study"]["id"]

    page = sign_in(browser_context, stack, "clinician", live_demo["password"])
    worklist = browser_context.new_page()  # a second tab keeps the worklist open
    worklist.goto(f"{stack.base_url}/worklist/")
    expect(worklist.locator("#live")).to_have_attribute("data-state", "live")
    expect(row(worklist, study_id).locator("[data-role=review]")).to_have_text(shown("unreviewed"))

    page.bring_to_front()  # the worklist stays open behind it; a background tab gets no animation frames
    page.goto(f"{stack.base_url}/images/{image['id']}/")
    form = page.locator(".review-form")
    history = page.locator("ol.review-history li.review-entry")
    expect(history).to_have_count(0)
    form.get_by_label("Corrected label", exact=True).check()
    form.locator("select[name=label]").select_option(corrected)
    form.locator("textarea[name=comment]").fill("Clear lung fields; the opacity is a nipple shadow.")
    form.locator("button[name=action][value=save]").click()
    expect(page.locator(".messages")).to_contain_text("Draft saved")
    expect(history).to_have_count(1)
    expect(history.first).to_have_class(re.compile(r"\bdraft\b"))
    expect(history.first).to_contain_text(f"Corrected label: {corrected}")
    expect(history.first).to_contain_text("nipple shadow")
    expect(row(worklist, study_id).locator("[data-role=review]")).to_have_text(shown("in review"))  # live

    # the form holds the draft; signing it off signs that very entry
    expect(form.locator("input[name=verdict][value=correct]")).to_be_checked()
    expect(form.locator("select[name=label]")).to_have_value(corrected)
    draft_id = history.first.get_attribute("data-review")
    form.locator("button[name=action][value=sign_off]").click()
    expect(page.locator(".messages")).to_contain_text("Review signed off")
    expect(history).to_have_count(1)
    expect(history.first).to_have_class(re.compile(r"\bsigned\b"))
    expect(history.first).not_to_have_class(re.compile(r"\bdraft\b"))
    assert history.first.get_attribute("data-review") == draft_id
    expect(row(worklist, study_id).locator("[data-role=review]")).to_have_text(shown("signed off"))  # live
    signed_text = history.first.inner_text()

    # amending: a new signed entry on top, the signed one untouched below it
    expect(form.locator("legend")).to_contain_text("Amend the signed review")
    form.get_by_label("Agree", exact=True).check()
    form.locator("button[name=action][value=sign_off]").click()
    expect(page.locator(".messages")).to_contain_text("Review signed off")
    expect(history).to_have_count(2)
    newest, older = history.nth(0), history.nth(1)
    expect(newest).to_have_class(re.compile(r"\bsigned\b"))
    expect(newest).to_contain_text("Agree")
    expect(newest).to_contain_text(f"amends #{draft_id}")
    assert newest.get_attribute("data-review") != draft_id
    assert older.get_attribute("data-review") == draft_id
    expect(older).to_have_class(re.compile(r"\bsigned\b"))
    assert older.inner_text() == signed_text  # its verdict, label, comment and signature as they were
    expect(older).to_contain_text("nipple shadow")
    worklist.reload()
    expect(row(worklist, study_id).locator("[data-role=review]")).to_have_text(shown("signed off"))

    # someone who may only look sees the history, and no form to change it
    membership_grant(
        tenant=Tenant.objects.get(slug="demo-general"),
        user=user_get_or_create(username="viewer", password=PASSWORD),
        role=Role.VIEWER,
    )
    viewer_context = browser_context.browser.new_context()
    viewer_context.set_default_timeout(30_000)
    try:
        reader = sign_in(viewer_context, stack, "viewer", PASSWORD)
        reader.goto(f"{stack.base_url}/images/{image['id']}/")
        expect(reader.locator("figure#viewer")).to_have_attribute("data-ready", "1")
        expect(reader.locator("ol.review-history li.review-entry")).to_have_count(2)
        expect(reader.locator("ol.review-history li.review-entry").nth(1)).to_contain_text("nipple shadow")
        expect(reader.locator(".review-form")).to_have_count(0)
        expect(reader.locator("button[name=action]")).to_have_count(0)
    finally:
        viewer_context.close()


def test_the_worklist_and_viewer_run_without_csp_violations_or_console_errors(stack, live_demo, browser_context):
    headers = api_headers(stack, "clinician", live_demo["password"])
    ct = upload(stack, headers, to_bytes(ct_dataset(AccessionNumber="CSP-1")), "ct.dcm")
    png = upload(stack, headers, png_bytes(opacity=True, seed=71), "scan.png", accession_number="CSP-2")
    for image in (ct, png):
        wait_for_read(stack, headers, image["id"])

    errors: list[str] = []
    browser_context.add_init_script(WATCH_PAGE)
    page = sign_in(browser_context, stack, "clinician", live_demo["password"])
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("console", lambda message: message.text.startswith("viewer:") and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))

    response = page.goto(f"{stack.base_url}/worklist/")
    assert "script-src" in response.headers.get("content-security-policy", "")  # a policy to violate
    expect(page.locator("#live")).to_have_attribute("data-state", "live")  # the worklist script ran
    expect(page.locator("#worklist tbody tr[data-study]")).to_have_count(2)
    page.evaluate("window.__sameDocument = true")
    upload(stack, headers, png_bytes(opacity=False, seed=72), "more.png", accession_number="CSP-2")
    expect(row(page, png["study"]["id"]).locator("td").nth(4)).to_have_text("2")  # a live row re-rendered
    assert page.evaluate("window.__sameDocument") is True
    page.keyboard.press("j")
    expect(page.locator("#worklist tbody tr.selected")).to_have_count(1)
    assert page.evaluate("window.__csp") == []

    for image in (ct, png):
        response = page.goto(f"{stack.base_url}/images/{image['id']}/")
        assert "script-src" in response.headers.get("content-security-policy", "")
        expect(page.locator("figure#viewer")).to_have_attribute("data-ready", "1")  # the viewer script ran
        page.check("#heatmap-toggle")
        page.locator("#heatmap-opacity").fill("80")
        settle(page)
        if image is ct:
            page.click("#viewer [data-preset=bone]")
            expect(page.locator("#viewer canvas")).to_have_attribute("data-window", "400/1800")
        assert page.evaluate("window.__csp") == [], image
    assert errors == []


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def agreement_cells(page, stack) -> dict[str, str]:
    """The agreement page's version total row: reviewed count and share, by version text."""
    page.goto(f"{stack.base_url}/agreement/")
    rows = page.locator("table tr.total")
    return {rows.nth(i).locator("td").first.inner_text(): rows.nth(i).inner_text() for i in range(rows.count())}


def test_from_upload_to_signed_off_reviews_and_the_agreement_table(stack, live_demo, browser_context, tmp_path):
    """The whole clinician path in the browser: upload a DICOM and a PNG on the upload page, watch both
    findings arrive in the worklist, window the CT and toggle its heatmap, agree with one finding and correct
    the other, sign both off, and see the hospital admin's agreement table change. Screenshots of the worklist
    and the viewer are saved in test-artifacts/."""
    admin = membership_grant(
        tenant=Tenant.objects.get(slug="demo-general"),
        user=user_get_or_create(username="agreement-admin", password=PASSWORD),
        role=Role.TENANT_ADMIN,
    )
    admin_context = browser_context.browser.new_context()
    admin_page = admin_context.new_page()
    admin_page.goto(f"{stack.base_url}/accounts/login/")
    admin_page.fill("#id_username", admin.user.username)
    admin_page.fill("#id_password", PASSWORD)
    admin_page.click("button[type=submit]")
    admin_page.goto(f"{stack.base_url}/agreement/")
    expect(admin_page.locator("h1")).to_contain_text("Agreement per model version")
    assert admin_page.locator("table tr.total").count() == 0  # nothing signed off yet

    page = sign_in(browser_context, stack, "clinician", live_demo["password"])
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    worklist = page
    uploader = browser_context.new_page()
    uploader.goto(f"{stack.base_url}/upload/")
    ct, png = tmp_path / "ct.dcm", tmp_path / "chest.png"
    ct.write_bytes(to_bytes(ct_dataset(AccessionNumber=f"FLOW-CT-{uuid.uuid4().hex[:6]}")))
    png.write_bytes(png_bytes(opacity=True, seed=77, size=256))
    uploader.set_input_files("#files", [str(ct), str(png)])
    uploader.click("#upload-form button[type=submit]")
    expect(uploader.locator(".messages")).to_contain_text("2 images uploaded")

    worklist.bring_to_front()
    rows = worklist.locator("#worklist tbody tr[data-study]")
    expect(worklist.locator("#worklist-new")).to_be_visible()  # studies this page did not show yet
    worklist.goto(f"{stack.base_url}/worklist/")
    expect(rows).to_have_count(2)
    for index in range(2):  # both findings arrive (live: the rows re-render when the reads end)
        expect(rows.nth(index).locator("[data-role=status]")).to_have_text(shown("done"), timeout=READ_SECONDS * 1000)
        expect(rows.nth(index).locator("[data-role=finding]")).not_to_have_text("—")
    ARTIFACTS.mkdir(exist_ok=True)
    worklist.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

    ct_study = Study.objects.get(modality="CT", accession_number__startswith="FLOW-CT-")
    png_study = Study.objects.exclude(pk=ct_study.pk).get()
    verdicts = {ct_study.pk: "agree", png_study.pk: "correct"}
    for study in (ct_study, png_study):
        row(worklist, study.pk).click()
        worklist.keyboard.press("Enter")
        expect(worklist.locator("figure#viewer")).to_have_attribute("data-ready", "1")
        canvas = worklist.locator("#viewer canvas")
        if study is ct_study:
            expect(canvas).to_have_attribute("data-window", "40/400")
            before = painted(worklist)
            worklist.locator("[data-preset=bone]").click()
            expect(canvas).to_have_attribute("data-window", "400/1800")
            assert painted(worklist) != before
            worklist.check("#heatmap-toggle")
            worklist.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
        form = worklist.locator(".review-form")
        if verdicts[study.pk] == "agree":
            form.get_by_label("Agree", exact=True).check()
        else:
            ai_label = worklist.locator(".bars li.top .label").inner_text()
            form.get_by_label("Corrected label", exact=True).check()
            form.locator("select[name=label]").select_option(next(label for label in LABELS if label != ai_label))
        form.locator("button[name=action][value=sign_off]").click()
        expect(worklist.locator(".messages")).to_contain_text("Review signed off")
        worklist.goto(f"{stack.base_url}/worklist/")
        expect(row(worklist, study.pk).locator("[data-role=review]")).to_have_text(shown("signed off"))

    for name in ("worklist.png", "viewer.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
    totals = agreement_cells(admin_page, stack)
    assert len(totals) == 1, totals
    (total,) = totals.values()
    assert "50%" in total and "2" in total  # one agreed, one corrected, of two signed off
    admin_context.close()
