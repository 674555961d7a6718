"""The browser's screen, as the server takes it: untrusted input checked and stored as the image's
preliminary in the upload's transaction, routing the read within the hospital's own share; the
preliminary shown beside the server's read and never exported, counted as a finding or written
to the study's columns; the queue's order by it, and the promotion of screened negatives."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

from accounts.models import Role
from dicomnet.objects import ai_report_for
from recognition.models import BatchJob, Image, InferenceRequest, PreliminaryResult, Result, Study
from recognition.services.admission import interactive_backlog
from recognition.services.jobs import results_csv
from tests.conftest import api_client_for, member, png_bytes, upload_file
from tests.screening import screen_json, screening_on, screening_version
from workers.queue_policy import claim, screened_negatives_promote
from workers.runner import inference_run

pytestmark = pytest.mark.django_db
Priority = InferenceRequest.Priority
# a probability no server read gives: its absence from an export means the screen is not in it
MARK = 0.987654


@pytest.fixture
def screen(hospital_a):
    version = screening_version()
    screening_on(hospital_a, version)
    return version


def upload(membership, *, screen=None, key=None, seed=1, opacity=True):
    data = {"file": upload_file(png_bytes(seed=seed, size=64, opacity=opacity))}
    if screen is not None:
        data["screen"] = screen
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    return api_client_for(membership).post("/api/v1/images/", data, format="multipart", **headers)


def read_of(image_id) -> InferenceRequest:
    return InferenceRequest.objects.get(image_id=image_id)


# -- the upload carries the screen ----------------------------------------------------------------------------


def test_a_suspicious_screen_is_stored_answered_and_sends_its_read_first(clinician_a, demo_model, screen):
    response = upload(clinician_a, screen=screen_json(screen, 0.1, latency_ms=37))
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["preliminary"] == {"label": "round_opacity", "probability": 0.9, "route": "first", "version": screen.pk}
    stored = PreliminaryResult.objects.get(image_id=body["id"])
    assert (stored.tenant, stored.screening_version, stored.latency_ms) == (clinician_a.tenant, screen, 37)
    assert stored.probabilities == {"no_finding": 0.1, "round_opacity": 0.9}
    read = read_of(body["id"])
    assert (read.priority, read.screen_order, read.read_by) == (Priority.INTERACTIVE, 0, None)


def test_a_confident_negative_waits_in_the_bulk_lane_only_where_the_hospital_asks(
    clinician_a, demo_model, screen, hospital_a
):
    body = upload(clinician_a, screen=screen_json(screen, 0.99)).json()
    assert body["preliminary"]["route"] == "normal"  # routing negatives is off by default
    assert (read_of(body["id"]).priority, read_of(body["id"]).screen_order) == (Priority.INTERACTIVE, 1)

    screening_on(hospital_a, screen, route_negatives_to_bulk=True, negative_max_wait_seconds=300)
    before = timezone.now()
    body = upload(clinician_a, screen=screen_json(screen, 0.99), seed=2).json()
    assert body["preliminary"]["route"] == "bulk"
    read = read_of(body["id"])
    assert read.priority == Priority.BULK
    assert before + timedelta(seconds=300) <= read.read_by <= timezone.now() + timedelta(seconds=300)


def test_a_flagged_negative_stays_in_order(clinician_a, demo_model, screen, hospital_a):
    screening_on(hospital_a, screen, route_negatives_to_bulk=True)
    body = upload(clinician_a, screen=screen_json(screen, 0.999, flags=["blank"])).json()
    assert body["preliminary"]["route"] == "normal"
    assert PreliminaryResult.objects.get().quality_flags == ["blank"]
    assert read_of(body["id"]).priority == Priority.INTERACTIVE


@pytest.mark.parametrize(
    ("screen_field", "says"),
    [
        ("not json", "not JSON"),
        ('{"version_id": 1, "probabilities": {"no_finding": 2, "round_opacity": -1}}', "between 0 and 1"),
        ('{"version_id": 1, "probabilities": {"no_finding": 1}, "quality": {"flags": ["odd"]}}', "unknown quality"),
    ],
)
def test_a_malformed_screen_is_422_and_nothing_is_stored(clinician_a, demo_model, screen, screen_field, says):
    response = upload(clinician_a, screen=screen_field)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "bad_screen" and says in error["message"]
    assert not Image.objects.exists() and not PreliminaryResult.objects.exists()


def test_labels_that_are_not_the_screening_models_are_422(clinician_a, demo_model, screen):
    forged = f'{{"version_id": {screen.pk}, "probabilities": {{"no_finding": 0.5, "cat": 0.5}}}}'
    response = upload(clinician_a, screen=forged)
    assert response.status_code == 422 and "exactly the screening model's" in response.json()["error"]["message"]
    assert not Image.objects.exists()


def test_a_stale_or_foreign_version_lets_the_upload_go_on_without_its_screen(
    clinician_a, clinician_b, demo_model, screen, hospital_b
):
    newer = screening_version("1.1.0")
    stale = upload(clinician_a, screen=screen_json(newer, 0.1))  # not the hospital's current version
    assert stale.status_code == 201 and stale.json()["preliminary"] is None
    assert read_of(stale.json()["id"]).screen_order == 1
    # hospital B does not screen: hospital A's version id means nothing there
    foreign = upload(clinician_b, screen=screen_json(screen, 0.1))
    assert foreign.status_code == 201 and foreign.json()["preliminary"] is None
    assert not PreliminaryResult.objects.exists()


def test_screening_off_stores_no_screen(clinician_a, demo_model, screen, hospital_a):
    screening_on(hospital_a, screen, screening_enabled=False)
    assert upload(clinician_a, screen=screen_json(screen, 0.1)).json()["preliminary"] is None
    assert not PreliminaryResult.objects.exists()


def test_an_upload_without_a_screen_answers_a_null_preliminary(clinician_a, demo_model, screen):
    assert upload(clinician_a).json()["preliminary"] is None


def test_a_replayed_upload_makes_no_second_preliminary(clinician_a, demo_model, screen):
    first = upload(clinician_a, screen=screen_json(screen, 0.1), key="retry-1")
    again = upload(clinician_a, screen=screen_json(screen, 0.2), key="retry-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["preliminary"]["probability"] == 0.9  # the first try's, as stored
    assert PreliminaryResult.objects.count() == 1 and InferenceRequest.objects.count() == 1


def test_a_job_item_carries_its_screen_and_its_read_goes_first_in_the_hospitals_bulk_turns(
    clinician_a, demo_model, screen
):
    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "screened"}, format="json").json()
    items = f"/api/v1/batches/{job['id']}/items/"
    plain = client.post(items, {"files": [upload_file(png_bytes(seed=3, size=64))]}, format="multipart")
    suspicious = client.post(
        items,
        {"files": [upload_file(png_bytes(seed=4, size=64))], "screen": screen_json(screen, 0.05)},
        format="multipart",
    )
    assert (plain.status_code, suspicious.status_code) == (202, 202), suspicious.content
    two = client.post(
        items,
        {"files": [upload_file(png_bytes(seed=5)), upload_file(png_bytes(seed=6))], "screen": screen_json(screen, 0.5)},
        format="multipart",
    )
    assert two.status_code == 400 and two.json()["error"]["code"] == "screen_one_file"
    bad = client.post(items, {"files": [upload_file(png_bytes(seed=7))], "screen": "{"}, format="multipart")
    assert bad.status_code == 422
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200
    (prelim,) = PreliminaryResult.objects.all()
    assert prelim.route == "first"
    orders = dict(InferenceRequest.objects.values_list("image_id", "screen_order"))
    assert orders[prelim.image_id] == 0 and sorted(orders.values()) == [0, 1]
    assert set(InferenceRequest.objects.values_list("priority", flat=True)) == {Priority.BULK}


def test_the_upload_page_takes_a_screen_with_one_file(client, clinician_a, demo_model, screen):
    client.force_login(clinician_a.user)
    response = client.post(
        "/upload/", {"files": upload_file(png_bytes(seed=8, size=64)), "screen": screen_json(screen, 0.2)}
    )
    assert response.status_code == 302
    assert PreliminaryResult.objects.get().route == "first"
    refused = client.post("/upload/", {"files": upload_file(png_bytes(seed=9, size=64)), "screen": "nope"})
    assert refused.status_code == 200 and "not JSON" in refused.content.decode()
    assert Image.objects.count() == 1


# -- the queue: suspicious first within the hospital's own turns, never another's ---------------------------------


def test_a_hospitals_suspicious_images_go_first_in_its_own_turns_and_never_jump_another_hospitals(
    clinician_a, clinician_b, demo_model, screen, hospital_b
):
    screening_on(hospital_b, screen)
    a_plain = [upload(clinician_a, seed=10 + i).json()["id"] for i in range(2)]
    b_plain = upload(clinician_b, seed=20).json()["id"]
    a_suspicious = [upload(clinician_a, screen=screen_json(screen, 0.1), seed=30 + i).json()["id"] for i in range(3)]
    b_suspicious = upload(clinician_b, screen=screen_json(screen, 0.2), seed=40).json()["id"]
    claimed = claim(model_version_id=demo_model.pk, limit=20)
    order = [InferenceRequest.objects.get(pk=pk).image_id for pk in claimed]
    # turn by turn (each turn's requests by id); within each hospital, suspicious first
    assert order == [
        a_suspicious[0],  # A's 1st turn
        b_suspicious,  # B's 1st turn
        b_plain,  # B's 2nd turn: uploaded before A's 2nd turn's image
        a_suspicious[1],  # A's 2nd turn
        a_suspicious[2],
        a_plain[0],
        a_plain[1],
    ]
    # B's second request is claimed before A's third, however many suspicious images A has
    assert order.index(b_plain) < order.index(a_suspicious[2])


def test_without_screens_the_turns_are_as_before(clinician_a, clinician_b, demo_model):
    a = [upload(clinician_a, seed=50 + i).json()["id"] for i in range(2)]
    b = upload(clinician_b, seed=60).json()["id"]
    claimed = claim(model_version_id=demo_model.pk, limit=20)
    assert [InferenceRequest.objects.get(pk=pk).image_id for pk in claimed] == [a[0], b, a[1]]


def test_screened_negatives_past_their_wait_move_to_the_interactive_lane(
    clinician_a, demo_model, screen, hospital_a, django_capture_on_commit_callbacks
):
    screening_on(hospital_a, screen, route_negatives_to_bulk=True, negative_max_wait_seconds=60)
    due = upload(clinician_a, screen=screen_json(screen, 0.99), seed=70).json()["id"]
    waiting = upload(clinician_a, screen=screen_json(screen, 0.99), seed=71).json()["id"]
    InferenceRequest.objects.filter(image_id=due).update(read_by=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=False) as wakes:
        assert screened_negatives_promote() == 1
    assert wakes, "a worker is woken for the promoted read"
    moved, left = read_of(due), read_of(waiting)
    assert (moved.priority, moved.read_by) == (Priority.INTERACTIVE, None)
    assert left.priority == Priority.BULK and left.read_by is not None
    assert screened_negatives_promote() == 0


def test_screened_negatives_in_the_bulk_lane_count_against_the_interactive_bound(
    clinician_a, demo_model, screen, hospital_a, settings
):
    """They are interactive uploads deferred: forged "negative" screens must not let one hospital's
    uploads past the bound every hospital shares, nor flood the lane past it when promoted."""
    screening_on(hospital_a, screen, route_negatives_to_bulk=True)
    settings.SIGHTLINE_INTERACTIVE_QUEUE_MAX = 2
    for seed in (90, 91):
        assert upload(clinician_a, screen=screen_json(screen, 0.99), seed=seed).status_code == 201
    assert interactive_backlog() == 2
    assert InferenceRequest.objects.filter(priority=Priority.INTERACTIVE).count() == 0  # both wait in bulk
    refused = upload(clinician_a, screen=screen_json(screen, 0.99), seed=92)
    assert refused.status_code == 429 and refused["Retry-After"]


def test_a_bulk_jobs_reads_are_never_promoted(clinician_a, demo_model, screen):
    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "night"}, format="json").json()
    client.post(
        f"/api/v1/batches/{job['id']}/items/",
        {"files": [upload_file(png_bytes(seed=80, size=64))], "screen": screen_json(screen, 0.999)},
        format="multipart",
    )
    client.post(f"/api/v1/batches/{job['id']}/start/")
    assert screened_negatives_promote() == 0
    assert InferenceRequest.objects.get().priority == Priority.BULK


# -- shown beside the server's read, never exported or counted ------------------------------------------------------


@pytest.fixture
def screened_and_read(clinician_a, demo_model, screen):
    """An image whose screen says the opposite of the server's read, read by the server."""
    body = upload(clinician_a, screen=screen_json(screen, MARK), seed=90, opacity=True).json()
    inference_run(request_id=read_of(body["id"]).pk)
    result = Result.objects.get(image_id=body["id"])
    assert result.top_label != "no_finding", "the server's read must disagree with the screen for these tests"
    return Image.objects.get(pk=body["id"]), result


