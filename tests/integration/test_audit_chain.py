"""The access log: one entry per audited action, hash chains per hospital, triggers, tampering,
concurrent writers, pruning."""

import threading
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.test import Client

from accounts.audit import audit_verify_and_alert, chain_key, chain_verify, chains_verify
from accounts.models import AccessEvent, AuditChain, Role
from accounts.services import access_event_record, membership_change_role, membership_grant, user_get_or_create
from accounts.signals import username_tried
from recognition.models import InferenceRequest
from tests.conftest import PASSWORD, api_client_for, png_bytes, upload_file
from workers.runner import inference_run

pytestmark = pytest.mark.django_db
TABLE = AccessEvent._meta.db_table


def entries_after(mark: int):
    return list(AccessEvent.objects.filter(id__gt=mark).order_by("id"))


def last_id() -> int:
    return AccessEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


@pytest.fixture
def image(clinician_a, demo_model):
    from recognition.services.images import image_upload

    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    inference_run(request_id=InferenceRequest.objects.get(image=image).pk)
    return image


def page(membership) -> Client:
    client = Client()
    client.force_login(membership.user)
    return client


# (name, call(world) -> response or None, expected (action, actor username or "", target_type, outcome))
def _cases():
    def review(world, **data):
        return api_client_for(world["clinician"]).post(
            f"/api/v1/images/{world['image'].pk}/reviews/", data, format="json"
        )

    return [
        (
            "image view, page",
            lambda w: page(w["clinician"]).get(f"/images/{w['image'].pk}/"),
            ("image.view", "clinician", "image", "success"),
        ),
        (
            "image view, API",
            lambda w: api_client_for(w["clinician"]).get(f"/api/v1/images/{w['image'].pk}/"),
            ("image.view", "clinician", "image", "success"),
        ),
        (
            "image download, API",
            lambda w: api_client_for(w["viewer"]).get(f"/api/v1/images/{w['image'].pk}/file/"),
            ("image.download", "viewer", "image", "success"),
        ),
        (
            "heatmap download",
            lambda w: page(w["viewer"]).get(f"/images/{w['image'].pk}/heatmap/"),
            ("image.heatmap", "viewer", "image", "success"),
        ),
        (
            "study opened",
            lambda w: page(w["clinician"]).get(f"/studies/{w['image'].study_id}/"),
            ("study.view", "clinician", "study", "success"),
        ),
        (
            "worklist read",
            lambda w: api_client_for(w["clinician"]).get("/api/v1/studies/"),
            ("study.list", "clinician", "study", "success"),
        ),
        (
            "upload",
            lambda w: api_client_for(w["clinician"]).post(
                "/api/v1/images/", {"file": upload_file(png_bytes(seed=5))}, format="multipart"
            ),
            ("image.upload", "clinician", "image", "success"),
        ),
        (
            "another hospital's image is a denial",
            lambda w: api_client_for(w["other"]).get(f"/api/v1/images/{w['image'].pk}/"),
            ("image.view", "clinician-b", "image", "denied"),
        ),
        (
            "a role without the action is a denial",
            lambda w: api_client_for(w["viewer"]).post(
                "/api/v1/images/", {"file": upload_file(png_bytes())}, format="multipart"
            ),
            ("image.upload", "viewer", "", "denied"),
        ),
        (
            "failed login",
            lambda w: Client().post("/accounts/login/", {"username": "clinician", "password": "wrong"}),
            ("auth.login", lambda: username_tried("clinician"), "", "failed"),  # a failure keeps only a keyed hash
        ),
        (
            "role change",
            lambda w: membership_change_role(actor=w["admin"], membership=w["viewer"], role=Role.AUDITOR),
            ("membership.role_change", "admin", "membership", "success"),
        ),
    ]


CASES = _cases()


@pytest.fixture
def world(clinician_a, viewer_a, clinician_b, image, hospital_a):
    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    return {"clinician": clinician_a, "viewer": viewer_a, "other": clinician_b, "image": image, "admin": admin}


@pytest.mark.parametrize(("name", "call", "expected"), CASES, ids=[case[0] for case in CASES])
def test_each_audited_action_writes_exactly_one_entry(world, name, call, expected):
    action, actor, target_type, outcome = expected
    actor = actor() if callable(actor) else actor
    mark = last_id()
    call(world)
    matching = [e for e in entries_after(mark) if e.action == action and e.outcome == outcome]
    assert len(matching) == 1, [(e.action, e.outcome) for e in entries_after(mark)]
    (entry,) = matching
    assert entry.actor_label.split(" ")[0] == actor
    assert entry.target_type == target_type
    assert entry.chain == chain_key(entry.tenant_id) and entry.entry_hash


