"""The clinician workspace through the API and pages: DICOM ingest, the worklist, reviews."""

import logging

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from pydicom.uid import MPEG2MPML

from accounts.models import AccessEvent
from recognition.models import Image, InferenceRequest, Review, Study
from tests.conftest import PASSWORD, api_client_for, png_bytes
from tests.unit.test_dicom import PATIENT_ID, PATIENT_NAME, ct_dataset, make_dataset, to_bytes
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def post_file(client, data: bytes, name: str = "IM0001", **fields):
    upload = SimpleUploadedFile(name, data, content_type="application/octet-stream")
    return client.post("/api/v1/images/", {"file": upload, **fields}, format="multipart")


def ct_bytes(**attrs) -> bytes:
    return to_bytes(ct_dataset(AccessionNumber="ACC-CT-1", StudyDate="20260115", **attrs), preamble=b"\x7f" * 128)


def test_a_dicom_ct_is_mapped_kept_and_windowed_by_the_viewer(clinician_a, demo_model, caplog):
    caplog.set_level(logging.DEBUG)
    client = api_client_for(clinician_a)
    response = post_file(client, ct_bytes(SeriesNumber=3, InstanceNumber=7))
    assert response.status_code == 201, response.json()
    image = Image.objects.get(pk=response.json()["id"])
    study = image.study
    assert (study.accession_number, study.modality, str(study.study_date)) == ("ACC-CT-1", "CT", "2026-01-15")
    assert study.study_instance_uid and image.series.series_instance_uid
    assert study.patient_pseudonym.startswith("P-") and PATIENT_ID not in study.patient_pseudonym
    assert (image.series.number, image.instance_number, image.frame_number) == (3, 7, 0)
    assert (image.window_center, image.window_width, image.format) == (40.0, 400.0, "DICOM")
    with image.original.open("rb") as stored:
        original = stored.read()
    assert original[:128] == bytes(128) and original[128:132] == b"DICM"
    assert image.file.name.endswith(".png") and InferenceRequest.objects.filter(image=image).count() == 1
    pixels = client.get(f"/api/v1/images/{image.pk}/pixels/")
    assert pixels.status_code == 200 and pixels["Content-Type"] == "application/octet-stream"
    values = np.frombuffer(b"".join(pixels.streaming_content) if pixels.streaming else pixels.content, "<f4")
    assert values.shape == (32 * 32,)
    assert values[:4].tolist() == [-1024.0, 0.0, 40.0, 1976.0]  # Hounsfield units, as stored in the test file
    logged = caplog.text + "".join(str(e.__dict__) for e in AccessEvent.objects.all())
    assert PATIENT_ID not in logged and "Zebedee" not in logged and PATIENT_NAME not in logged


def test_the_same_patient_keeps_one_pseudonym_and_a_study_collects_its_series(clinician_a, clinician_b, demo_model):
    client = api_client_for(clinician_a)
    first = ct_dataset(AccessionNumber="ACC-2", SeriesNumber=1)
    second = ct_dataset(AccessionNumber="ACC-2", SeriesNumber=2, StudyInstanceUID=first.StudyInstanceUID)
    a = Image.objects.get(pk=post_file(client, to_bytes(first)).json()["id"])
    b = Image.objects.get(pk=post_file(client, to_bytes(second)).json()["id"])
    assert a.study_id == b.study_id and a.series_id != b.series_id
    assert Study.objects.get(pk=a.study_id).image_count == 2
    other = Image.objects.get(pk=post_file(api_client_for(clinician_b), to_bytes(ct_dataset())).json()["id"])
    assert other.study.patient_pseudonym != a.study.patient_pseudonym  # pseudonyms differ between hospitals


def test_every_frame_of_a_multiframe_file_is_an_image_of_one_series(clinician_a, demo_model):
    frames = np.stack([np.full((16, 16), value, dtype=np.uint16) for value in (100, 2000, 4000)])
    response = post_file(api_client_for(clinician_a), to_bytes(make_dataset(frames, bits=12)))
    assert response.status_code == 201
    images = list(Image.objects.order_by("frame_number"))
    assert [image.frame_number for image in images] == [0, 1, 2]
    assert len({image.series_id for image in images}) == 1 and len({image.file.name for image in images}) == 3
    assert InferenceRequest.objects.count() == 3


