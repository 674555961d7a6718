"""A PNG/JPEG upload is checked, stored as it came and recorded received, its read queued at
once; the worker's display copy is the only form of it a browser gets, and the original goes
once the copy exists. ``render_received`` does what workers/runner.py does with the image it
decoded for the model (the public helpers of recognition.services.images)."""

import io

import pytest
from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image as PILImage

from recognition.display import display_copy
from recognition.models import Image, InferenceRequest
from recognition.services import images as image_services
from recognition.services.images import (
    image_display_store,
    image_rendered,
    image_upload,
    images_render,
    images_render_reconcile,
)
from tests.conftest import api_client_for, jpeg_bytes, png_bytes, render_received, upload_file
from workers import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def post(client, data: bytes, name: str = "scan.jpg"):
    return client.post("/api/v1/images/", {"file": upload_file(data, name)}, format="multipart")


def jpeg_with_exif(size: int = 160) -> bytes:
    exif = PILImage.Exif()
    exif[0x013B] = "DOE^JANE"  # Artist: a name in the metadata, never to be served
    buffer = io.BytesIO()
    PILImage.open(io.BytesIO(jpeg_bytes(size))).save(buffer, "JPEG", exif=exif, quality=90)
    return buffer.getvalue()


def test_a_jpeg_upload_is_stored_as_sent_and_received_with_its_read_queued(clinician_a, demo_model):
    data = jpeg_with_exif()
    client = api_client_for(clinician_a)

    response = post(client, data)

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["state"] == "received" and body["status"] == "queued"
    assert body["width"] == body["height"] == 160 and body["format"] == "JPEG"
    image = Image.objects.get(pk=body["id"])
    assert image.file.name == "" and image.sha256 == "" and image.byte_size == len(data)
    assert image.original.name.startswith(f"tenants/{clinician_a.tenant_id}/originals/")
    assert image.original.name.endswith(".jpg") and "scan" not in image.original.name
    with image.original.open("rb") as stored:
        assert stored.read() == data  # not re-encoded in the request
    assert InferenceRequest.objects.get(image=image).status == "queued"
    # nothing of it is served while it is received: not the original, not a broken file
    refused = client.get(f"/api/v1/images/{image.pk}/file/")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "rendering"
    assert client.get(f"/api/v1/images/{image.pk}/").json()["state"] == "received"


def test_the_image_page_says_it_is_being_prepared(client, clinician_a, demo_model):
    image = image_upload(membership=clinician_a, upload=upload_file(jpeg_bytes(), "scan.jpg"))
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert "being prepared for display" in page and "data-image-url" not in page


def test_the_runners_render_serves_the_copy_without_metadata_and_deletes_the_original(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    image = Image.objects.get(pk=post(client, jpeg_with_exif()).json()["id"])
    original = image.original.name

    render_received(image)

    image.refresh_from_db()
    assert image.state == "rendered" and image.original.name == "" and image.file.name.endswith(".jpg")
    assert not default_storage.exists(original)  # after commit: nothing needs it once the copy exists
    download = client.get(f"/api/v1/images/{image.pk}/file/")
    assert download.status_code == 200 and download["Content-Type"] == "image/jpeg"
    served = b"".join(download.streaming_content)
    assert b"DOE^JANE" not in served and b"Exif" not in served
    assert image.sha256 and image.byte_size == len(served)


def test_a_second_render_of_the_same_image_keeps_the_first_copy(clinician_a, demo_model):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(), "scan.png"))
    late = Image.objects.get(pk=image.pk)  # read before the first render, as a redelivered task would
    render_received(image)
    first = Image.objects.get(pk=image.pk).file.name

    copy = display_copy(PILImage.open(io.BytesIO(png_bytes())), "PNG")
    name = image_display_store(image=late, copy=copy)
    with transaction.atomic():
        assert image_rendered(image=late, copy=copy, stored_name=name) is False

    assert Image.objects.get(pk=image.pk).file.name == first and default_storage.exists(first)
    assert not default_storage.exists(name)


def test_images_render_renders_an_upload_without_a_read_and_leaves_one_with_a_read_to_it(clinician_a, demo_model):
    waiting = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=1), "a.png"))
    alone = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=2), "b.png"), read=False)
    assert alone.state == "received" and not InferenceRequest.objects.filter(image=alone).exists()
    kept = alone.original.name

    assert images_render(image_ids=[waiting.pk, alone.pk]) == 1

    alone.refresh_from_db()
    waiting.refresh_from_db()
    assert alone.state == "rendered" and alone.file.name.endswith(".png") and not default_storage.exists(kept)
    with alone.file.open("rb") as stored:
        assert PILImage.open(stored).format == "PNG"
    assert waiting.state == "received"  # its queued read renders it, from the decode the model needs


