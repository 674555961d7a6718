"""Decoding uploads: bounded inflating, a per-request pixel cap, the received → rendered/failed worker
step, stored modality values, decoder errors in words, and single uploads' Idempotency-Key."""

import io
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, RLELossless

from recognition import dicom
from recognition.models import BatchItem, Image, InferenceRequest, Study, UploadKey
from recognition.services import images, inference
from recognition.services.images import images_render_reconcile
from tests.conftest import api_client_for, png_bytes
from tests.integration.test_batches import add_zip, create, expand_all
from tests.unit.test_dicom import ct_dataset, ct_pixels, make_dataset, to_bytes
from tests.unit.test_dicom_bomb import deflated_bomb
from workers import tasks
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def post_file(client, data: bytes, name: str = "IM0001", headers=None, **fields):
    upload = SimpleUploadedFile(name, data, content_type="application/octet-stream")
    return client.post("/api/v1/images/", {"file": upload, **fields}, format="multipart", **(headers or {}))


class RenderWorker:
    """The worker step, in-process: uploads commit for real (their on-commit wake-ups run), the
    render wake-ups are kept, and ``run()`` delivers them to the real task. Nothing reaches Redis."""

    def __init__(self, capture) -> None:
        self.capture, self.sent, self.queues = capture, [], []

    def post(self, client, data: bytes, **kwargs):
        with self.capture(execute=True):
            return post_file(client, data, **kwargs)

    def run(self) -> None:
        while self.sent:
            tasks.image_render.apply(args=[self.sent.pop(0)], throw=True)


@pytest.fixture
def render_worker(monkeypatch, django_capture_on_commit_callbacks):
    worker = RenderWorker(django_capture_on_commit_callbacks)
    monkeypatch.setattr(
        images,
        "task_send",
        lambda name, args, **options: (worker.sent.append(args[0]), worker.queues.append(options.get("queue"))),
    )
    monkeypatch.setattr(
        inference, "inference_enqueue", lambda *args, **kwargs: None
    )  # reads stay queued in the database
    return worker


