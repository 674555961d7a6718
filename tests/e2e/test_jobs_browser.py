"""End to end in headless Chromium: the bulk jobs page (/jobs/) on the real stack.

A clinician creates a job on the page, adds a zip (images and one entry that is not an image), starts it and
watches the progress arrive over the WebSocket without a reload; downloads the results CSV; retries the item
whose stored file could not be read once the file is back; and cancels a second, larger job part-way. Another
hospital's clinician sees none of it. Run in a pytest process of its own (``-m browser``), like
tests/e2e/test_browser.py.
"""

from __future__ import annotations

import base64
import csv
import io
import re
import time
import zipfile
from pathlib import Path

import pytest
from django.core.files.storage import default_storage
from playwright.sync_api import expect

from recognition.models import BatchItem, BatchJob, InferenceRequest, Result
from tests.conftest import png_bytes
from tests.e2e.test_workspace_browser import sign_in as workspace_sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

expect.set_options(timeout=30_000)
JOB_MS = 120_000  # a job's whole run on a loaded two-core machine, the worker's start-up included
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
IMAGES = 12  # in the first job's zip, beside one entry that is not an image
CANCEL_IMAGES = 240  # enough that the second job cannot be read before Cancel is pressed
TERMINAL = {BatchItem.Status.DONE, BatchItem.Status.FAILED, BatchItem.Status.CANCELLED}


def sign_in(context, stack, username: str, password: str):
    """A page signed in through the real login form; a clinician lands on the worklist, then opens the jobs."""
    page = workspace_sign_in(context, stack, username, password)
    page.goto(f"{stack.base_url}/jobs/")
    expect(page.locator("h1")).to_contain_text("Bulk jobs")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    return page


def zip_file(path: Path, count: int, first_seed: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number in range(count):
            archive.writestr(f"films/{number:03d}.png", png_bytes(seed=first_seed + number, size=128))
        archive.writestr("films/README.txt", b"not an image")
    return path


def whole(text: str) -> re.Pattern:
    return re.compile(rf"^\s*{re.escape(text)}\s*$")


def card(page, name: str):
    return page.locator("section.job", has=page.locator("h2", has_text=name))


DROP = """(card, [b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type: "application/zip"}));
  for (const kind of ["dragover", "drop"]) {
    card.dispatchEvent(new DragEvent(kind, {dataTransfer: transfer, bubbles: true, cancelable: true}));
  }
}"""


def create_job(page, name: str, archive: Path, *, drop: bool = False) -> int:
    """Create a job with the page's form, add the zip to it (chosen in the form, or dropped on the
    job), and wait (live) until the zip is unpacked."""
    page.fill("input[name=name]", name)
    page.click("form.inline-form button.primary")
    expect(page.locator(".messages")).to_contain_text(f"Job “{name}” created")
    job = card(page, name)
    expect(job.locator("[data-role=state]")).to_have_text("open")
    if drop:
        with page.expect_navigation():  # the page posts the dropped file through the job's Add form
            job.evaluate(DROP, [base64.b64encode(archive.read_bytes()).decode(), archive.name])
    else:
        job.locator("input[name=archive]").set_input_files(str(archive))
        job.get_by_role("button", name="Add").click()
    expect(page.locator(".messages")).to_contain_text("Archive received; it is being unpacked.")
    expect(job.locator("[data-role=unpacking]")).to_have_count(0, timeout=JOB_MS)  # removed by jobs.js when done
    return int(job.get_attribute("data-job"))


def counts_of(page, name: str) -> dict[str, int]:
    text = card(page, name).locator("[data-role=counts]").inner_text()
    return {state: int(count) for state, count in re.findall(r"([a-z]+) (\d+)", text)}


def download_rows(page, name: str) -> list[dict]:
    with page.expect_download() as info:
        card(page, name).get_by_role("link", name="Results (CSV)").click()
    download = info.value
    assert re.fullmatch(r"job-\d+\.csv", download.suggested_filename), download.suggested_filename
    return list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))