def test_an_upload_without_a_read_queues_its_render_after_commit(clinician_a, demo_model, monkeypatch):
    sent, queues = [], []
    monkeypatch.setattr(
        image_services,
        "task_send",
        lambda name, args, **options: (sent.append(args[0]), queues.append(options.get("queue"))),
    )
    image = image_upload(membership=clinician_a, upload=upload_file(jpeg_bytes(), "a.jpg"), read=False)
    assert sent == [[image.pk]]
    # a bulk job's item: the bulk lane renders it, never in front of the interactive lane's reads
    assert queues == ["bulk"]
    tasks.image_render.apply(args=[sent.pop()], throw=True)
    assert Image.objects.get(pk=image.pk).state == "rendered"


def test_reconciliation_renders_a_received_upload_whose_read_is_over(clinician_a, demo_model, monkeypatch, settings):
    """A read that ended without rendering (its model failed to load, say) leaves the image
    received; once the stall time passes, reconciliation renders it for display."""
    sent, queues = [], []
    monkeypatch.setattr(
        image_services,
        "task_send",
        lambda name, args, **options: (sent.append(args[0]), queues.append(options.get("queue"))),
    )
    settings.SIGHTLINE_RENDER_STALL_SECONDS = 0
    image = image_upload(membership=clinician_a, upload=upload_file(jpeg_bytes(), "a.jpg"))
    InferenceRequest.objects.filter(image=image).update(status="failed")

    assert images_render_reconcile() == 1
    assert queues == ["bulk"]  # no read waits for this render
    tasks.image_render.apply(args=[sent.pop()], throw=True)

    assert Image.objects.get(pk=image.pk).state == "rendered"


def test_a_bulk_jobs_files_become_received_images_rendered_by_the_worker_step(clinician_a, demo_model, monkeypatch):
    from tests.integration.test_batches import create

    sent = []
    monkeypatch.setattr(image_services, "task_send", lambda name, args, **options: sent.append(args[0]))
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [upload_file(png_bytes(seed=3), "a.png"), upload_file(jpeg_bytes(), "b.jpg")]
    added = client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart")
    assert added.status_code in (200, 201, 202), added.json()

    from recognition.models import BatchItem

    ids = BatchItem.objects.filter(job_id=job["id"]).values_list("image_id", flat=True)
    images = list(Image.objects.filter(pk__in=ids).order_by("pk"))
    assert [image.state for image in images] == ["received", "received"]
    assert not InferenceRequest.objects.filter(image__in=images).exists()  # the job queues reads when it starts
    for ids in sent:
        tasks.image_render.apply(args=[ids], throw=True)
    assert set(Image.objects.filter(pk__in=[i.pk for i in images]).values_list("state", flat=True)) == {"rendered"}


def _refused_by_a_full_decode(data: bytes) -> list[int]:
    """Cuts of ``data`` that a full decode refuses (a PNG cut inside its 12-byte IEND decodes)."""
    cuts = []
    for cut in (len(data) // 4, len(data) // 2, len(data) - 200, len(data) - 20, len(data) - 3):
        try:
            with PILImage.open(io.BytesIO(data[:cut])) as reference:
                reference.load()
        except OSError:
            cuts.append(cut)
    return cuts


@pytest.mark.parametrize("which", ["jpeg-224", "jpeg-640", "png"])
def test_a_truncated_upload_is_refused_at_every_cut_and_stores_nothing(clinician_a, demo_model, which):
    """A JPEG is checked at 1/8 scale: libjpeg still reads the whole entropy stream, so a cut
    anywhere is found as it is at full size."""
    data = {"jpeg-224": jpeg_bytes(224), "jpeg-640": jpeg_bytes(640), "png": png_bytes(size=256)}[which]
    client = api_client_for(clinician_a)
    cuts = _refused_by_a_full_decode(data)
    assert len(cuts) >= 3
    for cut in cuts:
        response = post(client, data[:cut])
        assert response.status_code == 422, (cut, response.json())
        assert response.json()["error"]["code"] == "damaged_image"
    assert not Image.objects.exists() and not InferenceRequest.objects.exists()
    assert post(client, data).status_code == 201  # the whole file is fine


def test_the_jpeg_check_decodes_at_reduced_scale(monkeypatch):
    from PIL import ImageFile

    data, seen = jpeg_bytes(640), []
    real = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    checked = image_services.image_check(data)
    assert (checked.width, checked.height) == (640, 640)  # the size the file declares
    assert seen == [(80, 80)]


def test_an_upload_whose_original_is_gone_fails_in_words(clinician_a, demo_model):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(), "a.png"), read=False)
    default_storage.delete(image.original.name)
    assert images_render(image_ids=[image.pk]) == 0
    image.refresh_from_db()
    assert image.state == "failed" and image.unprocessable_reason == "The uploaded file is missing from storage."
