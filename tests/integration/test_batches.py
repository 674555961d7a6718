"""Bulk jobs through the API and the services, with the real engine and database (the worker's
tasks are called in-process here; tests/e2e runs them on a real worker)."""

import csv
import io
import json
import time
import uuid
import zipfile
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from accounts.models import AccessEvent
from recognition.models import BatchItem, BatchJob, BatchUpload, InferenceRequest, Result
from recognition.services.jobs import batch_upload_expand
from tests.conftest import api_client_for, png_bytes
from workers import tasks
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def make_zip(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def create(client, name="night films", key=None, **data):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    return client.post("/api/v1/batches/", {"name": name, **data}, format="json", **headers)


def add_zip(client, job_id, data: bytes):
    upload = SimpleUploadedFile("night.zip", data, content_type="application/zip")
    return client.post(f"/api/v1/batches/{job_id}/items/", {"archive": upload}, format="multipart")


def expand_all():
    for upload in BatchUpload.objects.filter(status__in=["received", "expanding"]):
        batch_upload_expand(upload_id=upload.pk)


def run_worker():
    while (waiting := InferenceRequest.objects.filter(status="queued").order_by("id").first()) is not None:
        inference_run(request_id=waiting.pk)


def test_a_zip_job_runs_to_one_row_per_item_with_the_finding_or_the_error(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    assert job["state"] == "open" and job["model_version"] == demo_model.version
    archive = make_zip(
        [(f"scans/{i}.png", png_bytes(seed=i, size=64)) for i in range(5)]
        + [("notes.txt", b"not an image"), ("../../../etc/evil.png", png_bytes(seed=9, size=64))]
    )
    assert add_zip(client, job["id"], archive).status_code == 202
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 409  # still unpacking
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "complete" and upload.entries == 7
    assert not default_storage.exists(upload.source)  # the archive is gone once unpacked
    started = client.post(f"/api/v1/batches/{job['id']}/start/").json()
    assert started["state"] == "running" and started["counts"]["queued"] == 6 and started["counts"]["failed"] == 1
    assert set(InferenceRequest.objects.values_list("priority", flat=True)) == {InferenceRequest.Priority.BULK}
    run_worker()
    status = client.get(f"/api/v1/batches/{job['id']}/").json()
    assert status["state"] == "finished" and status["counts"]["done"] == 6 and status["total"] == 7
    assert status["images_per_s"] > 0 and status["eta_s"] == 0
    response = client.get(f"/api/v1/batches/{job['id']}/results/")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [row["position"] for row in rows] == [str(i) for i in range(1, 8)]
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["position"] == "6" and "not an image" in failed[0]["error"]
    assert all(row["top_label"] for row in rows if row["status"] == "done")
    assert Result.objects.count() == 6
    as_json = json.loads(b"".join(client.get(f"/api/v1/batches/{job['id']}/results/?format=json").streaming_content))
    assert len(as_json["results"]) == 7
    assert AccessEvent.objects.filter(action="batch.results", target_id=str(job["id"])).count() == 2


def test_the_same_idempotency_key_gives_the_same_job(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    first = create(client, key="import-2026-11-29")
    again = create(client, key="import-2026-11-29")
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]
    assert create(client, name="another", key="import-2026-11-29").status_code == 409
    assert create(client, key="other-key").json()["id"] != first.json()["id"]
    assert BatchJob.objects.count() == 2


def test_files_become_items_and_a_bad_file_a_failed_item(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [
        SimpleUploadedFile("a.png", png_bytes(seed=1, size=64)),
        SimpleUploadedFile("b.png", b"\x89PNG broken"),
        SimpleUploadedFile("c.png", png_bytes(seed=2, size=64)),
    ]
    response = client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart")
    assert response.status_code == 202 and response.json()["counts"] == {
        "pending": 2,
        "queued": 0,
        "running": 0,
        "done": 0,
        "failed": 1,
        "cancelled": 0,
    }
    assert not InferenceRequest.objects.exists()  # nothing is read before the job starts


def test_cancel_stops_waiting_items_and_retry_requeues_failed_ones(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [SimpleUploadedFile(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(4)]
    client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart")
    client.post(f"/api/v1/batches/{job['id']}/start/")
    first = InferenceRequest.objects.order_by("id").first()
    InferenceRequest.objects.filter(pk=first.pk).update(status="running", started_at=timezone.now(), attempts=1)
    cancelled = client.post(f"/api/v1/batches/{job['id']}/cancel/").json()
    assert cancelled["state"] == "cancelled" and cancelled["counts"]["cancelled"] == 3
    assert InferenceRequest.objects.filter(status="cancelled").count() == 3
    run_worker()  # nothing is left queued: cancelled requests are never claimed
    assert not Result.objects.exists()
    assert client.post(f"/api/v1/batches/{job['id']}/retry/").status_code == 409

    job2 = create(client, name="second").json()
    client.post(
        f"/api/v1/batches/{job2['id']}/items/",
        {"files": [SimpleUploadedFile("x.png", png_bytes(size=64))]},
        format="multipart",
    )
    client.post(f"/api/v1/batches/{job2['id']}/start/")
    item = BatchItem.objects.get(job_id=job2["id"])
    InferenceRequest.objects.filter(pk=item.request_id).update(status="failed", error="boom")
    BatchItem.objects.filter(pk=item.pk).update(status="failed")
    BatchJob.objects.filter(pk=job2["id"]).update(started_at=timezone.now() - timedelta(hours=2))
    retried = client.post(f"/api/v1/batches/{job2['id']}/retry/").json()
    assert retried["counts"]["queued"] == 1
    run_worker()
    finished = client.get(f"/api/v1/batches/{job2['id']}/").json()
    assert finished["state"] == "finished" and finished["counts"]["done"] == 1
    # the pace is the retry's own, not one item over the two hours since the first start
    assert finished["images_per_s"] > 1 / 60

    # a finished job has nothing to cancel: it stays finished, with its results
    refused = client.post(f"/api/v1/batches/{job2['id']}/cancel/")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "finished"
    assert client.get(f"/api/v1/batches/{job2['id']}/").json()["state"] == "finished"


def test_an_import_reads_only_the_hospitals_own_prefix(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    # a folder of its own: stored files outlive the rolled-back rows, and other tests import too
    own = f"tenants/{clinician_a.tenant_id}/imports/night-{uuid.uuid4().hex}/"
    for i in range(3):
        default_storage.save(f"{own}{i}.png", ContentFile(png_bytes(seed=i, size=64)))
    for prefix in (f"tenants/{clinician_a.tenant_id + 1}/imports/", "tenants/", f"{own}../../images/"):
        response = client.post(f"/api/v1/batches/{job['id']}/items/", {"prefix": prefix}, format="multipart")
        assert response.status_code == 400 and response.json()["error"]["code"] == "foreign_prefix", prefix
    assert client.post(f"/api/v1/batches/{job['id']}/items/", {"prefix": own}, format="multipart").status_code == 202
    expand_all()
    assert BatchItem.objects.filter(job_id=job["id"], status="pending").count() == 3


def test_an_expansion_that_died_half_way_finishes_without_doubles(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    add_zip(client, job["id"], make_zip([(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(4)]))
    upload = BatchUpload.objects.get()
    batch_upload_expand(upload_id=upload.pk)
    # as if the worker died after two entries: the upload is not complete, two items exist
    BatchItem.objects.filter(position__gt=2).delete()
    BatchUpload.objects.filter(pk=upload.pk).update(status="expanding", touched_at=timezone.now())
    default_storage.save(
        upload.source, ContentFile(make_zip([(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(4)]))
    )
    batch_upload_expand(upload_id=upload.pk)  # a redelivery while the expander may still live: left alone
    assert BatchItem.objects.count() == 2
    BatchUpload.objects.filter(pk=upload.pk).update(touched_at=timezone.now() - timedelta(hours=1))
    batch_upload_expand(upload_id=upload.pk)  # no sign of life for the stall time: taken over, resumed
    assert sorted(BatchItem.objects.values_list("position", flat=True)) == [1, 2, 3, 4]
    assert BatchUpload.objects.get().status == "complete"


def test_reconciliation_cleans_up_an_archive_that_never_arrived_and_requeues_lost_expansions(
    clinician_a, demo_model, monkeypatch
):
    from recognition.services.jobs import intake

    client = api_client_for(clinician_a)
    job = create(client).json()
    long_ago = timezone.now() - timedelta(hours=1)
    # the web process died while storing an archive: its row says "receiving", part of it is stored
    partial = BatchUpload.objects.create(
        tenant_id=clinician_a.tenant_id, job_id=job["id"], kind="zip", status="receiving", touched_at=long_ago,
        source=f"tenants/{clinician_a.tenant_id}/archives/partial.zip",
    )  # fmt: skip
    default_storage.save(partial.source, ContentFile(b"PK\x03\x04 half an archive"))
    # a received archive whose expansion message Redis lost, a dead expansion, and a live one
    lost = BatchUpload.objects.create(
        tenant_id=clinician_a.tenant_id, job_id=job["id"], kind="zip", status="received", touched_at=long_ago,
        source="x",
    )  # fmt: skip
    dead = BatchUpload.objects.create(
        tenant_id=clinician_a.tenant_id, job_id=job["id"], kind="zip", status="expanding", touched_at=long_ago,
        source="y",
    )  # fmt: skip
    BatchUpload.objects.create(
        tenant_id=clinician_a.tenant_id, job_id=job["id"], kind="zip", status="expanding",
        touched_at=timezone.now(), source="z",
    )  # fmt: skip
    queued = []
    monkeypatch.setattr(intake, "batch_upload_expand_enqueue", queued.append)

    assert tasks.batch_reconcile.apply().get() == 3
    assert sorted(queued) == sorted([lost.pk, dead.pk])
    partial.refresh_from_db()
    assert partial.status == "refused" and "did not finish" in partial.error
    assert not default_storage.exists(partial.source)  # no orphan bytes
    status = client.get(f"/api/v1/batches/{job['id']}/").json()
    assert status["uploads_pending"] == 3 and status["total"] == 0  # the refused one no longer counts


def test_an_archive_the_storage_refuses_leaves_nothing_behind(clinician_a, demo_model, monkeypatch):
    client = api_client_for(clinician_a)
    job = create(client).json()

    def broken_save(name, content, max_length=None):
        raise OSError("disk full")

    monkeypatch.setattr(default_storage, "save", broken_save)
    with pytest.raises(OSError):
        add_zip(client, job["id"], make_zip([("a.png", png_bytes(size=64))]))
    (upload,) = BatchUpload.objects.all()
    assert upload.status == "refused" and "could not be stored" in upload.error
    assert client.get(f"/api/v1/batches/{job['id']}/").json()["uploads_pending"] == 0


def test_a_hostile_archive_is_refused_in_words(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    assert add_zip(client, job["id"], b"PK\x03\x04 this is no zip").status_code == 202
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "refused" and upload.error
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200  # a refused upload blocks nothing


def test_requests_stuck_running_are_requeued_until_their_attempts_run_out(clinician_a, demo_model, settings):
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [SimpleUploadedFile(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(2)]
    client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart")
    client.post(f"/api/v1/batches/{job['id']}/start/")
    long_ago = timezone.now() - timedelta(seconds=settings.SIGHTLINE_REQUEST_TIME_LIMIT_SECONDS + 5)
    a, b = InferenceRequest.objects.order_by("id")
    InferenceRequest.objects.filter(pk=a.pk).update(status="running", started_at=long_ago, attempts=1, claimed_by="h:1")
    InferenceRequest.objects.filter(pk=b.pk).update(
        status="running", started_at=long_ago, attempts=settings.SIGHTLINE_MAX_ATTEMPTS, claimed_by="h:2"
    )
    assert tasks.batch_reconcile.apply().get() == 2
    a.refresh_from_db(), b.refresh_from_db()
    assert a.status == "queued" and b.status == "failed" and "time limit" in b.error
    assert BatchItem.objects.get(request=b).status == "failed"
    run_worker()
    assert client.get(f"/api/v1/batches/{job['id']}/").json()["counts"] == {
        "pending": 0,
        "queued": 0,
        "running": 0,
        "done": 1,
        "failed": 1,
        "cancelled": 0,
    }


def test_another_hospitals_job_is_a_404(clinician_a, clinician_b, demo_model):
    job = create(api_client_for(clinician_a)).json()
    other = api_client_for(clinician_b)
    for method, suffix in (("get", ""), ("post", "start/"), ("post", "cancel/"), ("get", "results/")):
        assert getattr(other, method)(f"/api/v1/batches/{job['id']}/{suffix}").status_code == 404
    assert other.get("/api/v1/batches/").json()["results"] == []


def test_the_jobs_page_creates_fills_and_starts_a_job(client, clinician_a, demo_model):
    client.force_login(clinician_a.user)
    assert client.post("/jobs/", {"name": "from the page"}).status_code == 302
    job = BatchJob.objects.get()
    page = client.get("/jobs/").content.decode()
    assert f"/jobs/{job.pk}/items/" in page and f"/jobs/{job.pk}/start/" in page
    assert f"sightline-demo v{demo_model.serial} · 1.0.0" in page  # the serial beside the version
    archive = SimpleUploadedFile("x.zip", make_zip([("a.png", png_bytes(size=64))]), content_type="application/zip")
    client.post(f"/jobs/{job.pk}/items/", {"archive": archive})
    expand_all()
    client.post(f"/jobs/{job.pk}/start/")
    run_worker()
    page = client.get("/jobs/").content.decode()
    assert "from the page" in page and "finished" in page and "1 of 1 finished" in page
    rows = b"".join(client.get(f"/jobs/{job.pk}/results.csv").streaming_content).decode().splitlines()
    assert len(rows) == 2 and ",done," in rows[1]
    card = page.split(f'data-job="{job.pk}"')[1]
    # a finished job offers neither start nor cancel; with nothing failed, no retry either
    for action in ("add", "start", "cancel", "retry"):
        assert f'data-action="{action}" hidden>' in card, action

    # retrying a job whose failures never became images says so, instead of nothing
    BatchItem.objects.create(tenant=job.tenant, job=job, position=99, status="failed", error="not an image")
    response = client.post(f"/jobs/{job.pk}/retry/", follow=True)
    assert "No failed item can be read again" in response.content.decode()


def dicom_without_lut_descriptor() -> bytes:
    """A real file pydicom writes: its ModalityLUTSequence item has LUT data but no LUTDescriptor,
    so pydicom's modality LUT raises AttributeError while the file is read."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", [0, 1, 2, 3])  # LUTData
    ds.ModalityLUTSequence = Sequence([item])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_an_entry_its_reader_fails_on_fails_alone_in_words_and_the_archive_still_ends(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    archive = make_zip(
        [("a.png", png_bytes(seed=1, size=64)), ("bad.dcm", dicom_without_lut_descriptor()), ("c.png", png_bytes())]
    )
    assert add_zip(client, job["id"], archive).status_code == 202
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "complete" and upload.entries == 3
    assert not default_storage.exists(upload.source)
    items = list(BatchItem.objects.order_by("position"))
    assert [item.status for item in items] == ["pending", "failed", "pending"]
    assert items[1].position == 2 and len(items[1].error) > 20  # in words, whoever reads it
    started = client.post(f"/api/v1/batches/{job['id']}/start/").json()
    assert started["counts"]["queued"] == 2 and started["counts"]["failed"] == 1


def test_a_file_its_reader_fails_on_is_a_failed_item_not_a_500(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    files = [SimpleUploadedFile("bad.dcm", dicom_without_lut_descriptor()), SimpleUploadedFile("a.png", png_bytes())]
    response = client.post(f"/api/v1/batches/{job['id']}/items/", {"files": files}, format="multipart")
    assert response.status_code == 202 and response.json()["counts"]["failed"] == 1
    assert response.json()["counts"]["pending"] == 1
    assert BatchItem.objects.get(status="failed").error


@pytest.mark.django_db(transaction=True)
def test_an_upload_whose_worker_crashes_every_time_is_refused_after_the_cap(
    clinician_a, demo_model, settings, monkeypatch
):
    """A real crash: a separate process that dies (os._exit) in the middle of an entry, as an OOM
    kill would, leaves the upload "expanding"; reconciliation hands it out again until the attempts
    in a row without progress are spent, then refuses it in words and deletes the archive."""
    import os
    import subprocess
    import sys

    from recognition.services.jobs import intake
    from tests.e2e.conftest import database_url

    settings.SIGHTLINE_UPLOAD_MAX_ATTEMPTS = 2
    client = api_client_for(clinician_a)
    job = create(client).json()
    add_zip(client, job["id"], make_zip([("a.png", png_bytes(seed=1, size=64))]))
    upload = BatchUpload.objects.get()
    queued = []
    monkeypatch.setattr(intake, "batch_upload_expand_enqueue", queued.append)
    crash = (
        "import os, django; django.setup()\n"
        "from recognition.services.jobs import expansion, intake\n"
        "intake.images_upload = lambda **kwargs: os._exit(137)\n"
        f"expansion.batch_upload_expand(upload_id={upload.pk})\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DATABASE_URL": database_url()}
    env.update(SIGHTLINE_VAR_DIR=str(settings.VAR_DIR), SIGHTLINE_UPLOAD_MAX_ATTEMPTS="2")
    for attempt in (1, 2):
        died = subprocess.run([sys.executable, "-c", crash], env=env, timeout=300, capture_output=True)
        assert died.returncode == 137, died.stderr.decode()[-2000:]
        upload.refresh_from_db()
        assert (upload.status, upload.attempts) == ("expanding", attempt)
        BatchUpload.objects.filter(pk=upload.pk).update(touched_at=timezone.now() - timedelta(hours=1))
        queued.clear()
        tasks.batch_reconcile.apply().get()
        assert queued == ([upload.pk] if attempt == 1 else [])  # the second crash spent the attempts
    upload.refresh_from_db()
    assert upload.status == "refused" and "2 times in a row" in upload.error and "worker stopped" in upload.error
    assert not default_storage.exists(upload.source)
    assert not BatchItem.objects.exists()
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200


def test_an_attempt_that_fails_is_handed_back_and_the_cap_ends_it(clinician_a, demo_model, settings, monkeypatch):
    from recognition.services.jobs import expansion

    client = api_client_for(clinician_a)
    job = create(client).json()
    add_zip(client, job["id"], make_zip([("a.png", png_bytes(seed=1, size=64))]))
    upload = BatchUpload.objects.get()

    def broken(archive, limits):  # an error no one foresaw, every time
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(expansion, "read_archive", broken)
    for attempt in range(1, settings.SIGHTLINE_UPLOAD_MAX_ATTEMPTS + 1):
        with pytest.raises(RuntimeError):
            batch_upload_expand(upload_id=upload.pk)  # the task fails (and is logged); the upload is handed back
        upload.refresh_from_db()
        if attempt < settings.SIGHTLINE_UPLOAD_MAX_ATTEMPTS:
            assert (upload.status, upload.attempts) == ("received", attempt) and "RuntimeError" in upload.error
    assert upload.status == "refused" and "RuntimeError" in upload.error and "send it again" in upload.error
    assert not default_storage.exists(upload.source)
    batch_upload_expand(upload_id=upload.pk)  # a late redelivery changes nothing
    assert BatchUpload.objects.get().status == "refused"


def test_an_expander_taken_for_dead_writes_nothing_after_the_takeover(clinician_a, demo_model, monkeypatch):
    from django.db.models import F

    from recognition.services.jobs import intake

    client = api_client_for(clinician_a)
    job = create(client).json()
    add_zip(client, job["id"], make_zip([(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(4)]))
    upload = BatchUpload.objects.get()
    real = intake.images_upload
    calls = []

    def slow_then_overtaken(**kwargs):
        calls.append(1)
        if len(calls) == 2:  # meanwhile reconciliation took it for dead and another expander claimed it
            BatchUpload.objects.filter(pk=upload.pk).update(claim=F("claim") + 1)
        return real(**kwargs)

    monkeypatch.setattr(intake, "images_upload", slow_then_overtaken)
    batch_upload_expand(upload_id=upload.pk)
    # its second entry was written before it knew; from the third on it wrote nothing, nor ended the upload
    assert sorted(BatchItem.objects.values_list("position", flat=True)) == [1, 2]
    assert BatchUpload.objects.get().status == "expanding"


@pytest.mark.django_db(transaction=True)
def test_files_added_while_the_job_starts_are_queued_or_refused_never_left_pending(
    clinician_a, demo_model, monkeypatch
):
    import threading

    from django.db import connection

    from core.errors import Conflict
    from recognition.services.jobs import batch_items_add_files, batch_job_start, intake

    job = create(api_client_for(clinician_a)).json()
    real = intake.images_upload
    second_file = threading.Event()
    outcome = {}

    def reading(**kwargs):
        if kwargs["upload"].name == "1.png":
            second_file.set()
            time.sleep(1.0)  # the start comes while this file is being read
        return real(**kwargs)

    monkeypatch.setattr(intake, "images_upload", reading)

    def add():
        files = [SimpleUploadedFile(f"{i}.png", png_bytes(seed=i, size=64)) for i in range(4)]
        try:
            batch_items_add_files(membership=clinician_a, job_id=job["id"], files=files)
        except Conflict as exc:
            outcome["refused"] = exc
        finally:
            connection.close()

    def start():
        second_file.wait(30)
        try:
            batch_job_start(membership=clinician_a, job_id=job["id"])
        finally:
            connection.close()

    threads = [threading.Thread(target=add), threading.Thread(target=start)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert BatchJob.objects.get().status == "running"
    statuses = list(BatchItem.objects.values_list("status", flat=True))
    # the files added before the start are read, the others refused; none waits for ever
    assert statuses and set(statuses) == {"queued"}, statuses
    added = len(statuses)
    if added < 4:  # the start came between two files (it waited for the one being read)
        refused = outcome["refused"]
        assert refused.code == "job_started" and refused.detail == {"added": added}
        assert f"the first {added} of 4 were added" in refused.message
    assert InferenceRequest.objects.count() == added


@pytest.mark.django_db(transaction=True)
def test_two_creates_at_once_with_one_idempotency_key_answer_the_same_job(clinician_a, demo_model, monkeypatch):
    """The second create's INSERT waits on the first one's unique key and then fails; it answers
    the job the first one made (200), not a 500."""
    import threading

    from django.db import connection

    from recognition.services.jobs import lifecycle

    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises the two creates (one write transaction at a time): they cannot race there")
    real = lifecycle.batch_job_record
    first_inserted = threading.Event()
    answers = {}

    def record(membership, action, job, request):
        if action == "batch.create" and not first_inserted.is_set():
            first_inserted.set()
            # hold the first job uncommitted until the second create is waiting on its key
            deadline = time.monotonic() + 30
            with connection.cursor() as cursor:
                while time.monotonic() < deadline:
                    cursor.execute("SELECT pg_stat_clear_snapshot()")  # else the transaction sees one snapshot
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock'"
                    )
                    if cursor.fetchone()[0]:
                        break
                    time.sleep(0.05)
                else:
                    answers["never_waited"] = True
        return real(membership, action, job, request)

    monkeypatch.setattr(lifecycle, "batch_job_record", record)

    def post(which):
        if which == "second":
            first_inserted.wait(30)
        try:
            answers[which] = create(api_client_for(clinician_a), key="nightly-2026-12-01")
        except Exception as exc:  # today's code: the IntegrityError escapes as a 500
            answers[which] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(which,)) for which in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert "never_waited" not in answers  # the two really raced
    first, second = answers["first"], answers["second"]
    assert not isinstance(second, Exception), repr(second)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert BatchJob.objects.count() == 1


def test_an_upload_of_a_job_cancelled_before_it_was_unpacked_ends_refused(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = create(client).json()
    add_zip(client, job["id"], make_zip([("a.png", png_bytes(seed=1, size=64))]))
    assert client.post(f"/api/v1/batches/{job['id']}/cancel/").status_code == 200
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "refused" and "cancelled" in upload.error
    assert not default_storage.exists(upload.source) and not BatchItem.objects.exists()