def test_an_encoding_without_decoder_is_kept_as_unprocessable_with_a_415(clinician_a, demo_model):
    ds = ct_dataset(AccessionNumber="ACC-MPEG")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    client = api_client_for(clinician_a)
    response = post_file(client, to_bytes(ds))
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_transfer_syntax" and "MPEG2" in error["message"]
    image = Image.objects.get(pk=error["detail"]["image"])
    assert image.unprocessable_reason and image.original and not image.file
    assert not InferenceRequest.objects.exists()
    assert image.study.ai_status == "unprocessable" and image.study.accession_number == "ACC-MPEG"
    file_response = client.get(f"/api/v1/images/{image.pk}/file/")
    assert file_response.status_code == 409 and file_response.json()["error"]["code"] == "unprocessable"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage", 422, None),
        (to_bytes(ct_dataset())[:-300], 422, "truncated"),
    ],
    ids=["garbage", "truncated"],
)
def test_a_broken_dicom_gets_a_clear_error_and_stores_nothing(clinician_a, demo_model, data, status, code):
    response = post_file(api_client_for(clinician_a), data)
    assert response.status_code == status
    assert response.json()["error"]["message"]
    if code:
        assert response.json()["error"]["code"] == code
    assert not Image.objects.exists() and not Study.objects.exists()


def upload_png(membership, seed: int, **fields):
    return post_file(api_client_for(membership), png_bytes(seed=seed, size=64), name="x.png", **fields).json()


def test_the_worklist_filters_searches_and_pages_without_repeats(clinician_a, clinician_b, demo_model):
    for i in range(7):
        upload_png(clinician_a, i, patient_id=f"PAT-{i}", accession_number=f"ACC-{i}", modality="DX" if i % 2 else "CR")
    upload_png(clinician_b, 99, patient_id="PAT-B", accession_number="ACC-B")
    client = api_client_for(clinician_a)
    seen, cursor = [], ""
    while True:
        page = client.get("/api/v1/studies/", {"page_size": 3, "cursor": cursor}).json()
        seen += [row["accession_number"] for row in page["results"]]
        if not page["next_cursor"]:
            break
        cursor = page["next_cursor"]
    assert seen == [f"ACC-{i}" for i in reversed(range(7))]  # newest first, no repeats, no other hospital
    by_modality = client.get("/api/v1/studies/", {"modality": "DX", "sort": "accession"}).json()["results"]
    assert [row["accession_number"] for row in by_modality] == ["ACC-1", "ACC-3", "ACC-5"]
    found = client.post("/api/v1/studies/search/", {"q": "PAT-4"}, format="json").json()["results"]
    assert [row["accession_number"] for row in found] == ["ACC-4"]
    assert client.post("/api/v1/studies/search/", {"q": "PAT-B"}, format="json").json()["results"] == []
    assert client.get("/api/v1/studies/", {"cursor": "not-a-cursor"}).status_code == 400
    inference_run(request_id=InferenceRequest.objects.filter(tenant=clinician_a.tenant).first().pk)
    done = client.get("/api/v1/studies/", {"ai_status": "done"}).json()["results"]
    assert len(done) == 7 and all(row["top_label"] for row in done)
    assert client.get("/api/v1/studies/", {"review": "signed_off"}).json()["results"] == []


def test_the_worklist_page_searches_by_post_and_keeps_identifiers_out_of_urls(client, clinician_a, demo_model):
    upload_png(clinician_a, 1, patient_id="PAT-SECRET-1", accession_number="ACC-77")
    upload_png(clinician_a, 2, patient_id="PAT-OTHER", accession_number="ACC-78")
    client.force_login(clinician_a.user)
    page = client.get("/worklist/", {"modality": ""})
    assert page.status_code == 200 and b"ACC-77" in page.content and b"ACC-78" in page.content
    found = client.post("/worklist/", {"q": "PAT-SECRET-1"})
    assert b"ACC-77" in found.content and b"ACC-78" not in found.content
    assert b"?q=" not in found.content and b"PAT-SECRET-1&" not in found.content


