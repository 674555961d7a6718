"""Findings back to the hospital's PACS (issue 15, item 4), against a real Orthanc playing the PACS.

The made objects here are Instance rows built from pydicom's test files (an SR, and a CT recast
as a secondary capture standing in for the heatmap); dicomnet/objects.py makes the real ones.
The sender's task function is called directly (the database's `db` fixture holds the test in
one transaction, so nothing is enqueued on commit); tests/e2e/test_dicom_sending_e2e.py runs it
through a real Celery worker.
"""

from __future__ import annotations

import http.server
import io
import logging
import socket
import threading
import time
import urllib.request
import uuid
from unittest import mock

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connection
from django.test import Client, override_settings
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from accounts.models import AccessEvent, Role
from dicomnet import sending
from dicomnet.destinations import (
    DestinationFields,
    DestinationRefused,
    destination_create,
    destination_test,
    destination_update,
    secret_decrypt,
)
from dicomnet.models import Delivery, Destination, Instance
from dicomnet.tasks import deliveries_reconcile, delivery_send
from recognition.services.images import image_upload
from recognition.storage import dicom_key
from tests.conftest import member, upload_file
from tests.peers import free_port, orthanc_running

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SECRET = "s3cret-Token-never-shown-4711"

pytestmark = pytest.mark.django_db


# --- made objects and destinations ----------------------------------------------------------------


def _test_file(name: str) -> bytes:
    with open(get_testdata_file(name, download=False), "rb") as handle:
        return handle.read()


def _sc_map_bytes() -> bytes:
    """A CT recast as a secondary capture with UIDs of its own: the heatmap's stand-in."""
    ds = dcmread(io.BytesIO(_test_file("CT_small.dcm")))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _sr_bytes() -> bytes:
    ds = dcmread(io.BytesIO(_test_file("test-SR.dcm")))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_image(membership):
    return image_upload(membership=membership, upload=upload_file(_test_file("CT_small.dcm"), "ct.dcm"), read=False)


def made(image, kind: str, data: bytes, *, key: str = "") -> Instance:
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    name = default_storage.save(key or dicom_key(tenant_id=image.tenant_id), ContentFile(data))
    return Instance.objects.create(
        tenant=image.tenant,
        study=image.study,
        series=image.series,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality=str(ds.get("Modality", "")),
        file=name,
        byte_size=len(data),
        origin=Instance.Origin.CREATED,
        kind=kind,
        source_image=image,
    )


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


@pytest.fixture
def admin_b(hospital_b):
    return member(hospital_b, "admin-b", Role.TENANT_ADMIN)


@pytest.fixture
def objects_a(clinician_a):
    image = dicom_image(clinician_a)
    return image, made(image, "ai_sr", _sr_bytes()), made(image, "map", _sc_map_bytes())


def dimse(actor, port: int, *, name: str = "pacs", ae_title: str = "ORTHANC", send_on: str = "result"):
    return destination_create(
        actor=actor,
        fields=DestinationFields(
            name=name, kind="dimse", host="127.0.0.1", port=port, ae_title=ae_title, send_on=send_on
        ),
    )


def stow(actor, url: str, *, name: str = "pacs-web", username: str = "", secret: str = ""):
    return destination_create(
        actor=actor,
        fields=DestinationFields(name=name, kind="stow", url=url, username=username, secret=secret, send_on="result"),
    )


def send_all(deliveries) -> list[str]:
    return [delivery_send(delivery.pk) for delivery in deliveries]


def same_dataset(ours: bytes, theirs: bytes) -> bool:
    """The PACS may write its own file meta; the dataset itself must be the one sent."""
    return dcmread(io.BytesIO(ours)) == dcmread(io.BytesIO(theirs))


def sent_events(tenant, outcome=None):
    found = AccessEvent.objects.filter(tenant=tenant, action="dicom.sent")
    return found.filter(outcome=outcome) if outcome else found


# --- over C-STORE and STOW-RS, read back from Orthanc -----------------------------------------------


@pytest.mark.heavy_any_db
def test_the_sr_and_map_reach_orthanc_over_c_store_and_stow_and_a_resend_stores_once(tmp_path, admin_a, objects_a):
    image, sr, heatmap = objects_a
    with orthanc_running(tmp_path / "pacs") as orthanc:
        by_dimse = dimse(admin_a, orthanc.dicom_port)
        deliveries = [
            Delivery.objects.get(pk=pk) for pk in sending.deliveries_queue([(sr, by_dimse), (heatmap, by_dimse)])
        ]
        assert send_all(deliveries) == ["sent", "sent"]
        for instance in (sr, heatmap):
            with instance.file.open("rb") as stored:
                assert same_dataset(stored.read(), orthanc.instance_file(instance.sop_instance_uid))
        assert len(orthanc.instances()) == 2

        # the same objects over STOW-RS to the same PACS: still one copy of each
        by_stow = stow(admin_a, f"{orthanc.dicomweb_url}/studies", username="sightline", secret=SECRET)
        again = [Delivery.objects.get(pk=pk) for pk in sending.deliveries_queue([(sr, by_stow), (heatmap, by_stow)])]
        assert send_all(again) == ["sent", "sent"]
        assert len(orthanc.instances()) == 2

        # a manual resend: the same SOP instance, byte for byte; Orthanc's count is unchanged
        resent = sending.delivery_resend(actor=admin_a, delivery_id=deliveries[0].pk)
        assert resent.status == "pending" and resent.attempts == 0
        assert delivery_send(resent.pk) == "sent"
        assert len(orthanc.instances()) == 2
        tags = {i["SOPInstanceUID"] for i in orthanc.instances()}
        assert tags == {sr.sop_instance_uid, heatmap.sop_instance_uid}
    # every send is a disclosure in the access log, its target the instance
    events = sent_events(image.tenant)
    assert events.count() == 5 and set(events.values_list("outcome", flat=True)) == {"success"}
    assert set(events.values_list("target_id", flat=True)) == {str(sr.pk), str(heatmap.pk)}
    assert AccessEvent.objects.filter(action="dicom.resend", target_id=str(deliveries[0].pk)).exists()