def test_a_zip_job_runs_live_on_the_jobs_page_retries_downloads_and_cancels(
    stack, live_demo, browser_context, tmp_path
):
    password = live_demo["password"]
    page = sign_in(browser_context, stack, "clinician", password)
    page.on("dialog", lambda dialog: dialog.accept())  # Cancel asks "Cancel this job?" first
    name = "ward seven overnight films"
    job_id = create_job(page, name, zip_file(tmp_path / "night.zip", IMAGES, first_seed=100))
    job = card(page, name)
    expect(job.locator("[data-role=summary]")).to_have_text(f"1 of {IMAGES + 1} finished")  # the text entry failed

    # One image's stored file goes missing before the job starts: the worker cannot read it, and fails it in words.
    items = BatchItem.objects.filter(job_id=job_id)
    assert items.count() == IMAGES + 1 and items.filter(status="pending").count() == IMAGES
    broken = items.filter(image__isnull=False).order_by("position").first()
    stored = Path(default_storage.path(broken.image.file.name))
    aside = stored.with_name(stored.name + ".aside")
    stored.rename(aside)

    # A second tab, open before the start and never reloaded, watches the job over the socket.
    watcher = browser_context.new_page()
    watcher.goto(f"{stack.base_url}/jobs/")
    expect(watcher.locator("#live")).to_have_attribute("data-state", "live")
    watched = card(watcher, name)
    expect(watched.locator("[data-role=state]")).to_have_text("open")
    watcher.evaluate("window.__sameDocument = true")

    with page.expect_navigation():  # the form posts, and redirects back to /jobs/
        job.get_by_role("button", name="Start").click()
    expect(job.locator("[data-role=state]")).not_to_have_text("open")
    page.evaluate("window.__sameDocument = true")
    started = time.monotonic()
    for shown in (page, watcher):
        box = card(shown, name)
        expect(box.locator("[data-role=state]")).to_have_text("finished", timeout=JOB_MS)
        expect(box.locator("[data-role=summary]")).to_have_text(f"{IMAGES + 1} of {IMAGES + 1} finished")
        expect(box.locator("[data-role=counts]")).to_have_text(whole(f"done {IMAGES - 1} failed 2"))
        expect(box.locator("[data-role=bar]")).to_have_attribute("value", str(IMAGES + 1))
        expect(box.locator("[data-role=bar]")).to_have_attribute("max", str(IMAGES + 1))
        expect(box.locator("[data-role=rate]")).to_contain_text("images/s")
        # the actions follow the state live: nothing to start or cancel, the failures can be retried
        expect(box.locator("[data-action=start]")).to_be_hidden()
        expect(box.locator("[data-action=cancel]")).to_be_hidden()
        expect(box.get_by_role("button", name="Retry failed")).to_be_visible()
    print(f"\n{IMAGES + 1} items read, shown finished on the page {time.monotonic() - started:.1f} s after the start")
    # The watcher's "open" became "finished" with no navigation: only the socket and jobs.js can have done it.
    assert watcher.evaluate("window.__sameDocument") is True
    assert page.evaluate("window.__sameDocument") is True

    rows = download_rows(page, name)
    assert len(rows) == IMAGES + 1
    assert [row["status"] for row in rows].count("done") == IMAGES - 1
    failed = {row["image"]: row["error"] for row in rows if row["status"] == "failed"}
    assert failed.keys() == {"", str(broken.image_id)}, failed  # the text entry has no image; the broken one has
    assert failed[str(broken.image_id)] == "the stored image could not be read"
    assert re.search(r"[a-z]{3,} [a-z]{3,}", failed[""]), failed  # why the text entry failed, in words
    assert all(row["top_label"] for row in rows if row["status"] == "done")

    # The file is back; Retry failed reads it again (the text entry has no image to retry and stays failed).
    aside.rename(stored)
    with page.expect_navigation():
        job.get_by_role("button", name="Retry failed").click()
    for shown in (page, watcher):
        box = card(shown, name)
        expect(box.locator("[data-role=counts]")).to_have_text(whole(f"done {IMAGES} failed 1"), timeout=JOB_MS)
        expect(box.locator("[data-role=state]")).to_have_text("finished")
        expect(box.locator("[data-role=summary]")).to_have_text(f"{IMAGES + 1} of {IMAGES + 1} finished")
    assert watcher.evaluate("window.__sameDocument") is True  # still the page opened before the first start
    rows = download_rows(page, name)
    assert len(rows) == IMAGES + 1 and [row["status"] for row in rows].count("done") == IMAGES
    (failed_row,) = [row for row in rows if row["status"] == "failed"]
    assert failed_row["image"] == "" and failed_row["error"].strip(), failed_row
    assert Result.objects.filter(image_id=broken.image_id).count() == 1

    # A larger job, cancelled on the page while it is being read.
    big = "archive backfill"
    big_id = create_job(page, big, zip_file(tmp_path / "backfill.zip", CANCEL_IMAGES, first_seed=1000), drop=True)
    total = CANCEL_IMAGES + 1
    big_card = card(page, big)
    with page.expect_navigation():
        big_card.get_by_role("button", name="Start").click()
    expect(big_card.locator("[data-role=state]")).to_have_text("running")
    with page.expect_navigation():
        big_card.get_by_role("button", name="Cancel").click()
    expect(big_card.locator("[data-role=state]")).to_have_text("cancelled")
    expect(big_card.get_by_role("button", name="Cancel")).to_have_count(0)
    page.evaluate("window.__sameDocument = true")

    # Items a worker had already claimed finish; the rest stop. Nothing stays waiting.
    deadline = time.monotonic() + JOB_MS / 1000
    waiting = BatchItem.objects.filter(job_id=big_id, status__in=["pending", "queued", "running"])
    while waiting.exists():
        assert time.monotonic() < deadline, list(waiting.values_list("status", "request__status"))
        time.sleep(0.2)
    assert BatchJob.objects.get(pk=big_id).status == "cancelled"
    statuses = list(BatchItem.objects.filter(job_id=big_id).values_list("status", flat=True))
    assert len(statuses) == total and set(statuses) <= TERMINAL, set(statuses)
    cancelled = statuses.count("cancelled")
    done = statuses.count("done")
    assert cancelled > 0, "the job finished before Cancel was pressed"
    assert statuses.count("failed") == 1 and done + cancelled == CANCEL_IMAGES
    stopped = InferenceRequest.objects.filter(batch_items__job_id=big_id, batch_items__status="cancelled")
    assert set(stopped.values_list("status", flat=True)) == {"cancelled"}
    assert not Result.objects.filter(request__in=stopped).exists()
    assert Result.objects.filter(request__batch_items__job_id=big_id).count() == done
    # the page, still not reloaded, shows the same counts once the last claimed items finished
    expected = " ".join(f"{state} {n}" for state, n in (("done", done), ("failed", 1), ("cancelled", cancelled)) if n)
    expect(big_card.locator("[data-role=counts]")).to_have_text(whole(expected))
    expect(big_card.locator("[data-role=state]")).to_have_text("cancelled")
    expect(big_card.locator("[data-role=summary]")).to_have_text(f"{total} of {total} finished")
    assert page.evaluate("window.__sameDocument") is True
    print(f"cancelled with {done} of {CANCEL_IMAGES} images read, {cancelled} stopped")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
    assert (ARTIFACTS / "jobs.png").stat().st_size > 10_000

    # Another hospital's clinician sees none of it, and cannot fetch its results.
    other_context = browser_context.browser.new_context()
    try:
        outsider = sign_in(other_context, stack, "clinician-b", password)
        expect(outsider.locator("body")).to_contain_text("No jobs yet.")
        expect(outsider.locator("section.job")).to_have_count(0)
        content = outsider.content()
        assert name not in content and big not in content
        response = outsider.request.get(f"{stack.base_url}/jobs/{job_id}/results.csv")
        assert response.status == 404
        assert name not in response.text()
    finally:
        other_context.close()