def test_reviews_sign_off_and_amendments_are_each_one_entry(world):
    client = api_client_for(world["clinician"])
    url = f"/api/v1/images/{world['image'].pk}/reviews/"
    for data, expected in (
        ({"verdict": "agree"}, ["review.save"]),
        ({"verdict": "agree", "sign_off": True}, ["review.save", "review.sign_off"]),
        ({"verdict": "disagree", "sign_off": True}, ["review.amend", "review.sign_off"]),
    ):
        mark = last_id()
        assert client.post(url, data, format="json").status_code == 201
        assert [e.action for e in entries_after(mark) if e.target_type == "review"] == expected


def test_login_and_logout_are_recorded(clinician_a):
    client, mark = Client(), last_id()
    client.post("/accounts/login/", {"username": "clinician", "password": PASSWORD})
    client.post("/accounts/logout/")
    actions = [(e.action, e.outcome, e.actor_label) for e in entries_after(mark) if e.action.startswith("auth.")]
    assert actions == [("auth.login", "success", "clinician"), ("auth.logout", "success", "clinician")]


def test_a_lockout_is_recorded(clinician_a, settings):
    client, mark = Client(), last_id()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post("/accounts/login/", {"username": "clinician", "password": "wrong"})
    lockouts = [e for e in entries_after(mark) if e.action == "auth.lockout"]
    assert len(lockouts) == 1 and lockouts[0].outcome == "denied"
    assert lockouts[0].actor_label == username_tried("clinician")


def test_model_registry_changes_are_recorded(demo_model):
    actions = set(AccessEvent.objects.values_list("action", flat=True))
    assert {"model.register", "model.alias_move"} <= actions


def test_each_hospital_has_its_own_chain_and_it_verifies(clinician_a, clinician_b):
    for membership in (clinician_a, clinician_b, clinician_a):
        access_event_record(action="test.touch", user=membership.user, tenant=membership.tenant)
    a = list(AccessEvent.objects.filter(chain=chain_key(clinician_a.tenant_id)).order_by("sequence"))
    assert [e.sequence for e in a] == list(range(1, len(a) + 1))
    for before, after in zip(a, a[1:], strict=False):
        assert after.previous_hash == before.entry_hash
    assert all(report.ok for report in chains_verify())
    call_command("verify_audit_log", "--tenant", clinician_a.tenant.slug)