@pytest.mark.heavy_any_db
def test_a_pacs_that_is_down_delays_then_the_cap_fails_it_then_a_resend_sends_it(
    tmp_path, settings, admin_a, objects_a
):
    settings.SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS = 3
    settings.SIGHTLINE_DICOM_SEND_RETRY_SECONDS = 0.05
    settings.SIGHTLINE_DICOM_TIMEOUT = 5
    image, sr, _ = objects_a
    nobody = free_port()
    destination = dimse(admin_a, nobody)
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    assert delivery_send(delivery_id) == "retrying"
    delivery = Delivery.objects.get(pk=delivery_id)
    assert delivery.attempts == 1 and "could not reach ORTHANC@127.0.0.1" in delivery.error
    assert delivery.next_attempt_at is not None
    assert delivery_send(delivery_id) == "retrying"
    assert Delivery.objects.get(pk=delivery_id).attempts == 2  # the back-off doubled: 0.05 s, then 0.1 s
    time.sleep(0.2)
    assert delivery_send(delivery_id) == "failed"
    delivery = Delivery.objects.get(pk=delivery_id)
    assert delivery.attempts == 3 and "gave up after 3 attempts" in delivery.error
    assert delivery_send(delivery_id) == "failed"  # a late message sends nothing more
    assert sent_events(image.tenant, "failed").count() == 3

    with orthanc_running(tmp_path / "pacs") as orthanc:
        destination_update(
            actor=admin_a,
            destination_id=destination.pk,
            fields=DestinationFields(
                name="pacs",
                kind="dimse",
                host="127.0.0.1",
                port=orthanc.dicom_port,
                ae_title="ORTHANC",
                send_on="result",
            ),
        )
        sending.delivery_resend(actor=admin_a, delivery_id=delivery_id)
        assert delivery_send(delivery_id) == "sent"
        assert [i["SOPInstanceUID"] for i in orthanc.instances()] == [sr.sop_instance_uid]
    delivery = Delivery.objects.get(pk=delivery_id)
    assert delivery.status == "sent" and delivery.error == "" and delivery.sent_at is not None
    assert sent_events(image.tenant, "success").count() == 1


@pytest.mark.heavy_any_db
def test_test_connection_ok_and_failing(tmp_path, admin_a):
    from dicomnet.destinations import destination_test

    with orthanc_running(tmp_path / "pacs") as orthanc:
        good = dimse(admin_a, orthanc.dicom_port, name="good")
        closed = dimse(admin_a, free_port(), name="closed")
        web = stow(admin_a, f"{orthanc.dicomweb_url}/studies", name="web")
        wrong = stow(admin_a, f"{orthanc.url}/no-such-dicomweb/studies", name="wrong")
        results = {d.name: destination_test(actor=admin_a, destination_id=d.pk) for d in (good, closed, web, wrong)}
    assert results["good"].last_test_ok is True and "C-ECHO answered" in results["good"].last_test_message
    assert results["closed"].last_test_ok is False and "could not reach" in results["closed"].last_test_message
    assert results["web"].last_test_ok is True, results["web"].last_test_message
    assert results["wrong"].last_test_ok is False and "404" in results["wrong"].last_test_message
    tests = AccessEvent.objects.filter(action="dicom.destination_test", tenant=admin_a.tenant)
    assert sorted(tests.values_list("outcome", flat=True)) == ["failed", "failed", "success", "success"]