def reviewed_image(clinician, demo_model):
    image_id = upload_png(clinician, 5)["id"]
    inference_run(request_id=InferenceRequest.objects.get(image_id=image_id).pk)
    return Image.objects.get(pk=image_id)


def test_review_draft_sign_off_and_amendment_keep_the_history(clinician_a, viewer_a, demo_model):
    image = reviewed_image(clinician_a, demo_model)
    client = api_client_for(clinician_a)
    url = f"/api/v1/images/{image.pk}/reviews/"
    draft = client.post(url, {"verdict": "agree", "comment": "looks right"}, format="json").json()
    assert draft["signed_off_at"] is None and draft["label"] == image.results.get().top_label
    assert Study.objects.get(pk=image.study_id).review_state == "in_review"
    again = client.post(url, {"verdict": "disagree", "comment": "on second look"}, format="json").json()
    assert again["id"] == draft["id"] and again["verdict"] == "disagree"  # one's own draft is updated
    signed = client.post(f"/api/v1/reviews/{draft['id']}/sign-off/").json()
    assert signed["signed_off_at"] and signed["signed_off_by"] == clinician_a.user.username
    assert Study.objects.get(pk=image.study_id).review_state == "signed_off"
    assert client.post(f"/api/v1/reviews/{draft['id']}/sign-off/").status_code == 409
    labels = image.results.get().model_version.labels
    other = next(label for label in labels if label != image.results.get().top_label)
    amendment = client.post(url, {"verdict": "correct", "label": other, "sign_off": True}, format="json").json()
    assert amendment["amends"] == draft["id"] and amendment["id"] != draft["id"]
    history = client.get(url).json()["results"]
    assert [row["id"] for row in history] == [amendment["id"], draft["id"]]
    assert history[1]["verdict"] == "disagree" and history[1]["comment"] == "on second look"  # unchanged
    with pytest.raises(ValueError, match="never changed"):
        review = Review.objects.get(pk=draft["id"])
        review.comment = "rewritten"
        review.save()
    actions = list(AccessEvent.objects.filter(target_type="review").values_list("action", flat=True).order_by("id"))
    assert actions == ["review.save", "review.save", "review.sign_off", "review.amend", "review.sign_off"]
    viewer = api_client_for(viewer_a)
    assert viewer.get(url).status_code == 200
    assert viewer.post(url, {"verdict": "agree"}, format="json").status_code == 403