def test_the_orm_and_the_database_refuse_changes(clinician_a):
    entry = access_event_record(action="test.touch", user=clinician_a.user, tenant=clinician_a.tenant)
    with pytest.raises(TypeError):
        AccessEvent.objects.filter(pk=entry.pk).update(action="x")
    with pytest.raises(TypeError):
        AccessEvent.objects.filter(pk=entry.pk).delete()
    for statement in (f"UPDATE {TABLE} SET action = 'x' WHERE id = %s", f"DELETE FROM {TABLE} WHERE id = %s"):
        with (
            pytest.raises((IntegrityError, DatabaseError), match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(statement, [entry.pk])
    if connection.vendor == "postgresql":
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute(f"TRUNCATE {TABLE}")
    assert AccessEvent.objects.get(pk=entry.pk).action == "test.touch"


def _without_triggers(statement: str, params: list) -> None:
    """What someone with database access could do: switch the triggers off, then write."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the test's pending foreign-key checks first
            cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER USER")
            cursor.execute(statement, params)
            cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER USER")
        else:
            cursor.execute("DROP TRIGGER accessevent_no_update")
            cursor.execute("DROP TRIGGER accessevent_no_delete")
            cursor.execute(statement, params)


@pytest.fixture
def five(clinician_a):
    return [access_event_record(action=f"test.{i}", user=clinician_a.user, tenant=clinician_a.tenant) for i in range(5)]


def test_a_changed_entry_is_named_by_verify_audit_log(clinician_a, five, capsys):
    target = five[2]
    _without_triggers(f"UPDATE {TABLE} SET target_id = 'forged' WHERE id = %s", [target.pk])
    report = chain_verify(chain_key(clinician_a.tenant_id))
    assert not report.ok and (report.first_bad_sequence, report.first_bad_id) == (target.sequence, target.pk)
    assert report.reason == "its content was changed"
    with pytest.raises(CommandError):
        call_command("verify_audit_log")
    assert f"entry {target.sequence} (id {target.pk}) does not verify" in capsys.readouterr().out


def test_a_deleted_entry_is_named_by_verify_audit_log(clinician_a, five):
    target = five[1]
    _without_triggers(f"DELETE FROM {TABLE} WHERE id = %s", [target.pk])
    report = chain_verify(chain_key(clinician_a.tenant_id))
    assert not report.ok and report.first_bad_sequence == target.sequence and "missing" in report.reason


def test_the_periodic_check_raises_an_alert_when_a_chain_breaks(clinician_a, five):
    assert audit_verify_and_alert() is True and not AccessEvent.objects.filter(action="audit.tampered").exists()
    _without_triggers(f"UPDATE {TABLE} SET outcome = 'denied' WHERE id = %s", [five[0].pk])
    assert audit_verify_and_alert() is False
    (alert,) = AccessEvent.objects.filter(action="audit.tampered")
    assert alert.target_id == f"{chain_key(clinician_a.tenant_id)}#{five[0].sequence}" and alert.chain == "platform"


def test_pruning_keeps_the_chain_verifiable_and_records_itself(clinician_a, five):
    from datetime import timedelta

    from accounts.audit import chain_prune

    tenant = clinician_a.tenant
    tenant.audit_retention_days = 30
    tenant.save()
    keep = access_event_record(action="test.keep", user=clinician_a.user, tenant=tenant)
    # prune as if 30 days had passed since just before `keep` was written: everything older goes
    report = chain_prune(tenant, now=keep.created + timedelta(days=30) - timedelta(microseconds=1))
    key = chain_key(tenant.pk)
    assert report.pruned == keep.sequence - 1 and report.first_kept == keep.sequence
    remaining = list(AccessEvent.objects.filter(chain=key).order_by("sequence").values_list("action", flat=True))
    assert remaining == ["test.keep", "audit.prune"]
    assert chain_verify(key).ok
    head = AuditChain.objects.get(key=key)
    assert head.first_sequence == keep.sequence and head.anchor_hash == keep.previous_hash
    assert chain_prune(tenant).pruned == 0  # nothing is 30 days old yet


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_never_fork_a_chain(hospital_a):
    user = get_user_model().objects.create(username="writer")
    errors, per_thread = [], 15

    def write():
        try:
            for _ in range(per_thread):
                access_event_record(action="test.concurrent", user=user, tenant=hospital_a)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    sequences = list(AccessEvent.objects.filter(chain=chain_key(hospital_a.pk)).values_list("sequence", flat=True))
    assert sorted(sequences) == list(range(1, 6 * per_thread + 1))
    assert chain_verify(chain_key(hospital_a.pk)).ok


WRITER = """
import django, sys
django.setup()
from django.contrib.auth import get_user_model
from accounts.models import Tenant
from accounts.services import access_event_record
tenant, user = Tenant.objects.get(pk=int(sys.argv[1])), get_user_model().objects.get(pk=int(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    access_event_record(action="test.process", user=user, tenant=tenant)
"""


@pytest.mark.django_db(transaction=True)
def test_concurrent_writer_processes_leave_a_chain_that_verifies(hospital_a):
    """Several processes (as web and worker processes are) append to one hospital's chain at once."""
    import os
    import subprocess
    import sys

    from django.conf import settings

    from tests.e2e.conftest import database_url

    user = get_user_model().objects.create(username="process-writer")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
    }
    writers, each = 4, 25
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(hospital_a.pk), str(user.pk), str(each)],
            env=env,
            cwd=settings.BASE_DIR,
            stderr=subprocess.PIPE,
        )
        for _ in range(writers)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    key = chain_key(hospital_a.pk)
    sequences = sorted(AccessEvent.objects.filter(chain=key).values_list("sequence", flat=True))
    assert sequences == list(range(1, writers * each + 1))
    assert chain_verify(key).ok


def job_entries(mark: int, job_id: int) -> list[tuple[str, str, str]]:
    return [
        (e.action, e.outcome, e.actor_label)
        for e in entries_after(mark)
        if e.target_type == "batch_job" and e.target_id == str(job_id)
    ]


def test_each_bulk_job_change_is_one_entry_in_the_hospitals_chain(clinician_a, demo_model):
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage
    from django.core.files.uploadedfile import SimpleUploadedFile

    from recognition.models import BatchItem, BatchJob
    from tests.integration.test_batches import expand_all, make_zip

    client = api_client_for(clinician_a)
    mark = last_id()
    job_id = client.post("/api/v1/batches/", {"name": "night films"}, format="json").json()["id"]
    assert job_entries(mark, job_id) == [("batch.create", "success", "clinician")]

    mark = last_id()
    archive = SimpleUploadedFile("night.zip", make_zip([("a.png", png_bytes(seed=1, size=64))]))
    assert client.post(f"/api/v1/batches/{job_id}/items/", {"archive": archive}, format="multipart").status_code == 202
    assert job_entries(mark, job_id) == [("batch.add_archive", "success", "clinician")]

    # a folder of its own: stored files outlive the rolled-back rows, and other tests import too
    own = f"tenants/{clinician_a.tenant_id}/imports/audit-{uuid.uuid4().hex}/"
    default_storage.save(f"{own}b.png", ContentFile(png_bytes(seed=2, size=64)))
    mark = last_id()
    assert client.post(f"/api/v1/batches/{job_id}/items/", {"prefix": own}, format="multipart").status_code == 202
    foreign = f"tenants/{clinician_a.tenant_id + 1}/imports/"
    assert client.post(f"/api/v1/batches/{job_id}/items/", {"prefix": foreign}, format="multipart").status_code == 400
    assert job_entries(mark, job_id) == [
        ("batch.add_prefix", "success", "clinician"),
        ("batch.add_prefix", "denied", "clinician"),  # the refused import is on record too
    ]
    expand_all()

    for step in ("start", "cancel"):
        mark = last_id()
        assert client.post(f"/api/v1/batches/{job_id}/{step}/").status_code == 200, step
        assert job_entries(mark, job_id) == [(f"batch.{step}", "success", "clinician")]

    # a retry needs a started job with a failed item
    second = client.post("/api/v1/batches/", {"name": "second"}, format="json").json()["id"]
    files = {"files": [SimpleUploadedFile("x.png", png_bytes(seed=3, size=64))]}
    client.post(f"/api/v1/batches/{second}/items/", files, format="multipart")
    client.post(f"/api/v1/batches/{second}/start/")
    item = BatchItem.objects.get(job_id=second)
    InferenceRequest.objects.filter(pk=item.request_id).update(status="failed", error="boom")
    BatchItem.objects.filter(pk=item.pk).update(status="failed")
    mark = last_id()
    assert client.post(f"/api/v1/batches/{second}/retry/").status_code == 200
    assert job_entries(mark, second) == [("batch.retry", "success", "clinician")]

    entries = AccessEvent.objects.filter(target_type="batch_job", target_id__in=[str(job_id), str(second)])
    assert set(entries.values_list("chain", flat=True)) == {chain_key(clinician_a.tenant_id)}
    assert chain_verify(chain_key(clinician_a.tenant_id)).ok
    assert BatchJob.objects.count() == 2


def test_pin_changes_are_recorded_with_who_made_them(client, demo_model, hospital_a, django_user_model):
    from recognition.models import ModelPin

    staff = django_user_model.objects.create_superuser("platform", password=PASSWORD)
    client.force_login(staff)
    mark = last_id()
    response = client.post(
        "/admin/recognition/modelpin/add/",
        {"tenant": hospital_a.pk, "model": demo_model.model_id, "version": demo_model.pk},
    )
    assert response.status_code == 302
    pin = ModelPin.objects.get()
    response = client.post(f"/admin/recognition/modelpin/{pin.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not ModelPin.objects.exists()
    call_command("model", "pin", "sightline-demo", "--hospital", hospital_a.slug, "--version", "1.0.0")
    pins = [
        (e.action, e.actor_label, e.tenant_id, e.target_type, e.target_id)
        for e in entries_after(mark)
        if e.action == "model.pin_change"
    ]
    changed = (hospital_a.pk, "model", str(demo_model.model_id))
    assert pins == [
        ("model.pin_change", "platform", *changed),  # pinned on the admin page
        ("model.pin_change", "platform", *changed),  # removed there
        ("model.pin_change", "", *changed),  # pinned from the command line (no person)
    ]
    assert chain_verify(chain_key(hospital_a.pk)).ok


def _unrecorded_actions():
    """(name, the action, what it would change): each must fail, and change nothing, when its
    access-log entry cannot be written."""
    from recognition.models import BatchJob, Image, ModelPin, Review
    from recognition.services.registry import model_pin_set

    def role(world):
        world["viewer"].refresh_from_db()
        return world["viewer"].role

    return [
        (
            "upload",
            lambda w: api_client_for(w["clinician"]).post(
                "/api/v1/images/", {"file": upload_file(png_bytes(seed=7))}, format="multipart"
            ),
            lambda w: Image.objects.count(),
        ),
        (
            "review",
            lambda w: api_client_for(w["clinician"]).post(
                f"/api/v1/images/{w['image'].pk}/reviews/", {"verdict": "agree"}, format="json"
            ),
            lambda w: Review.objects.count(),
        ),
        (
            "bulk job",
            lambda w: api_client_for(w["clinician"]).post("/api/v1/batches/", {"name": "night"}, format="json"),
            lambda w: BatchJob.objects.count(),
        ),
        (
            "role change",
            lambda w: membership_change_role(actor=w["admin"], membership=w["viewer"], role=Role.AUDITOR),
            role,
        ),
        (
            "pin",
            lambda w: model_pin_set(tenant=w["admin"].tenant, model=w["model"].model, version=w["model"]),
            lambda w: ModelPin.objects.count(),
        ),
    ]


UNRECORDED = _unrecorded_actions()


@pytest.mark.parametrize(("name", "act", "state"), UNRECORDED, ids=[case[0] for case in UNRECORDED])
def test_an_action_whose_access_log_entry_cannot_be_written_fails_and_changes_nothing(
    world, demo_model, monkeypatch, name, act, state
):
    import accounts.services

    world = {**world, "model": demo_model}
    before, mark = state(world), last_id()

    def refused(event):
        raise DatabaseError("the access log refused the entry")

    monkeypatch.setattr(accounts.services, "chain_append", refused)
    with pytest.raises(DatabaseError, match="the access log refused the entry"):
        act(world)
    monkeypatch.undo()
    assert state(world) == before
    assert entries_after(mark) == []


def test_prune_audit_log_prunes_each_hospital_to_its_retention_and_keeps_the_rest(
    clinician_a, clinician_b, monkeypatch, capsys
):
    """The command as cron runs it: hospital A keeps 30 days, hospital B keeps everything."""
    from datetime import timedelta

    from django.utils import timezone

    a, b = clinician_a.tenant, clinician_b.tenant
    a.audit_retention_days = 30
    a.save()
    real_now = timezone.now
    with monkeypatch.context() as past:  # entries written 40 days ago, in both chains
        past.setattr(timezone, "now", lambda: real_now() - timedelta(days=40))
        for membership in (clinician_a, clinician_b) * 3:
            access_event_record(action="test.old", user=membership.user, tenant=membership.tenant)
    recent = access_event_record(action="test.recent", user=clinician_a.user, tenant=a)
    b_before = list(AccessEvent.objects.filter(chain=chain_key(b.pk)).values_list("pk", flat=True))

    call_command("prune_audit_log")
    out = capsys.readouterr().out
    first_kept = recent.sequence
    assert out.splitlines() == [
        f"{a.slug}: pruned {first_kept - 1} entries older than 30 days; the chain starts at entry {first_kept}"
    ]
    a_left = AccessEvent.objects.filter(chain=chain_key(a.pk)).order_by("sequence")
    assert list(a_left.values_list("action", flat=True)) == ["test.recent", "audit.prune"]
    assert a_left.last().target_id == f"1-{recent.sequence - 1}"
    assert list(AccessEvent.objects.filter(chain=chain_key(b.pk)).values_list("pk", flat=True)) == b_before
    assert all(report.ok for report in chains_verify())

    call_command("prune_audit_log", "--tenant", b.slug)
    assert capsys.readouterr().out == f"{b.slug}: no retention set, nothing pruned\n"
    call_command("prune_audit_log")  # nothing is 30 days old any more
    assert f"{a.slug}: pruned 0 entries" in capsys.readouterr().out
    with pytest.raises(CommandError, match="No hospital with the slug 'nowhere'"):
        call_command("prune_audit_log", "--tenant", "nowhere")