# --- the secret --------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []
    answer: tuple[int, bytes] = (200, b"{}")

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append(
            {"auth": self.headers.get("Authorization"), "type": self.headers["Content-Type"], "body": body}
        )
        status, body = _Recorder.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    _Recorder.seen, _Recorder.answer = [], (200, b"{}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/dicom-web/studies"
    server.shutdown()
    server.server_close()


def test_the_secret_is_encrypted_at_rest_sent_as_basic_or_bearer_and_never_logged_or_shown(
    client, admin_a, objects_a, recorder, caplog
):
    import base64

    caplog.set_level(logging.DEBUG)
    _, sr, _ = objects_a
    basic = stow(admin_a, recorder, name="basic", username="sightline", secret=SECRET)
    bearer = stow(admin_a, recorder, name="bearer", secret=SECRET)
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM dicomnet_destination")
        rows = repr(cursor.fetchall())
    assert SECRET not in rows and SECRET.encode() not in base64.b64decode(basic.secret_encrypted + "==", altchars=b"-_")
    assert secret_decrypt(Destination.objects.get(pk=basic.pk).secret_encrypted) == SECRET

    assert send_all(
        Delivery.objects.filter(pk__in=sending.deliveries_queue([(sr, basic), (sr, bearer)])).order_by(
            "destination__name"
        )
    ) == ["sent", "sent"]
    auths = sorted(seen["auth"] for seen in _Recorder.seen)
    assert auths == sorted([f"Basic {base64.b64encode(f'sightline:{SECRET}'.encode()).decode()}", f"Bearer {SECRET}"])
    with sr.file.open("rb") as stored:
        data = stored.read()
    for seen in _Recorder.seen:  # one part, the stored bytes as they are
        assert seen["type"].startswith('multipart/related; type="application/dicom"; boundary=')
        assert data in seen["body"]

    client.force_login(admin_a.user)
    for url in ("/hospital/destinations/", f"/hospital/destinations/{basic.pk}/"):
        page = client.get(url)
        assert page.status_code == 200 and SECRET.encode() not in page.content and "••••••••" in page.content.decode()
    assert SECRET not in caplog.text
    # a change that leaves the field empty keeps the secret; "remove" clears it
    client.post(
        f"/hospital/destinations/{basic.pk}/",
        {
            "name": "basic",
            "kind": "stow",
            "url": recorder,
            "username": "sightline",
            "send_on": "result",
            "is_active": "on",
            "is_active_sent": "1",
        },
    )
    assert secret_decrypt(Destination.objects.get(pk=basic.pk).secret_encrypted) == SECRET
    client.post(
        f"/hospital/destinations/{basic.pk}/",
        {
            "name": "basic",
            "kind": "stow",
            "url": recorder,
            "send_on": "result",
            "clear_secret": "on",
            "is_active": "on",
            "is_active_sent": "1",
        },
    )
    assert Destination.objects.get(pk=basic.pk).secret_encrypted == ""


# --- pages, roles, another hospital --------------------------------------------------------------


def test_a_tenant_admin_adds_changes_and_removes_a_destination_on_the_page(client, admin_a, clinician_a):
    client.force_login(admin_a.user)
    response = client.post(
        "/hospital/destinations/create/",
        {
            "name": "main-pacs",
            "kind": "dimse",
            "host": "pacs.local",
            "port": "104",
            "ae_title": "MAINPACS",
            "send_on": "signoff",
            "is_active": "on",
            "is_active_sent": "1",
        },
    )
    assert response.status_code == 302
    destination = Destination.objects.get(tenant=admin_a.tenant, name="main-pacs")
    assert (destination.kind, destination.port, destination.ae_title, destination.send_on) == (
        "dimse",
        104,
        "MAINPACS",
        "signoff",
    )
    page = client.get("/hospital/destinations/").content.decode()
    assert "main-pacs" in page and "MAINPACS@pacs.local:104" in page
    refused = client.post(
        "/hospital/destinations/create/",
        {"name": "x", "kind": "dimse", "host": "h", "port": "99999", "ae_title": "A", "send_on": "result"},
        follow=True,
    )
    assert "The port is a whole number" in refused.content.decode()
    client.post(
        f"/hospital/destinations/{destination.pk}/",
        {
            "name": "main-pacs",
            "kind": "dimse",
            "host": "pacs.local",
            "port": "11112",
            "ae_title": "MAINPACS",
            "send_on": "result",
            "is_active_sent": "1",
        },
    )
    destination.refresh_from_db()
    assert (destination.port, destination.send_on, destination.is_active) == (11112, "result", False)
    client.post(f"/hospital/destinations/{destination.pk}/delete/")
    assert not Destination.objects.filter(pk=destination.pk).exists()
    actions = list(
        AccessEvent.objects.filter(tenant=admin_a.tenant, target_type="destination").values_list("action", flat=True)
    )
    assert actions == ["dicom.destination_create", "dicom.destination_change", "dicom.destination_delete"]
    # a clinician neither sees nor names destinations
    client.force_login(clinician_a.user)
    assert client.get("/hospital/destinations/").status_code == 403


def test_another_hospital_gets_404_for_destinations_and_deliveries(admin_a, admin_b, clinician_b, objects_a):
    _, sr, _ = objects_a
    destination = dimse(admin_a, 104)
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    for outsider in (admin_b, clinician_b):
        client = Client()
        client.force_login(outsider.user)
        for method, url in (
            ("get", f"/hospital/destinations/{destination.pk}/"),
            ("post", f"/hospital/destinations/{destination.pk}/"),
            ("post", f"/hospital/destinations/{destination.pk}/test/"),
            ("post", f"/hospital/destinations/{destination.pk}/delete/"),
            ("post", f"/hospital/deliveries/{delivery_id}/resend/"),
        ):
            if outsider is clinician_b and "destinations" in url:
                assert getattr(client, method)(url).status_code == 403  # not an admin anywhere
                continue
            assert getattr(client, method)(url).status_code == 404, (outsider, url)
    assert Destination.objects.filter(pk=destination.pk).exists()
    assert Delivery.objects.get(pk=delivery_id).attempts == 0
    denied = AccessEvent.objects.filter(tenant=admin_b.tenant, outcome="denied").values_list("action", flat=True)
    assert {"dicom.resend", "dicom.destination_view"} <= set(denied)


def test_the_study_page_shows_what_was_sent_and_a_clinician_resends(client, admin_a, clinician_a, viewer_a, objects_a):
    image, sr, heatmap = objects_a
    destination = dimse(admin_a, free_port())
    ids = sending.deliveries_queue([(sr, destination), (heatmap, destination)])
    Delivery.objects.filter(pk=ids[0]).update(status="failed", attempts=6, error="could not reach PACS — gave up")
    client.force_login(clinician_a.user)
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert "Sent to PACS" in page and "AI finding (SR)" in page and "heatmap" in page
    assert "could not reach PACS — gave up" in page and f"/hospital/deliveries/{ids[0]}/resend/" in page
    response = client.post(f"/hospital/deliveries/{ids[0]}/resend/", {"next": f"/images/{image.pk}/"})
    assert response.status_code == 302 and response["Location"] == f"/images/{image.pk}/"
    delivery = Delivery.objects.get(pk=ids[0])
    assert (delivery.status, delivery.attempts, delivery.error) == ("pending", 0, "")
    # a viewer sees the status but may not resend
    client.force_login(viewer_a.user)
    page = client.get(f"/images/{image.pk}/").content.decode()
    assert "Sent to PACS" in page and "/resend/" not in page
    assert client.post(f"/hospital/deliveries/{ids[0]}/resend/").status_code == 403


def test_a_png_image_page_reads_nothing_about_deliveries(clinician_a, django_assert_num_queries):
    from recognition.models import Image

    image = Image(original="tenants/1/originals/scan.png", format="PNG", study_id=1)
    with django_assert_num_queries(0):
        assert sending.study_deliveries(membership=clinician_a, image=image) == []


# --- the sweep ---------------------------------------------------------------------------------


def test_the_sweep_resends_what_a_lost_message_or_a_dead_worker_left(settings, admin_a, objects_a, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    _, sr, heatmap = objects_a
    destination = dimse(admin_a, free_port())
    lost, stalled = sending.deliveries_queue([(sr, destination), (heatmap, destination)])
    long_ago = timezone.now() - timedelta(hours=2)
    Delivery.objects.filter(pk=lost).update(next_attempt_at=long_ago)
    Delivery.objects.filter(pk=stalled).update(status="sending", updated=long_ago)
    queued = []
    monkeypatch.setattr(sending, "_send_task", lambda task, args, countdown=None: queued.append((task, args)))
    deliveries_reconcile()
    assert (sending.SEND_TASK, [lost]) in queued and (sending.SEND_TASK, [stalled]) in queued
    assert Delivery.objects.get(pk=stalled).status == "retrying"
    queued.clear()
    deliveries_reconcile()  # the taken-over one is due, not overdue: its message is on its way
    assert (sending.SEND_TASK, [stalled]) not in queued


# --- triggers: a result, a sign-off, the map once its heatmap is ready ----------------------------


@pytest.fixture
def sent_tasks(monkeypatch):
    """Every task sent to the broker (by name), recorded instead of sent."""
    from celery import current_app

    tasks = []
    app = type(current_app._get_current_object())
    monkeypatch.setattr(app, "send_task", lambda self, name, args=None, **options: tasks.append((name, args)))
    monkeypatch.setattr("accounts.events.send", lambda group, message: None)
    return tasks


@pytest.fixture
def stub_objects(monkeypatch):
    """dicomnet/objects.py's interface (helper "objects" writes the real one): one Instance per
    result and kind, made once, from pydicom's test files."""
    import sys
    import types

    import dicomnet

    def once(image, kind, data, **links):
        found = Instance.objects.filter(kind=kind, **links).first()
        if found:
            return found
        instance = made(image, kind, data)
        Instance.objects.filter(pk=instance.pk).update(**{f"{k}_id": v.pk for k, v in links.items()})
        return Instance.objects.get(pk=instance.pk)

    stub = types.ModuleType("dicomnet.objects")
    stub.ai_report_for = lambda result: once(result.image, "ai_sr", _sr_bytes(), result=result)
    stub.review_report_for = lambda review: once(review.image, "review_sr", _sr_bytes(), review=review)
    stub.heatmap_object_for = lambda result: once(result.image, "map", _sc_map_bytes(), result=result)
    monkeypatch.setitem(sys.modules, "dicomnet.objects", stub)
    monkeypatch.setattr(dicomnet, "objects", stub, raising=False)
    return stub


def read_dicom(membership):
    from workers.runner import inference_run

    image = image_upload(membership=membership, upload=upload_file(_test_file("CT_small.dcm"), "ct.dcm"))
    inference_run(request_id=image.inference_requests.get().pk)
    image.refresh_from_db()
    return image


def test_a_result_of_a_dicom_image_is_exported_to_the_destinations_that_send_on_every_result(
    admin_a, clinician_a, demo_model, sent_tasks, stub_objects, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from recognition.models import Result
    from workers.heatmaps import heatmap_compute

    on_result = dimse(admin_a, 104, name="on-result", send_on="result")
    dimse(admin_a, 105, name="on-signoff", send_on="signoff")
    with django_capture_on_commit_callbacks(execute=True):
        image = read_dicom(clinician_a)
    result = Result.objects.get(image=image)
    assert (sending.RESULT_EXPORT_TASK, [result.pk]) in sent_tasks  # the worker's store queued it, on commit
    sent_tasks.clear()

    with django_capture_on_commit_callbacks(execute=True):
        queued = sending.result_export(result_id=result.pk)
    (delivery,) = Delivery.objects.filter(pk__in=queued)
    assert delivery.destination == on_result and delivery.instance.kind == "ai_sr" and delivery.status == "pending"
    assert (sending.SEND_TASK, [delivery.pk]) in sent_tasks and (sending.MAP_FOLLOW_TASK, [result.pk]) in sent_tasks
    sending.result_export(result_id=result.pk)  # a second export (a redelivered task) makes nothing twice
    assert Delivery.objects.count() == 1 and Instance.objects.filter(kind="ai_sr").count() == 1

    # the map: its heatmap is asked of the worker, then sent once the worker made it
    sent_tasks.clear()
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(sending.MapPending):
        sending.map_follow(result_id=result.pk)
    assert ("workers.tasks.heatmap_compute", [result.pk]) in sent_tasks
    assert list(sending._results_awaiting_map(result.created - timedelta(days=1))) == [result.pk]
    assert heatmap_compute(result_id=result.pk) == "ready"
    (map_delivery,) = Delivery.objects.filter(pk__in=sending.map_follow(result_id=result.pk))
    assert map_delivery.instance.kind == "map" and map_delivery.destination == on_result
    assert not sending._results_awaiting_map(result.created - timedelta(days=1)).exists()


def test_a_hospital_without_destinations_or_a_png_exports_nothing(
    clinician_a, demo_model, sent_tasks, django_capture_on_commit_callbacks
):
    from tests.conftest import png_bytes
    from workers.runner import inference_run

    with django_capture_on_commit_callbacks(execute=True):
        read_dicom(clinician_a)  # no destination
    dimse(member(clinician_a.tenant, "admin-x", Role.TENANT_ADMIN), 104, send_on="result")
    with django_capture_on_commit_callbacks(execute=True):
        png = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
        inference_run(request_id=png.inference_requests.get().pk)
    assert [name for name, _ in sent_tasks if name.startswith("dicomnet.")] == []


def test_a_sign_off_sends_the_verdict_everywhere_and_the_ai_sr_where_it_was_not_sent(
    admin_a, clinician_a, demo_model, sent_tasks, stub_objects, django_capture_on_commit_callbacks
):
    from recognition.services.reviews import review_save, review_sign_off

    on_result = dimse(admin_a, 104, name="on-result", send_on="result")
    on_signoff = dimse(admin_a, 105, name="on-signoff", send_on="signoff")
    image = read_dicom(clinician_a)
    result = image.results.get()
    sending.result_export(result_id=result.pk)
    first_sr = Delivery.objects.get(destination=on_result)
    Delivery.objects.filter(pk=first_sr.pk).update(status="sent", attempts=1)

    draft = review_save(membership=clinician_a, image_id=image.pk, verdict="agree")
    with django_capture_on_commit_callbacks(execute=True):
        review_sign_off(membership=clinician_a, review_id=draft.pk)
    assert (sending.REVIEW_EXPORT_TASK, [draft.pk]) in sent_tasks
    sending.review_export(review_id=draft.pk)
    sent = {
        (d.instance.kind, d.destination.name): d.status
        for d in Delivery.objects.select_related("instance", "destination")
    }
    assert sent == {
        ("ai_sr", "on-result"): "sent",  # sent on the result: not again
        ("ai_sr", "on-signoff"): "pending",
        ("review_sr", "on-result"): "pending",
        ("review_sr", "on-signoff"): "pending",
    }
    assert on_signoff.pk in set(Delivery.objects.values_list("destination_id", flat=True))

    # an amendment signed off in one step (the review form's "sign off") is sent too
    sent_tasks.clear()
    with django_capture_on_commit_callbacks(execute=True):
        amended = review_save(
            membership=clinician_a, image_id=image.pk, verdict="correct", label="no_finding", sign_off=True
        )
    assert (sending.REVIEW_EXPORT_TASK, [amended.pk]) in sent_tasks
    sending.review_export(review_id=amended.pk)
    assert Delivery.objects.filter(instance__review=amended, instance__kind="review_sr").count() == 2  # to both


def test_a_broker_that_is_down_loses_nothing_the_sweep_exports_and_sends_later(
    admin_a, clinician_a, demo_model, stub_objects, monkeypatch, django_capture_on_commit_callbacks, caplog
):
    from datetime import timedelta

    from celery import current_app
    from django.utils import timezone

    from recognition.models import Result, Review
    from recognition.services.reviews import review_save

    broker = {"up": False}
    tasks = []

    def send_task(self, name, args=None, **options):
        if not broker["up"]:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        tasks.append((name, args))

    monkeypatch.setattr(type(current_app._get_current_object()), "send_task", send_task)
    monkeypatch.setattr("accounts.events.send", lambda group, message: None)
    destination = dimse(admin_a, 104, send_on="result")
    with django_capture_on_commit_callbacks(execute=True):
        image = read_dicom(clinician_a)  # the worker stores the result; its export cannot be queued
    result = Result.objects.get(image=image)
    with django_capture_on_commit_callbacks(execute=True):
        review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    assert "waits for the reconcile sweep" in caplog.text

    # two sweeps later, with the broker back: the sweep finds both in the database
    earlier = timezone.now() - timedelta(minutes=5)
    Destination.objects.filter(pk=destination.pk).update(created=earlier - timedelta(minutes=5))
    Result.objects.filter(pk=result.pk).update(created=earlier)
    Review.objects.filter(pk=review.pk).update(signed_off_at=earlier)
    broker["up"] = True
    deliveries_reconcile()
    assert (sending.RESULT_EXPORT_TASK, [result.pk]) in tasks and (sending.REVIEW_EXPORT_TASK, [review.pk]) in tasks

    # the export runs, and the broker is down again as it queues the sends: the rows are due
    broker["up"] = False
    with django_capture_on_commit_callbacks(execute=True):
        sending.review_export(review_id=review.pk)
    pending = Delivery.objects.filter(status="pending")
    assert set(pending.values_list("instance__kind", flat=True)) == {"ai_sr", "review_sr"}
    pending.update(next_attempt_at=earlier)
    broker["up"] = True
    tasks.clear()
    deliveries_reconcile()
    assert sorted(args for name, args in tasks if name == sending.SEND_TASK) == sorted(
        [pk] for pk in pending.values_list("id", flat=True)
    )
    assert (sending.RESULT_EXPORT_TASK, [result.pk]) not in tasks  # its AI SR is queued now
    assert (sending.REVIEW_EXPORT_TASK, [review.pk]) not in tasks


def test_a_stow_server_that_refuses_says_why_and_is_retried(admin_a, objects_a, recorder):
    _, sr, _ = objects_a
    destination = stow(admin_a, recorder, username="sightline", secret="wrong")
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    _Recorder.answer = (401, b"")
    assert delivery_send(delivery_id) == "retrying"
    assert "HTTP 401: the credentials were refused" in Delivery.objects.get(pk=delivery_id).error
    # each attempt is due at once here (the back-off is the retry task's countdown in production)
    _Recorder.answer = (409, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}')
    Delivery.objects.filter(pk=delivery_id).update(next_attempt_at=Delivery.objects.get(pk=delivery_id).updated)
    assert delivery_send(delivery_id) == "retrying"
    assert "HTTP 409" in Delivery.objects.get(pk=delivery_id).error
    _Recorder.answer = (200, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}')
    Delivery.objects.filter(pk=delivery_id).update(next_attempt_at=Delivery.objects.get(pk=delivery_id).updated)
    assert delivery_send(delivery_id) == "retrying"
    assert "did not store the object (failure reason 272)" in Delivery.objects.get(pk=delivery_id).error
    assert "wrong" not in Delivery.objects.get(pk=delivery_id).error


# --- review item 5: the stored key is checked against the delivery's hospital --------------------


@pytest.mark.parametrize(
    "key",
    [
        "dicom/test/{hex}.dcm",  # outside any hospital's area
        "tenants/{other}/dicom/{hex}.dcm",  # another hospital's area
    ],
)
def test_an_object_stored_outside_its_hospitals_area_is_never_read_nor_sent(
    admin_a, clinician_a, hospital_b, recorder, caplog, key
):
    image = dicom_image(clinician_a)
    sr = made(image, "ai_sr", _sr_bytes(), key=key.format(hex=uuid.uuid4().hex, other=hospital_b.pk))
    destination = stow(admin_a, recorder)
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    opened = []
    original_open = type(sr.file).open

    def spy(self, *args, **kwargs):
        opened.append(self.name)
        return original_open(self, *args, **kwargs)

    with caplog.at_level(logging.WARNING, logger="dicomnet.sending"), mock.patch.object(type(sr.file), "open", spy):
        assert delivery_send(delivery_id) == "failed"  # at once: a refusal is never retried
    delivery = Delivery.objects.get(pk=delivery_id)
    assert "not in this hospital's storage" in delivery.error and delivery.next_attempt_at is None
    assert opened == [] and _Recorder.seen == []
    assert f"delivery {delivery_id} is not sent" in caplog.text
    assert not sent_events(admin_a.tenant).exists()


# --- review item 6: the attempt is in the access log before a byte leaves ------------------------


class _WorkerDied(BaseException):
    """The worker killed mid-send (not an Exception: nothing in the sender catches it)."""


def test_the_send_attempted_entry_is_committed_with_the_claim_before_any_byte_leaves(
    admin_a, objects_a, recorder, monkeypatch
):
    _, sr, _ = objects_a
    destination = stow(admin_a, recorder)
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    outer = len(connection.atomic_blocks)  # the test's own transaction
    seen = {}

    def dies(*args):
        seen["entries"] = list(
            AccessEvent.objects.filter(
                tenant=admin_a.tenant, target_type="dicom_instance", target_id=str(sr.pk)
            ).values_list("action", flat=True)
        )
        seen["open_transactions"] = len(connection.atomic_blocks) - outer
        raise _WorkerDied

    monkeypatch.setattr(sending, "_transmit", dies)
    with pytest.raises(_WorkerDied):
        delivery_send(delivery_id)
    assert seen == {"entries": ["dicom.send_attempted"], "open_transactions": 0}  # committed, then the send
    assert Delivery.objects.get(pk=delivery_id).status == "sending" and not sent_events(admin_a.tenant).exists()

    # the sweep takes the stalled row over; this time the peer answers: attempted, then the outcome
    monkeypatch.undo()
    Delivery.objects.filter(pk=delivery_id).update(status="retrying", next_attempt_at=sr.created)
    assert delivery_send(delivery_id) == "sent"
    entries = AccessEvent.objects.filter(tenant=admin_a.tenant, target_type="dicom_instance", target_id=str(sr.pk))
    assert list(entries.order_by("id").values_list("action", "outcome")) == [
        ("dicom.send_attempted", "success"),
        ("dicom.send_attempted", "success"),
        ("dicom.sent", "success"),
    ]
    assert entries.filter(actor_label__contains=destination.name).count() == 3


# --- review item 8: no destination on the platform's own loopback, link-local or metadata -------

NO_ALLOWLIST = override_settings(SIGHTLINE_DESTINATION_ALLOWED_NETWORKS=[])


@NO_ALLOWLIST
@pytest.mark.parametrize(
    ("kind", "where", "said"),
    [
        ("dimse", "127.0.0.1", "loopback"),
        ("dimse", "localhost", "loopback"),
        ("dimse", "127.1", "loopback"),
        ("dimse", "::1", "loopback"),
        ("dimse", "::ffff:127.0.0.1", "loopback"),
        ("dimse", "169.254.169.254", "metadata"),
        ("dimse", "169.254.10.1", "link-local"),
        ("dimse", "fe80::1", "link-local"),
        ("dimse", "0.0.0.0", "unspecified"),  # noqa: S104 (the address refused, not bound)
        ("dimse", "224.0.0.1", "multicast"),
        ("stow", "http://169.254.169.254/latest/meta-data/", "metadata"),
        ("stow", "http://[fd00:ec2::254]/latest/", "metadata"),
        ("stow", "https://localhost:8042/dicom-web/studies", "loopback"),
        ("stow", "http://[::1]:8042/dicom-web/studies", "loopback"),
    ],
)
def test_a_destination_on_loopback_link_local_metadata_unspecified_or_multicast_is_refused(admin_a, kind, where, said):
    fields = {"host": where, "port": 104, "ae_title": "PACS"} if kind == "dimse" else {"url": where}
    with pytest.raises(DestinationRefused, match=said):
        destination_create(actor=admin_a, fields=DestinationFields(name="x", kind=kind, **fields))
    assert not Destination.objects.filter(tenant=admin_a.tenant).exists()


@NO_ALLOWLIST
def test_private_networks_stay_allowed_and_the_page_says_why_a_host_is_refused(client, admin_a):
    for index, host in enumerate(("10.1.2.3", "172.16.0.9", "192.168.1.20", "fd12::5")):
        destination_create(
            actor=admin_a, fields=DestinationFields(name=f"p{index}", kind="dimse", host=host, port=104, ae_title="P")
        )
    stow(admin_a, "https://10.0.0.7/dicom-web/studies", secret=SECRET)
    client.force_login(admin_a.user)
    page = client.post(
        "/hospital/destinations/create/",
        {"name": "meta", "kind": "stow", "url": "http://169.254.169.254/", "send_on": "result"},
        follow=True,
    ).content.decode()
    assert "the cloud metadata address: a destination may not point there" in page
    assert not Destination.objects.filter(name="meta").exists()


def test_the_address_is_checked_again_at_test_and_send_time(admin_a, objects_a, recorder, monkeypatch):
    """Saved while allowed (or while the name did not resolve), then refused when reached: nothing
    is sent, no send is logged, the delivery fails at once with the reason."""
    _, sr, _ = objects_a
    web = stow(admin_a, recorder)
    dicom = dimse(admin_a, free_port(), name="later")
    Destination.objects.filter(pk=dicom.pk).update(host="pacs.example.invalid")  # a name that resolves later
    deliveries = sending.deliveries_queue([(sr, web), (sr, Destination.objects.get(pk=dicom.pk))])
    with override_settings(SIGHTLINE_DESTINATION_ALLOWED_NETWORKS=[]):
        tested = destination_test(actor=admin_a, destination_id=web.pk)
        assert tested.last_test_ok is False and "loopback address" in tested.last_test_message
        real = socket.getaddrinfo
        monkeypatch.setattr(  # the name now points at the metadata address (a re-pointed DNS record)
            socket,
            "getaddrinfo",
            lambda host, *a, **k: real("169.254.169.254" if host == "pacs.example.invalid" else host, *a, **k),
        )
        assert send_all(Delivery.objects.filter(pk__in=deliveries).order_by("id")) == ["failed", "failed"]
    assert _Recorder.seen == []
    web_error, dicom_error = (Delivery.objects.get(pk=pk).error for pk in deliveries)
    assert "loopback address" in web_error
    assert "pacs.example.invalid is 169.254.169.254, the cloud metadata" in dicom_error
    assert not AccessEvent.objects.filter(tenant=admin_a.tenant, action__startswith="dicom.send").exists()
    # the operator allows loopback (the test settings): the same delivery goes on a person's resend
    sending.delivery_resend(actor=admin_a, delivery_id=deliveries[0])
    assert delivery_send(deliveries[0]) == "sent" and len(_Recorder.seen) == 1


def test_an_unresolvable_host_is_retried_not_failed(admin_a, objects_a):
    _, sr, _ = objects_a
    destination = dimse(admin_a, free_port())
    Destination.objects.filter(pk=destination.pk).update(host="pacs.example.invalid")
    (delivery_id,) = sending.deliveries_queue([(sr, Destination.objects.get(pk=destination.pk))])
    assert delivery_send(delivery_id) == "retrying"
    assert "the host name does not resolve" in Delivery.objects.get(pk=delivery_id).error


# --- review item 7: a stored secret stays with its server, and off cleartext and proxies -----------


def _edit(client, destination, url: str, **more):
    form = {"name": destination.name, "kind": "stow", "url": url, "send_on": "result", "is_active_sent": "1"}
    return client.post(f"/hospital/destinations/{destination.pk}/", {**form, "is_active": "on", **more}, follow=True)


def test_a_new_scheme_host_or_port_drops_the_stored_secret_unless_one_is_entered(client, admin_a, recorder):
    destination = stow(admin_a, recorder, username="sightline", secret=SECRET)
    client.force_login(admin_a.user)
    edit_page = client.get(f"/hospital/destinations/{destination.pk}/").content.decode()
    assert "changing the URL's scheme, host or port removes it" in edit_page

    path_only = recorder.replace("/dicom-web/studies", "/wado/studies")
    assert "was removed" not in _edit(client, destination, path_only).content.decode()
    assert secret_decrypt(Destination.objects.get(pk=destination.pk).secret_encrypted) == SECRET  # same server

    other_port = f"http://127.0.0.1:{free_port()}/dicom-web/studies"
    page = _edit(client, destination, other_port).content.decode()
    assert Destination.objects.get(pk=destination.pk).secret_encrypted == ""
    assert "the stored password or token was removed, because the URL now points at another scheme, host" in page
    assert ("dicom.destination_change", "success") in AccessEvent.objects.filter(
        target_type="destination", target_id=str(destination.pk)
    ).values_list("action", "outcome")

    destination_update(  # a secret entered with the change is the new server's
        actor=admin_a,
        destination_id=destination.pk,
        fields=DestinationFields(name=destination.name, kind="stow", url=recorder, secret="new-" + SECRET),
    )
    assert secret_decrypt(Destination.objects.get(pk=destination.pk).secret_encrypted) == "new-" + SECRET
    destination_update(  # another host, same port: dropped
        actor=admin_a,
        destination_id=destination.pk,
        fields=DestinationFields(name=destination.name, kind="stow", url=recorder.replace("127.0.0.1", "127.0.0.2")),
    )
    assert Destination.objects.get(pk=destination.pk).secret_encrypted == ""


@NO_ALLOWLIST
def test_a_secret_goes_only_over_https_outside_the_allowed_networks(client, admin_a):
    with pytest.raises(DestinationRefused, match="sent only over https://"):
        stow(admin_a, "http://10.0.0.7/dicom-web/studies", secret=SECRET)
    with pytest.raises(DestinationRefused, match="sent only over https://"):  # unresolvable: not shown inside
        stow(admin_a, "http://pacs.example.invalid/dicom-web/studies", secret=SECRET)
    plain = stow(admin_a, "http://10.0.0.7/dicom-web/studies", name="plain")  # no secret: allowed
    secure = stow(admin_a, "https://10.0.0.7/dicom-web/studies", name="secure", secret=SECRET)
    with pytest.raises(DestinationRefused, match="sent only over https://"):  # https -> http keeps the secret? no
        destination_update(
            actor=admin_a,
            destination_id=secure.pk,
            fields=DestinationFields(name="secure", kind="stow", url="http://10.0.0.7/dicom-web/studies", secret="x"),
        )
    with pytest.raises(DestinationRefused, match="sent only over https://"):
        destination_update(
            actor=admin_a,
            destination_id=plain.pk,
            fields=DestinationFields(name="plain", kind="stow", url=plain.url, secret=SECRET),
        )
    client.force_login(admin_a.user)
    page = client.post(
        "/hospital/destinations/create/",
        {"name": "web", "kind": "stow", "url": "http://10.0.0.8/studies", "secret": SECRET, "send_on": "result"},
        follow=True,
    ).content.decode()
    assert "A password or token is sent only over https://" in page and SECRET not in page
    assert not Destination.objects.filter(name="web").exists()


def test_a_secret_is_not_sent_over_http_at_send_time_outside_the_allowed_networks(
    admin_a, objects_a, recorder, monkeypatch
):
    """A row saved under another allowlist: the send refuses it before a byte leaves."""
    _, sr, _ = objects_a
    destination = stow(admin_a, recorder, secret=SECRET)
    port = int(recorder.split(":")[2].split("/")[0])
    Destination.objects.filter(pk=destination.pk).update(url=f"http://pacs.example.invalid:{port}/dicom-web/studies")
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **k: real("10.0.0.7" if host == "pacs.example.invalid" else host, *a, **k),
    )
    (delivery_id,) = sending.deliveries_queue([(sr, Destination.objects.get(pk=destination.pk))])
    assert delivery_send(delivery_id) == "failed"
    assert "sent only over https://" in Delivery.objects.get(pk=delivery_id).error and _Recorder.seen == []
    assert not sending.connection_check(Destination.objects.get(pk=destination.pk))[0]


def test_the_sender_never_goes_through_an_http_proxy(admin_a, objects_a, recorder, monkeypatch):
    _, sr, _ = objects_a
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # a proxy that is not there
    destination = stow(admin_a, recorder, secret=SECRET)
    (delivery_id,) = sending.deliveries_queue([(sr, destination)])
    assert delivery_send(delivery_id) == "sent" and _Recorder.seen[0]["auth"] == f"Bearer {SECRET}"
    handlers = sending._opener().handlers  # an empty ProxyHandler installs nothing, and keeps the default out
    assert not [h for h in handlers if isinstance(h, urllib.request.ProxyHandler) and h.proxies]


# --- a source no DICOM object can be made of: refused once, visibly, never asked again ------------


@pytest.mark.parametrize("failure", ["unprocessable", "not_dicom", "library"])
def test_an_export_objects_py_refuses_is_recorded_once_and_never_swept_again(
    admin_a, clinician_a, demo_model, stub_objects, sent_tasks, django_capture_on_commit_callbacks, caplog, failure
):
    from datetime import timedelta

    from django.utils import timezone

    from core.errors import Unprocessable
    from recognition.models import Result, Review
    from recognition.services.reviews import review_save

    patient_value = "Unable to convert '1970-01-31' to 'DA'"

    def refuse(_):
        if failure == "unprocessable":
            raise Unprocessable("This image cannot be the source of a DICOM object.", code="dicom_source")
        if failure == "not_dicom":
            from dicomnet.objects import NotDicomSource

            raise NotDicomSource("Only images that came in as DICOM have findings as DICOM objects.")
        raise ValueError(patient_value)

    destination = dimse(admin_a, 104, send_on="result")
    with django_capture_on_commit_callbacks(execute=True):
        image = read_dicom(clinician_a)
    result = Result.objects.get(image=image)
    with django_capture_on_commit_callbacks(execute=True):
        review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", sign_off=True)
    stub_objects.ai_report_for = stub_objects.review_report_for = refuse
    caplog.set_level(logging.DEBUG)
    for _ in range(2):  # a redelivered task records nothing twice
        assert sending.result_export(result_id=result.pk) == []
        assert sending.review_export(review_id=review.pk) == []
    refusals = AccessEvent.objects.filter(tenant=admin_a.tenant, action="dicom.export_refused")
    assert sorted(refusals.values_list("target_type", "target_id", "outcome")) == [
        ("result", str(result.pk), "failed"),
        ("review", str(review.pk), "failed"),
    ]
    assert patient_value not in caplog.text and "Traceback" not in caplog.text
    assert f"result {result.pk} is not exported as DICOM" in caplog.text
    browser = Client()
    browser.force_login(admin_a.user)
    page = browser.get("/hospital/destinations/").content.decode()
    assert "Never sent: not made as DICOM" in page and f'data-refused="review-{review.pk}"' in page

    # the map: made of a source that refuses, recorded once, not followed again
    stub_objects.ai_report_for = lambda result: made(result.image, "ai_sr", _sr_bytes())
    sr = stub_objects.ai_report_for(result)
    Instance.objects.filter(pk=sr.pk).update(result=result)
    sending.deliveries_queue([(Instance.objects.get(pk=sr.pk), destination)])
    stub_objects.heatmap_object_for = refuse
    from recognition.services import heatmaps

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(heatmaps, "result_heatmap_status", lambda result: heatmaps.HeatmapStatus.READY)
        assert sending.map_follow(result_id=result.pk) == []
    assert refusals.filter(target_type="result_map", target_id=str(result.pk)).count() == 1

    earlier = timezone.now() - timedelta(minutes=5)
    Destination.objects.filter(pk=destination.pk).update(created=earlier - timedelta(minutes=5))
    Result.objects.filter(pk=result.pk).update(created=earlier)
    Review.objects.filter(pk=review.pk).update(signed_off_at=earlier)
    Instance.objects.filter(pk=sr.pk).update(result=None)  # as if its SR had never been made
    sent_tasks.clear()
    deliveries_reconcile()
    swept = {(name, tuple(args)) for name, args in sent_tasks}
    assert (sending.RESULT_EXPORT_TASK, (result.pk,)) not in swept
    assert (sending.REVIEW_EXPORT_TASK, (review.pk,)) not in swept
    Instance.objects.filter(pk=sr.pk).update(result=result)
    sent_tasks.clear()
    deliveries_reconcile()
    assert (sending.MAP_FOLLOW_TASK, [result.pk]) not in sent_tasks