def test_the_viewer_shows_the_preliminary_marked_as_such_beside_the_servers_read(
    client, clinician_a, screened_and_read
):
    image, result = screened_and_read
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{image.pk}/").content.decode()
    section = page[page.index('id="preliminary"') :]
    assert "preliminary · browser screen, not a finding" in section
    assert "sightline-screen 1.0.0" in section and "no_finding" in section and f"{MARK:.3f}" in section
    assert "disagreed" in section
    assert page.index('id="finding"') < page.index('id="preliminary"')


def test_the_viewer_shows_quality_flags(client, clinician_a, demo_model, screen):
    body = upload(clinician_a, screen=screen_json(screen, 0.6, flags=["saturated", "unfamiliar"])).json()
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{body['id']}/").content.decode()
    assert "Quality heuristics flagged: saturated, unfamiliar" in page


def test_the_study_and_the_worklist_know_only_the_servers_read(clinician_a, screened_and_read):
    image, result = screened_and_read
    study = Study.objects.get(pk=image.study_id)
    assert (study.top_label, study.ai_status) == (result.top_label, Study.AIStatus.DONE)
    # a study screened but not yet read has no finding: its columns say queued, not the screen's label
    api = api_client_for(clinician_a)
    studies = api.get("/api/v1/studies/", {"finding": "no_finding"}).json()["results"]
    assert image.study_id not in [row["id"] for row in studies]


