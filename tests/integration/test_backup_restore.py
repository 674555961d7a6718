"""Backups: images uploaded, backed up (encrypted with age, recorded in the access log), restored
into a new database on the same engine (PostgreSQL: a fresh database on the same server; SQLite:
a new file) and an empty storage folder; then `verify_audit_log` passes there and an image opens.
Runs in both CI passes: pg_dump/pg_restore on one, SQLite's backup API on the other."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from accounts.models import AccessEvent
from audit.backups import os_user
from recognition.models import Image
from tests.conftest import api_client_for, png_bytes, render_received
from tests.integration.test_api import upload
from tests.integration.test_s3_storage import BUCKET, s3_endpoint, s3_storage  # noqa: F401, F811  fixtures

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _own_media_root(settings, tmp_path):
    """Each backup holds only its own test's files. By the time these run, the suite's shared
    media root holds gigabytes of other tests' model packages, and a backup of it per test (each
    kept in its tmp_path) once filled CI's disk. (The S3 test's fixture replaces this storage.)"""
    media = tmp_path / "media"
    settings.MEDIA_ROOT = media
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": media, "file_permissions_mode": 0o640},
        },
    }


@pytest.fixture
def age_identity(tmp_path) -> tuple[Path, str]:
    identity = tmp_path / "operator.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    public = next(line.split(": ", 1)[1] for line in identity.read_text().splitlines() if "public key" in line)
    return identity, public


@pytest.fixture
def empty_database(tmp_path):
    """A database URL for a new, empty database of the engine the suite runs on."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        yield f"sqlite:///{tmp_path / 'restored.sqlite3'}"
        return
    import psycopg

    name = f"restore_{uuid.uuid4().hex[:12]}"
    params = {"host": db["HOST"] or "localhost", "port": db["PORT"] or 5432, "user": db["USER"] or None}
    if db["PASSWORD"]:
        params["password"] = db["PASSWORD"]
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    auth = (db["USER"] or "") + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    try:
        yield f"postgres://{auth + '@' if auth else ''}{params['host']}:{params['port']}/{name}"
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(args: list[str], *, database_url: str, var_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    """A management command of another deployment: its own database and storage."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url,
        "SIGHTLINE_VAR_DIR": str(var_dir),
        **extra,
    }
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=300
    )


RESTORED_BY = """
import django; django.setup()
from accounts.models import AccessEvent
print(AccessEvent.objects.get(action="backup.restore").actor_label)
"""

TARGET_STATE = """
import django; django.setup()
from audit.backups import database_is_empty, storage_is_empty
print(f"database empty: {database_is_empty()}, storage empty: {storage_is_empty()}")
"""
EMPTY = "database empty: True, storage empty: True"

RESTORE_IN_SMALL_CHUNKS = """
import sys, django; django.setup()
from django.core.management import call_command
from audit import backups
backups.CHUNK = 4096  # a small test dump spans many reads: pg_restore has all but the last before the check
call_command("backup_restore", sys.argv[1], "--identity", sys.argv[2])
"""


def target_state(database_url: str, var_dir: Path) -> str:
    state = manage(["-c", TARGET_STATE], database_url=database_url, var_dir=var_dir)
    assert state.returncode == 0, state.stderr
    return state.stdout.strip().splitlines()[-1]


OPEN_AN_IMAGE = """
import django; django.setup()
from PIL import Image as Pil
from recognition.models import Image
opened = 0
for image in Image.objects.exclude(file=""):
    with image.file.open("rb") as stored, Pil.open(stored) as decoded:
        decoded.load()
        opened += decoded.size == (image.width, image.height)
print(opened)
"""


def test_a_backup_restores_into_an_empty_database_and_storage_and_its_audit_log_verifies(
    clinician_a, demo_model, age_identity, empty_database, tmp_path
):
    identity, public = age_identity
    client = api_client_for(clinician_a)
    for seed in (1, 2):
        assert upload(client, png_bytes(seed=seed)).status_code == 201
    for image in Image.objects.all():
        render_received(image)
    backup = tmp_path / "backup"

    call_command("backup_create", str(backup), recipient=[public], operator="A. Operator")

    manifest = json.loads((backup / "manifest.json").read_text())
    database_part = "database.sqlite3.age" if connection.vendor == "sqlite" else "database.pgdump.age"
    assert {part["name"] for part in manifest["parts"]} == {database_part, "objects.tar.age"}
    assert manifest["objects"] >= 2
    for part in manifest["parts"]:
        encrypted = (backup / part["name"]).read_bytes()
        assert encrypted.startswith(b"age-encryption.org/v1")  # no plaintext copy on disk
        assert len(encrypted) == part["size"] and part["plain_size"] > 0
    assert sorted(path.name for path in backup.iterdir()) == sorted([database_part, "objects.tar.age", "manifest.json"])
    started, completed = (
        AccessEvent.objects.get(action=action, target_type="backup", target_id=manifest["backup_id"])
        for action in ("backup.start", "backup.complete")
    )
    assert started.tenant_id is None
    assert (
        started.actor_label == completed.actor_label == f"manage.py backup (operator A. Operator, os user {os_user()})"
    )
    assert started.sequence < completed.sequence

    restored_var = tmp_path / "restored-var"  # its media folder, empty
    restore = manage(
        ["manage.py", "backup_restore", str(backup), "--identity", str(identity), "--operator", "B. Restorer"],
        database_url=empty_database,
        var_dir=restored_var,
        SUDO_USER="on-call",
    )
    assert restore.returncode == 0, restore.stderr
    restored_by = manage(["-c", RESTORED_BY], database_url=empty_database, var_dir=restored_var)
    assert restored_by.stdout.strip().splitlines()[-1] == "manage.py backup (operator B. Restorer, os user on-call)"
    verify = manage(["manage.py", "verify_audit_log"], database_url=empty_database, var_dir=restored_var)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "entries verify" in verify.stdout
    opened = manage(["-c", OPEN_AN_IMAGE], database_url=empty_database, var_dir=restored_var)
    assert opened.returncode == 0, opened.stderr
    assert int(opened.stdout.strip().splitlines()[-1]) == 2  # both display copies decode

    again = manage(
        ["manage.py", "backup_restore", str(backup), "--identity", str(identity)],
        database_url=empty_database,
        var_dir=tmp_path / "another-empty-var",
    )
    assert again.returncode != 0
    assert "database is not empty" in again.stderr


def test_a_backup_without_an_operator_names_the_os_user_and_sudo_s_user_first(tmp_path, age_identity, monkeypatch, db):
    _, public = age_identity
    monkeypatch.delenv("SUDO_USER", raising=False)
    call_command("backup_create", str(tmp_path / "one"), recipient=[public])
    monkeypatch.setenv("SUDO_USER", "night-shift")
    call_command("backup_create", str(tmp_path / "two"), recipient=[public])
    labels = list(
        AccessEvent.objects.filter(action="backup.start").order_by("sequence").values_list("actor_label", flat=True)
    )
    assert labels == [f"manage.py backup (os user {getpass.getuser()})", "manage.py backup (os user night-shift)"]
    with pytest.raises(CommandError, match="--operator"):
        call_command("backup_create", str(tmp_path / "three"), recipient=[public], operator="bad\nname")


def test_a_failed_backup_whose_failure_cannot_be_recorded_raises_the_dump_s_own_error(
    tmp_path, age_identity, monkeypatch, caplog, db
):
    """The database is what failed: pg_dump's message, not the backup.failed write's, reaches the
    operator, and the log says the entry is missing (the backup's id, no data)."""
    from django.db import OperationalError

    from audit import backups

    _, public = age_identity

    def dump_fails(sink):
        sink.write(b"half a dump")
        raise backups.BackupError("pg_dump failed: server closed the connection unexpectedly")

    record = backups._record

    def record_fails_for_the_failure(action, *args, **kwargs):
        if action == "backup.failed":
            raise OperationalError("the database is gone")
        return record(action, *args, **kwargs)

    monkeypatch.setattr(backups, "_dump_postgresql", dump_fails)
    monkeypatch.setattr(backups, "_dump_sqlite", dump_fails)
    monkeypatch.setattr(backups, "_record", record_fails_for_the_failure)
    backup = tmp_path / "backup"
    with caplog.at_level("ERROR", logger="audit.backups"), pytest.raises(CommandError) as raised:
        call_command("backup_create", str(backup), recipient=[public])

    assert "pg_dump failed: server closed the connection unexpectedly" in str(raised.value)
    started = AccessEvent.objects.get(action="backup.start")
    assert not AccessEvent.objects.filter(action="backup.failed").exists()
    assert [record.getMessage() for record in caplog.records if record.name == "audit.backups"] == [
        f"backup {started.target_id} failed and its backup.failed entry could not be written (OperationalError)"
    ]
    assert list(backup.iterdir()) == []  # the half-written part is gone


def test_a_restore_into_a_storage_that_is_not_empty_is_refused(
    clinician_a, demo_model, age_identity, empty_database, tmp_path
):
    identity, public = age_identity
    assert upload(api_client_for(clinician_a), png_bytes(seed=3)).status_code == 201
    backup = tmp_path / "backup"
    call_command("backup_create", str(backup), recipient=[public])
    var_dir = tmp_path / "used-var"
    (var_dir / "media" / "tenants").mkdir(parents=True)
    (var_dir / "media" / "tenants" / "left-over.png").write_bytes(b"x")
    refused = manage(
        ["manage.py", "backup_restore", str(backup), "--identity", str(identity)],
        database_url=empty_database,
        var_dir=var_dir,
    )
    assert refused.returncode != 0
    assert "storage is not empty" in refused.stderr


def test_a_tampered_backup_file_is_refused_before_anything_is_written(age_identity, empty_database, tmp_path, db):
    identity, public = age_identity
    backup = tmp_path / "backup"
    call_command("backup_create", str(backup), recipient=[public])
    with (backup / "objects.tar.age").open("ab") as tampered:
        tampered.write(b"\0")
    refused = manage(
        ["manage.py", "backup_restore", str(backup), "--identity", str(identity)],
        database_url=empty_database,
        var_dir=tmp_path / "empty-var",
    )
    assert refused.returncode != 0
    assert "does not match the manifest" in refused.stderr
    assert target_state(empty_database, tmp_path / "empty-var") == EMPTY  # no table, no object


@pytest.mark.parametrize("part", ["database", "objects"])
def test_a_restore_whose_plaintext_does_not_match_leaves_the_target_empty_and_says_what_to_do_and_a_retry_works(
    part, clinician_a, demo_model, age_identity, empty_database, tmp_path
):
    """The plaintext's sha256 is known only once the stream ends: the database's last bytes are
    held back from pg_restore (one transaction) until it matches, the objects written are removed."""
    identity, public = age_identity
    assert upload(api_client_for(clinician_a), png_bytes(seed=7)).status_code == 201
    backup = tmp_path / "backup"
    call_command("backup_create", str(backup), recipient=[public])
    manifest_path = backup / "manifest.json"
    good = manifest_path.read_text()
    manifest = json.loads(good)
    for entry in manifest["parts"]:
        if entry["name"].startswith(part):
            entry["plain_sha256"] = "0" * 64  # the file whole and decryptable, its plaintext not the one named
    manifest_path.write_text(json.dumps(manifest))
    var_dir = tmp_path / "restored-var"
    restore = ["manage.py", "backup_restore", str(backup), "--identity", str(identity)]

    failed = manage(
        ["-c", RESTORE_IN_SMALL_CHUNKS, str(backup), str(identity)], database_url=empty_database, var_dir=var_dir
    )

    assert failed.returncode != 0
    assert "decrypted to bytes the manifest does not name" in failed.stderr
    assert "drop and recreate the target database" in failed.stderr and "empty the storage" in failed.stderr
    assert target_state(empty_database, var_dir) == EMPTY
    manifest_path.write_text(good)
    retried = manage(restore, database_url=empty_database, var_dir=var_dir)
    assert retried.returncode == 0, retried.stderr
    assert target_state(empty_database, var_dir) == "database empty: False, storage empty: False"


def test_a_backup_without_a_recipient_is_refused_in_words(tmp_path, monkeypatch, db):
    monkeypatch.delenv("SIGHTLINE_BACKUP_RECIPIENTS", raising=False)
    with pytest.raises(CommandError, match="No recipient"):
        call_command("backup_create", str(tmp_path / "backup"))
    assert not AccessEvent.objects.filter(action="backup.start").exists()


def test_objects_in_s3_are_backed_up_and_restored_into_an_empty_bucket_through_the_storage_api(
    s3_storage,  # noqa: F811
    s3_endpoint,  # noqa: F811
    clinician_a,
    demo_model,
    age_identity,
    empty_database,
    tmp_path,
):
    identity, public = age_identity
    endpoint, client = s3_endpoint
    client_for = api_client_for(clinician_a)
    assert upload(client_for, png_bytes(seed=5)).status_code == 201
    render_received(Image.objects.get())
    source_keys = {item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert len(source_keys) >= 1
    backup = tmp_path / "backup"
    call_command("backup_create", str(backup), recipient=[public])
    assert json.loads((backup / "manifest.json").read_text())["objects"] == len(source_keys)

    restored_bucket = f"restored-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=restored_bucket)
    s3 = {
        "SIGHTLINE_S3_BUCKET": restored_bucket,
        "SIGHTLINE_S3_ENDPOINT_URL": endpoint,
        "SIGHTLINE_S3_ACCESS_KEY_ID": "test",
        "SIGHTLINE_S3_SECRET_ACCESS_KEY": "test",
        "SIGHTLINE_S3_REGION": "us-east-1",
    }
    var_dir = tmp_path / "restored-var"
    restore = manage(
        ["manage.py", "backup_restore", str(backup), "--identity", str(identity)],
        database_url=empty_database,
        var_dir=var_dir,
        **s3,
    )
    assert restore.returncode == 0, restore.stderr
    restored = {item["Key"]: item["Size"] for item in client.list_objects_v2(Bucket=restored_bucket)["Contents"]}
    assert set(restored) == source_keys
    for key in source_keys:
        original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert client.get_object(Bucket=restored_bucket, Key=key)["Body"].read() == original
    assert manage(["manage.py", "verify_audit_log"], database_url=empty_database, var_dir=var_dir, **s3).returncode == 0
    opened = manage(["-c", OPEN_AN_IMAGE], database_url=empty_database, var_dir=var_dir, **s3)
    assert opened.returncode == 0, opened.stderr
    assert int(opened.stdout.strip().splitlines()[-1]) == 1


def test_the_object_walk_follows_no_symbolic_link(tmp_path):
    """A local media folder may hold a link (a bulk import's prefix looping back up, or pointing
    at another hospital's folder): the backup copies objects, never what a link reaches."""
    from django.core.files.storage import FileSystemStorage

    from audit.backups import storage_keys

    root = tmp_path / "media"
    (root / "tenants" / "1" / "images").mkdir(parents=True)
    (root / "tenants" / "1" / "images" / "a.png").write_bytes(b"x")
    (root / "tenants" / "2").mkdir(parents=True)
    (root / "tenants" / "2" / "b.png").write_bytes(b"y")
    os.symlink(root / "tenants", root / "tenants" / "1" / "images" / "loop")
    os.symlink(root / "tenants" / "2" / "b.png", root / "tenants" / "1" / "images" / "other.png")
    # a name no storage would write (intake refuses it too): a backup holding it could not be restored
    (root / "tenants" / "1" / "images" / "evil\\..\\..\\2\\b.png").write_bytes(b"z")
    keys = list(storage_keys(FileSystemStorage(location=root)))
    assert sorted(keys) == ["tenants/1/images/a.png", "tenants/2/b.png"]