def test_a_review_is_checked_and_another_clinicians_draft_is_theirs(clinician_a, hospital_a, demo_model):
    from accounts.models import Role
    from accounts.services import membership_grant, user_get_or_create

    image = reviewed_image(clinician_a, demo_model)
    url = f"/api/v1/images/{image.pk}/reviews/"
    client = api_client_for(clinician_a)
    assert client.post(url, {"verdict": "correct"}, format="json").json()["error"]["code"] == "label_required"
    assert client.post(url, {"verdict": "correct", "label": "nope"}, format="json").json()["error"]["code"] == (
        "bad_label"
    )
    assert client.post(url, {"verdict": "maybe"}, format="json").status_code == 400
    assert client.post(url, {"verdict": "agree"}, format="json").status_code == 201
    colleague = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="colleague", password=PASSWORD), role=Role.CLINICIAN
    )
    response = api_client_for(colleague).post(url, {"verdict": "agree", "sign_off": True}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "draft_of_another"
    assert Review.objects.count() == 1


def test_a_review_of_another_hospitals_image_is_a_404(clinician_a, clinician_b, demo_model):
    image = reviewed_image(clinician_a, demo_model)
    client = api_client_for(clinician_b)
    assert client.post(f"/api/v1/images/{image.pk}/reviews/", {"verdict": "agree"}, format="json").status_code == 404
    assert client.get(f"/api/v1/images/{image.pk}/reviews/").status_code == 404
    review = Review.objects.create(
        tenant=clinician_a.tenant, image=image, verdict="agree", author=clinician_a.user, ai_label="x"
    )
    assert client.post(f"/api/v1/reviews/{review.pk}/sign-off/").status_code == 404


def test_the_viewer_page_shows_the_canvas_the_finding_and_the_review_form(client, clinician_a, demo_model):
    image = reviewed_image(clinician_a, demo_model)
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert 'class="viewer-canvas"' in page and "data-heatmap-url" in page
    assert "data-pixels-url" not in page  # a PNG: no modality values to window
    assert "AI assistance, not a diagnosis" in page and demo_model.version in page
    response = client.post(f"/images/{image.pk}/review/", {"verdict": "agree", "action": "sign_off"})
    assert response.status_code == 302
    assert Review.objects.get().is_signed
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert "signed off" in page and "Amend the signed review" in page


def test_unpacking_the_pixels_of_a_png_image_is_a_clear_404(clinician_a, demo_model):
    image_id = upload_png(clinician_a, 3)["id"]
    response = api_client_for(clinician_a).get(f"/api/v1/images/{image_id}/pixels/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_pixels"


def test_agreement_is_shown_to_tenant_admins_and_staff_with_a_csv(client, clinician_a, hospital_a, demo_model):
    from accounts.models import Role
    from accounts.services import membership_grant, user_get_or_create

    image = reviewed_image(clinician_a, demo_model)
    api_client_for(clinician_a).post(
        f"/api/v1/images/{image.pk}/reviews/", {"verdict": "agree", "sign_off": True}, format="json"
    )
    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="hospital-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    client.force_login(admin.user)
    page = client.get("/agreement/").content.decode()
    assert demo_model.version in page and "100%" in page and "<svg" in page
    csv = b"".join(client.get("/agreement.csv").streaming_content).decode().splitlines()
    assert csv[0].startswith("model,version,label") and csv[1].endswith(",1,1,0,0,1.000")
    client.force_login(clinician_a.user)
    assert client.get("/agreement/").status_code == 403
    staff = user_get_or_create(username="platform-staff", password=PASSWORD)
    staff.is_staff = True
    staff.save()
    client.force_login(staff)
    assert demo_model.version in client.get("/agreement/", {"tenant": hospital_a.slug}).content.decode()
    assert client.get("/agreement/", {"tenant": "no-such-hospital"}).status_code == 404


def test_a_real_ct_upload_keeps_the_original_byte_for_byte_apart_from_the_preamble(clinician_a, demo_model):
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("CT_small.dcm", download=False), "rb") as handle:
        data = b"\x11" * 128 + handle.read()[128:]
    image = Image.objects.get(pk=post_file(api_client_for(clinician_a), data).json()["id"])
    with image.original.open("rb") as stored:
        kept = stored.read()
    assert kept[:128] == bytes(128) and kept[128:] == data[128:]


def count_queries(call) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = call()
    assert response.status_code == 200
    return len(captured)


def test_the_worklist_costs_the_same_queries_for_3_or_30_studies(client, clinician_a, demo_model):
    from recognition.services.images import StudyFields, image_upload
    from tests.conftest import upload_file

    client.force_login(clinician_a.user)
    api = api_client_for(clinician_a)

    def add(count, start):
        for i in range(start, start + count):
            image_upload(
                membership=clinician_a,
                upload=upload_file(png_bytes(seed=i, size=32)),
                study=StudyFields(accession_number=f"Q-{i}", modality="DX"),
            )

    add(3, 0)
    client.get("/worklist/")  # the session's first request also records the member's sign-in activity
    few = (count_queries(lambda: client.get("/worklist/")), count_queries(lambda: api.get("/api/v1/studies/")))
    add(27, 3)
    many = (count_queries(lambda: client.get("/worklist/")), count_queries(lambda: api.get("/api/v1/studies/")))
    assert few == many