def test_a_screened_image_not_yet_read_has_no_finding(clinician_a, demo_model, screen):
    body = upload(clinician_a, screen=screen_json(screen, 0.05)).json()
    study = Study.objects.get(pk=body["study"]["id"])
    assert study.top_label in ("", None) and study.ai_status == Study.AIStatus.QUEUED
    detail = api_client_for(clinician_a).get(f"/api/v1/images/{body['id']}/").json()
    assert detail["results"] == [] and detail["top_label"] is None


def test_the_batch_results_csv_holds_the_servers_read_only(clinician_a, demo_model, screen):
    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "export"}, format="json").json()
    client.post(
        f"/api/v1/batches/{job['id']}/items/",
        {"files": [upload_file(png_bytes(seed=91, size=64))], "screen": screen_json(screen, MARK)},
        format="multipart",
    )
    client.post(f"/api/v1/batches/{job['id']}/start/")
    inference_run(request_id=InferenceRequest.objects.get().pk)
    assert PreliminaryResult.objects.exists()
    text = "".join(results_csv(BatchJob.objects.get(pk=job["id"])))
    (row,) = list(csv.DictReader(io.StringIO(text)))
    result = Result.objects.get()
    assert row["top_label"] == result.top_label and float(row["probability"]) == pytest.approx(result.top_probability)
    assert str(MARK) not in text and "sightline-screen" not in text and "preliminary" not in text
    api_csv = client.get(f"/api/v1/batches/{job['id']}/results/", {"format": "csv"})
    body = b"".join(api_csv.streaming_content).decode() if api_csv.streaming else api_csv.content.decode()
    assert str(MARK) not in body and "sightline-screen" not in body