def rle_ct(frames: int = 1, **attrs) -> Dataset:
    pixels = np.stack([ct_pixels() // 2 + 100 * i for i in range(frames)]) if frames > 1 else ct_pixels()
    ds = make_dataset(pixels, bits=12, RescaleSlope=1, RescaleIntercept=-1024, **attrs)
    ds.compress(RLELossless)
    return ds


# -- item 2: the deflate bomb ---------------------------------------------------------------------------------------


def test_a_deflate_bomb_upload_is_a_413_and_stores_nothing(clinician_a, demo_model):
    response = post_file(api_client_for(clinician_a), deflated_bomb(64 * 1024 * 1024))
    assert response.status_code == 413, response.json()
    error = response.json()["error"]
    assert error["code"] == "too_many_bytes" and "larger than 50 MB" in error["message"]
    assert not Image.objects.exists() and not Study.objects.exists()


def test_a_deflate_bomb_in_an_archive_is_a_failed_item_in_words(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as stored:  # past the archive's own ratio check
        stored.writestr("bomb.dcm", deflated_bomb(64 * 1024 * 1024))
        stored.writestr("ok.png", png_bytes(size=32))
    archive = buffer.getvalue()
    assert add_zip(client, job["id"], archive).status_code == 202
    expand_all()
    items = list(BatchItem.objects.filter(job_id=job["id"]).order_by("position"))
    assert [item.status for item in items] == ["failed", "pending"]
    assert "larger than 50 MB" in items[0].error


# -- item 6: decoder exceptions become 422 in words -----------------------------------------------------------------


def test_a_modality_lut_without_its_descriptor_is_a_422_in_words_not_a_500(clinician_a, demo_model):
    ds = ct_dataset()
    lut = Dataset()
    lut.ModalityLUTType = "HU"
    lut.add_new(0x00283006, "US", [0] * 16)  # LUTData; LUTDescriptor missing: pydicom raises deep inside
    ds.ModalityLUTSequence = [lut]
    response = post_file(api_client_for(clinician_a), to_bytes(ds))
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "decode_failed" and "could not be decoded" in error["message"]
    assert not Image.objects.exists()


# -- item 9: the per-request cap and the worker step ------------------------------------------------------------------


def test_a_compressed_dicom_is_received_at_once_and_rendered_by_the_worker(clinician_a, demo_model, render_worker):
    client = api_client_for(clinician_a)
    response = render_worker.post(client, to_bytes(rle_ct(frames=2)))
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["state"] == "received" and body["status"] is None
    assert [(i["frame_number"], i["state"]) for i in body["images"]] == [(0, "received"), (1, "received")]
    assert render_worker.sent == [[i["id"] for i in body["images"]]]  # one wake-up, ids only
    assert render_worker.queues == ["interactive"]  # its read waits for the render: a clinician's lane
    assert not InferenceRequest.objects.exists()  # the read is queued only once rendered
    assert Study.objects.get().ai_status == "queued"  # the worklist says so meanwhile
    assert client.get(f"/api/v1/images/{body['id']}/file/").json()["error"]["code"] == "rendering"

    render_worker.run()

    images = list(Image.objects.order_by("frame_number"))
    assert [image.state for image in images] == ["rendered", "rendered"]
    assert all(image.file and image.pixels and image.window_width for image in images)
    assert InferenceRequest.objects.filter(image__in=images).count() == 2
    pixels = client.get(f"/api/v1/images/{images[1].pk}/pixels/")
    values = np.frombuffer(pixels.content, "<f4").reshape(32, 32)
    np.testing.assert_array_equal(values, (ct_pixels() // 2 + 100).astype(np.float32) - 1024)
    inference_run(request_id=InferenceRequest.objects.order_by("id").first().pk)
    assert client.get(f"/api/v1/images/{images[0].pk}/").json()["status"] == "done"


def test_more_pixels_than_one_request_decodes_are_queued_not_rendered_in_the_request(
    clinician_a, demo_model, render_worker, settings, monkeypatch
):
    settings.SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST = 3 * 32 * 32  # three 32² frames
    frames = np.stack([np.full((32, 32), 100 * i, dtype=np.uint16) for i in range(4)])
    client = api_client_for(clinician_a)
    small = render_worker.post(client, to_bytes(make_dataset(frames[:3], bits=12)))
    assert small.status_code == 201 and small.json()["state"] == "rendered"  # within the cap: rendered now
    decoded, real = [], dicom.frame_modality
    monkeypatch.setattr(dicom, "frame_modality", lambda *a: decoded.append(a) or real(*a))
    big = render_worker.post(client, to_bytes(make_dataset(frames, bits=12)))
    assert big.status_code == 202 and {i["state"] for i in big.json()["images"]} == {"received"}
    assert decoded == []  # not one frame decoded in the request
    render_worker.run()
    assert len(decoded) == 4
    big_ids = [i["id"] for i in big.json()["images"]]
    assert set(Image.objects.filter(pk__in=big_ids).values_list("state", flat=True)) == {"rendered"}


def test_the_cap_counts_every_file_of_one_request(clinician_a, demo_model, settings):
    settings.SIGHTLINE_MAX_DECODE_PIXELS_PER_REQUEST = 32 * 32 + 10
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [SimpleUploadedFile(f"f{i}.dcm", to_bytes(ct_dataset())) for i in range(2)]
    assert client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart").status_code == 202
    items = list(BatchItem.objects.filter(job_id=job["id"]).order_by("position"))
    assert [item.status for item in items] == ["pending", "failed"]
    assert "one request may decode" in items[1].error and "zip archive" in items[1].error


def damaged_second_frame() -> bytes:
    ds = rle_ct(frames=3)
    frames = list(generate_frames(ds.PixelData, number_of_frames=3))
    frames[1] = frames[1][:64] + b"\xff" * 7  # a frame whose RLE segments point past its end
    ds.PixelData = encapsulate(frames)
    return to_bytes(ds)


def test_a_damaged_frame_fails_alone_in_words_on_the_page_and_in_the_api(
    client, clinician_a, demo_model, render_worker
):
    api = api_client_for(clinician_a)
    response = render_worker.post(api, damaged_second_frame())
    assert response.status_code == 202
    render_worker.run()
    images = list(Image.objects.order_by("frame_number"))
    assert [image.state for image in images] == ["rendered", "failed", "rendered"]
    assert "could not be decoded" in images[1].unprocessable_reason
    assert InferenceRequest.objects.filter(image=images[1]).count() == 0
    assert InferenceRequest.objects.filter(image__in=[images[0], images[2]]).count() == 2
    detail = api.get(f"/api/v1/images/{images[1].pk}/").json()
    assert detail["state"] == "failed" and "could not be decoded" in detail["unprocessable_reason"]
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{images[1].pk}/").content.decode()
    assert "could not be decoded" in page and "data-image-url" not in page


def test_lost_render_wake_ups_are_sent_again_and_a_render_that_keeps_failing_ends(
    clinician_a, demo_model, render_worker, settings
):
    image_id = render_worker.post(api_client_for(clinician_a), to_bytes(rle_ct())).json()["id"]
    render_worker.sent.clear()  # the broker lost it (Redis keeps nothing)
    assert images_render_reconcile() == 0  # not stalled yet
    Image.objects.filter(pk=image_id).update(render_queued_at=timezone.now() - timedelta(hours=1))
    assert images_render_reconcile() == 1 and render_worker.sent == [[image_id]]
    render_worker.run()
    assert Image.objects.get(pk=image_id).state == "rendered"

    stuck = render_worker.post(api_client_for(clinician_a), to_bytes(rle_ct())).json()["id"]
    Image.objects.filter(pk=stuck).update(render_attempts=settings.SIGHTLINE_MAX_ATTEMPTS)  # each killed its worker
    render_worker.run()
    image = Image.objects.get(pk=stuck)
    assert image.state == "failed" and "attempts" in image.unprocessable_reason


def test_a_jpeg2000_dicom_from_the_upload_page_is_queued_too(client, clinician_a, demo_model, render_worker):
    ds = ct_dataset()
    ds.compress(JPEG2000Lossless)
    client.force_login(clinician_a.user)
    with render_worker.capture(execute=True):
        response = client.post("/upload/", {"files": [SimpleUploadedFile("a.dcm", to_bytes(ds))]})
    assert response.status_code == 302
    image = Image.objects.get()
    assert image.state == "received"
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert "being prepared for display" in page and "live.js" in page
    render_worker.run()
    image.refresh_from_db()
    assert image.state == "rendered" and InferenceRequest.objects.filter(image=image).count() == 1


def test_pixels_are_served_without_parsing_the_original_again(clinician_a, demo_model, monkeypatch):
    client = api_client_for(clinician_a)
    image_id = post_file(client, to_bytes(ct_dataset())).json()["id"]
    monkeypatch.setattr(dicom, "parse", lambda *a, **k: pytest.fail("the original was parsed again"))
    monkeypatch.setattr(dicom, "dicom_read", lambda *a, **k: pytest.fail("the original was read again"))
    response = client.get(f"/api/v1/images/{image_id}/pixels/")
    assert response.status_code == 200
    assert np.frombuffer(response.content, "<f4")[:4].tolist() == [-1024.0, 0.0, 40.0, 1976.0]


# -- item 13 (part): single uploads' Idempotency-Key ----------------------------------------------------------------


def test_a_retried_upload_with_its_idempotency_key_answers_the_same_image(clinician_a, clinician_b, demo_model):
    client = api_client_for(clinician_a)
    key = {"HTTP_IDEMPOTENCY_KEY": "retry-7f3a"}
    data = png_bytes(size=32)
    first = post_file(client, data, name="a.png", headers=key, accession_number="ACC-9")
    again = post_file(client, data, name="a.png", headers=key, accession_number="ACC-9")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and Image.objects.count() == 1
    assert InferenceRequest.objects.count() == 1

    other = post_file(client, png_bytes(size=32, seed=2), name="b.png", headers=key, accession_number="ACC-9")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert "different upload" in other.json()["error"]["message"]
    fields = post_file(client, data, name="a.png", headers=key, accession_number="ACC-10")
    assert fields.status_code == 422

    elsewhere = post_file(api_client_for(clinician_b), data, name="a.png", headers=key)
    assert elsewhere.status_code == 201 and elsewhere.json()["id"] != first.json()["id"]  # keys are per hospital
    assert UploadKey.objects.count() == 2


def test_a_dicom_retried_with_its_key_answers_all_its_frames(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    frames = np.stack([np.full((16, 16), 100 * i, dtype=np.uint16) for i in range(3)])
    data = to_bytes(make_dataset(frames, bits=12))
    key = {"HTTP_IDEMPOTENCY_KEY": "scan-1"}
    first, again = post_file(client, data, headers=key), post_file(client, data, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["images"] == again.json()["images"] and len(again.json()["images"]) == 3
    assert Image.objects.count() == 3


def test_a_key_that_is_not_printable_ascii_is_a_400(clinician_a, demo_model):
    response = post_file(
        api_client_for(clinician_a), png_bytes(size=32), name="a.png", headers={"HTTP_IDEMPOTENCY_KEY": "x" * 129}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_idempotency_key"
    assert not Image.objects.exists()


# -- the syntaxes the README names, on files pydicom ships, through the upload path ------------------------------

SHIPPED_SYNTAXES = [
    ("JPGExtended.dcm", "JPEG Extended (Process 2 and 4)"),  # 12-bit lossy JPEG
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS Lossy (Near-Lossless) Image Compression"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),  # RGB
]


@pytest.mark.parametrize(("name", "syntax"), SHIPPED_SYNTAXES, ids=[name for name, _ in SHIPPED_SYNTAXES])
def test_a_shipped_file_in_each_named_syntax_is_uploaded_rendered_and_shown_as_pydicom_decodes_it(
    clinician_a, demo_model, render_worker, name, syntax
):
    from PIL import Image as PillowImage
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file(name, download=False)
    reference = dcmread(path)
    assert reference.file_meta.TransferSyntaxUID.name.startswith(syntax)
    expected = reference.pixel_array  # pydicom's own decoders: the platform must show the same pixels
    client = api_client_for(clinician_a)
    with open(path, "rb") as handle:
        response = render_worker.post(client, handle.read(), name=name)
    assert response.status_code == 202, response.json()
    assert response.json()["state"] == "received"  # compressed: decoded by the worker, not the request
    render_worker.run()

    image = Image.objects.get()
    assert image.state == "rendered"
    assert (image.width, image.height) == (reference.Columns, reference.Rows)
    assert InferenceRequest.objects.filter(image=image).count() == 1  # and it is read by the model
    shown = np.asarray(PillowImage.open(io.BytesIO(b"".join(client.get(f"/api/v1/images/{image.pk}/file/")))))
    if reference.PhotometricInterpretation == "RGB":
        np.testing.assert_array_equal(shown, expected)  # lossless colour: the very pixels
        assert client.get(f"/api/v1/images/{image.pk}/pixels/").status_code == 404  # no modality values
        return
    assert shown.shape == expected.shape
    values = np.frombuffer(client.get(f"/api/v1/images/{image.pk}/pixels/").content, "<f4").reshape(expected.shape)
    np.testing.assert_array_equal(values, apply_modality_lut(expected, reference).astype(np.float32))