def test_the_fhir_bundle_holds_no_preliminary(clinician_a, screened_and_read):
    image, result = screened_and_read
    body = api_client_for(clinician_a).get(f"/api/v1/studies/{image.study_id}/fhir/").content.decode()
    assert result.top_label in body
    # ("preliminary" is a FHIR report status of the server's own unsigned read, so not a mark here)
    assert str(MARK) not in body and "sightline-screen" not in body


def test_the_dicom_sr_is_made_of_the_servers_read_only(clinician_a, demo_model, screen):
    from pydicom.data import get_testdata_file

    from recognition.services.images import images_upload

    with open(get_testdata_file("CT_small.dcm"), "rb") as handle:
        (image,) = images_upload(membership=clinician_a, upload=upload_file(handle.read(), "ct.dcm"))
    inference_run(request_id=image.inference_requests.get().pk)
    # the browser screens no DICOM; a preliminary written for one anyway must still stay out of its SR
    PreliminaryResult.objects.create(
        tenant=image.tenant,
        image=image,
        screening_version=screen,
        probabilities={"no_finding": MARK, "round_opacity": round(1 - MARK, 6)},
        top_label="no_finding",
        top_probability=MARK,
    )
    instance = ai_report_for(Result.objects.get(image=image))
    with default_storage.open(instance.file.name, "rb") as stored:
        data = stored.read()
    assert b"sightline-screen" not in data and str(MARK).encode() not in data
    assert demo_model.model.name.encode() in data


# the modules that make what leaves the platform (CSV, batch results, FHIR, DICOM SR and its PACS
# sending, the model-server protocols' answers): none reads the preliminary table
EXPORT_MODULES = [
    "core/spreadsheet.py",
    "recognition/services/jobs/exports.py",
    "recognition/job_selectors.py",
    "recognition/fhir.py",
    "dicomnet/objects.py",
    "dicomnet/sending.py",
    *sorted(str(path.relative_to(settings.BASE_DIR)) for path in (Path(settings.BASE_DIR) / "protocols").glob("*.py")),
]


@pytest.mark.parametrize("module", EXPORT_MODULES)
def test_no_export_path_reads_the_preliminary(module):
    source = (Path(settings.BASE_DIR) / module).read_text()
    # the table, its related name on Image, or a lookup through it (FHIR's "preliminary" status is not)
    assert not re.search(r"PreliminaryResult|\.preliminary\b|preliminary__|screening_version", source), (
        f"{module} mentions the browser's preliminary screen: it must never be exported, sent or answered"
    )


def test_a_viewer_sees_the_preliminary_and_another_hospital_gets_404(
    client, clinician_b, screened_and_read, hospital_a
):
    image, _ = screened_and_read
    viewer = member(hospital_a, "viewer-pre", Role.VIEWER)
    client.force_login(viewer.user)
    assert 'id="preliminary"' in client.get(f"/images/{image.pk}/").content.decode()
    client.logout()
    client.force_login(clinician_b.user)
    assert client.get(f"/images/{image.pk}/").status_code == 404
    assert api_client_for(clinician_b).get(f"/api/v1/images/{image.pk}/").status_code == 404
