"""Backups: the database and the storage's objects, each streamed through ``age`` to the
operator's recipients, never a plaintext copy on disk; and their restore into an empty database
and an empty storage.

A backup is a folder of three files:

- ``database.pgdump.age`` (``pg_dump --format=custom`` on PostgreSQL) or ``database.sqlite3.age``
  (SQLite's online backup API, serialised in memory);
- ``objects.tar.age``: every object of the default storage (local files or S3, read through the
  Django storage API), as a tar stream;
- ``manifest.json``: for each file its size and sha256, encrypted and plain, and the counts.
  It names no patient and no object key (those are inside the encrypted tar).

Each run is an export of every hospital's patient data: its start is written to the access log
(platform chain, ``backup.start``; the actor names the command, the ``--operator`` and the OS
user: see ``actor_label``) and committed before any byte is read, so a backup that cannot
be recorded does not run and the dump itself holds its own start entry; its end is written as
``backup.complete`` (or ``backup.failed``; where that entry cannot be written, the log says so and
the dump's own error is raised). A restore writes ``backup.restore`` into the restored database.

A restore writes the objects first, then the database; each part's plaintext sha256 is checked
before it is committed where the format allows: the database (pg_restore in one transaction, its
last bytes held back until the hash matches; SQLite: read whole first), and the objects are
removed again if anything fails. Its error then says to drop and recreate the target database and
empty the storage before a retry (a non-empty target is refused).

Order: the database first, then the objects. An object created after the dump is copied as an
orphan (harmless); an object deleted in between (a PNG original, once its display copy exists)
is missing, and the restored database still names it: run backups when uploads are quiet, or
accept that such an original is re-uploaded.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from django.core.exceptions import SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import default_storage
from django.core.files.utils import validate_file_name
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import AccessEvent
from accounts.services import access_event_record

FORMAT = 1
CHUNK = 1 << 20  # bytes per read and write of a stream (1 MiB: few system calls, flat memory)
MANIFEST = "manifest.json"
OBJECTS = "objects.tar.age"
ACTOR = "manage.py backup"
OPERATOR_LENGTH = 64

logger = logging.getLogger(__name__)


def os_user() -> str:
    """Who runs the command on this machine: the person behind ``sudo`` where there is one."""
    sudo_user = os.environ.get("SUDO_USER", "").strip()
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return f"uid {os.getuid()}"


def actor_label(operator: str = "") -> str:
    """The access-log actor of a backup or restore: the command, the person who says they ran it
    (``--operator``, a name or staff id, never a patient identifier) and the OS user it ran as.
    The OS user is always recorded: it is observed, the operator's name is only claimed."""
    operator = operator.strip()
    if any(not character.isprintable() for character in operator) or len(operator) > OPERATOR_LENGTH:
        raise BackupError(f"--operator: a name or staff id of at most {OPERATOR_LENGTH} printable characters.")
    who = f"operator {operator}, os user {os_user()}" if operator else f"os user {os_user()}"
    return f"{ACTOR} ({who})"


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why, in words."""


@dataclass
class Part:
    name: str
    size: int = 0  # encrypted bytes on disk
    sha256: str = ""
    plain_size: int = 0  # bytes before encryption (checked again after decryption)
    plain_sha256: str = ""


@dataclass
class Manifest:
    backup_id: str
    created: str
    engine: str
    format: int = FORMAT
    objects: int = 0
    parts: list[Part] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    migrations: dict[str, str] = field(default_factory=dict)  # app → its latest applied migration

    def part(self, name: str) -> Part:
        for part in self.parts:
            if part.name == name:
                return part
        raise BackupError(f"The manifest names no {name}.")


def _age() -> str:
    binary = shutil.which("age")
    if binary is None:
        raise BackupError("age is not installed (Debian: apt-get install age).")
    return binary


def _engine() -> str:
    vendor = connection.vendor
    if vendor not in ("postgresql", "sqlite"):
        raise BackupError(f"Backups know PostgreSQL and SQLite, not {vendor}.")
    return vendor


def _database_part_name(engine: str) -> str:
    return "database.pgdump.age" if engine == "postgresql" else "database.sqlite3.age"


def _pg_env() -> dict[str, str]:
    db = connection.settings_dict
    env = dict(os.environ)
    for variable, key in (("PGHOST", "HOST"), ("PGPORT", "PORT"), ("PGUSER", "USER"), ("PGPASSWORD", "PASSWORD")):
        if db.get(key):
            env[variable] = str(db[key])
    env["PGDATABASE"] = db["NAME"]
    return env


class _Encrypting:
    """A write-only stream into ``age``: counts and hashes the plaintext on its way in."""

    def __init__(self, recipients: list[str], path: Path):
        argv = [_age(), "--encrypt", "--output", str(path)]
        for recipient in recipients:
            argv += ["--recipient", recipient]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        return len(data)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.stderr is not None
        error = self.process.stderr.read()
        if self.process.wait():
            raise BackupError(f"age could not encrypt: {error.decode(errors='replace').strip()}")

    def abort(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _encrypted_part(name: str, destination: Path, recipients: list[str], fill) -> Part:
    path = destination / name
    sink = _Encrypting(recipients, path)
    try:
        fill(sink)
        sink.close()
    except BaseException:
        sink.abort()
        path.unlink(missing_ok=True)
        raise
    return Part(name, path.stat().st_size, _file_sha256(path), sink.size, sink.hash.hexdigest())


def _dump_postgresql(sink: _Encrypting) -> None:
    dump = subprocess.Popen(
        ["pg_dump", "--format=custom"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_pg_env(),
    )
    assert dump.stdout is not None
    while chunk := dump.stdout.read(CHUNK):
        sink.write(chunk)
    _, error = dump.communicate()
    if dump.returncode:
        raise BackupError(f"pg_dump failed: {error.decode(errors='replace').strip()}")


SQLITE_FORMAT_BYTES = slice(18, 20)  # the header's write and read format versions: 2 is WAL, 1 legacy


def _rollback_journal(data: bytes) -> bytes:
    """The image as a rollback-journal database: a WAL-mode header (the live file's) makes SQLite
    refuse to open a deserialised copy; the restored file's connections turn WAL on again."""
    image = bytearray(data)
    if image[SQLITE_FORMAT_BYTES] == b"\x02\x02":
        image[SQLITE_FORMAT_BYTES] = b"\x01\x01"
    return bytes(image)


def _dump_sqlite(sink: _Encrypting) -> None:
    # the online backup API gives a consistent copy while others write; into memory, never a
    # plaintext file (memory: the database's size, which is small where SQLite is used at all)
    source = sqlite3.connect(connection.settings_dict["NAME"])
    copy = sqlite3.connect(":memory:")
    try:
        source.backup(copy)
        data = _rollback_journal(copy.serialize())
    finally:
        source.close()
        copy.close()
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        sink.write(view[start : start + CHUNK])


def _is_link(storage, key: str) -> bool:
    """On local files, a symbolic link is no object the platform made (a bulk import's prefix may
    hold one, which intake refuses): never followed, so a loop or a link to another hospital's
    folder is not copied. Object stores have no links."""
    try:
        return os.path.islink(storage.path(key.rstrip("/")))
    except NotImplementedError:
        return False


def _is_object_name(key: str) -> bool:
    """A name the storage would refuse to write (a file a person dropped into a local import
    folder named ``evil\\..\\..\\x.png``, which intake refuses) is no object the platform made:
    copying it would make the backup one that no restore can write back."""
    try:
        validate_file_name(key, allow_relative_path=True)
    except SuspiciousFileOperation:
        return False
    return "\\" not in key


def storage_keys(storage=default_storage, prefix: str = "") -> Iterator[str]:
    """Every object key under ``prefix``, depth first (S3 lists "folders" by delimiter too)."""
    try:
        folders, files = storage.listdir(prefix)
    except FileNotFoundError:
        return
    for name in sorted(files):
        if not _is_link(storage, f"{prefix}{name}") and _is_object_name(f"{prefix}{name}"):
            yield f"{prefix}{name}"
    for folder in sorted(folders):
        if not _is_link(storage, f"{prefix}{folder}"):
            yield from storage_keys(storage, f"{prefix}{folder}/")


def _write_objects(sink: _Encrypting, counted: list[int]) -> None:
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for key in storage_keys():
            try:
                size = default_storage.size(key)
                stream = default_storage.open(key, "rb")
            except FileNotFoundError:  # deleted since it was listed
                continue
            with stream:
                info = tarfile.TarInfo(key)
                info.size = size
                info.mtime = 0  # the key and bytes are the object; no times of patients' visits
                archive.addfile(info, stream)
            counted[0] += 1


def _applied_migrations() -> dict[str, str]:
    from django.db.migrations.recorder import MigrationRecorder

    latest: dict[str, str] = {}
    for app, name in MigrationRecorder(connection).migration_qs.order_by("id").values_list("app", "name"):
        latest[app] = name
    return latest


def _record(action: str, backup_id: str, actor: str, outcome: str = AccessEvent.Outcome.SUCCESS) -> None:
    """One access-log entry of the platform's chain, in a transaction of its own (committed now)."""
    with transaction.atomic():
        access_event_record(action=action, outcome=outcome, username=actor, target_type="backup", target_id=backup_id)


def backup_create(*, destination: Path, recipients: list[str], operator: str = "") -> Manifest:
    """Write one backup into ``destination`` (a new or empty folder)."""
    recipients = [recipient for recipient in recipients if recipient.strip()]
    if not recipients:
        raise BackupError(
            "No recipient: name the operator's age public key(s) in SIGHTLINE_BACKUP_RECIPIENTS or --recipient."
        )
    if destination.exists() and any(destination.iterdir()):
        raise BackupError(f"{destination} is not empty: each backup goes into a folder of its own.")
    actor = actor_label(operator)
    destination.mkdir(parents=True, exist_ok=True)
    engine = _engine()
    manifest = Manifest(backup_id=uuid.uuid4().hex, created=timezone.now().isoformat(), engine=engine)
    _record("backup.start", manifest.backup_id, actor)  # committed before a byte is read: the dump holds it
    try:
        manifest.migrations = _applied_migrations()
        dump = _dump_postgresql if engine == "postgresql" else _dump_sqlite
        manifest.parts.append(_encrypted_part(_database_part_name(engine), destination, recipients, dump))
        counted = [0]
        manifest.parts.append(
            _encrypted_part(OBJECTS, destination, recipients, lambda sink: _write_objects(sink, counted))
        )
        manifest.objects = counted[0]
        manifest.recipients = recipients
        (destination / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    except BaseException as error:
        try:
            _record("backup.failed", manifest.backup_id, actor, outcome=AccessEvent.Outcome.FAILED)
        except Exception as record_error:  # the database may be what failed: keep the dump's own error
            # the backup's id and the error's class only: nothing of the data, no object key
            logger.error(
                "backup %s failed and its backup.failed entry could not be written (%s)",
                manifest.backup_id,
                type(record_error).__name__,
            )
        raise error
    _record("backup.complete", manifest.backup_id, actor)
    return manifest


# -- restore --------------------------------------------------------------------------------------


def manifest_read(source: Path) -> Manifest:
    try:
        raw = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise BackupError(f"{source} holds no readable {MANIFEST}: {error}") from error
    if raw.get("format") != FORMAT:
        raise BackupError(f"This backup's format is {raw.get('format')!r}; this version reads {FORMAT}.")
    raw["parts"] = [Part(**part) for part in raw.get("parts", [])]
    return Manifest(**raw)


def _check_encrypted(source: Path, part: Part) -> Path:
    path = source / part.name
    if not path.is_file() or path.stat().st_size != part.size or _file_sha256(path) != part.sha256:
        raise BackupError(f"{part.name} is missing or does not match the manifest's size and sha256.")
    return path


class _Decrypting:
    """A read-only stream out of ``age --decrypt``: counts and hashes the plaintext."""

    def __init__(self, path: Path, identity: Path):
        self.process = subprocess.Popen(
            [_age(), "--decrypt", "--identity", str(identity), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.hash = hashlib.sha256()
        self.size = 0
        self.verified = False

    def read(self, size: int = -1) -> bytes:
        assert self.process.stdout is not None
        data = self.process.stdout.read(size)
        self.hash.update(data)
        self.size += len(data)
        return data

    def finish(self, part: Part) -> None:
        """Read to the end, then check age's exit and the plaintext's size and sha256: a consumer
        calls it before it commits what it read (again after: a no-op)."""
        if self.verified:
            return
        while self.read(CHUNK):  # whatever the reader left (tar's end-of-archive padding)
            pass
        _, error = self.process.communicate()
        if self.process.returncode:
            raise BackupError(f"age could not decrypt {part.name}: {error.decode(errors='replace').strip()}")
        if (self.size, self.hash.hexdigest()) != (part.plain_size, part.plain_sha256):
            raise BackupError(f"{part.name} decrypted to bytes the manifest does not name.")
        self.verified = True

    def abort(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def database_is_empty() -> bool:
    return not connection.introspection.table_names()


def storage_is_empty() -> bool:
    return next(storage_keys(), None) is None


def _restore_postgresql(stream: _Decrypting, verify: Callable[[], None]) -> None:
    """pg_restore in one transaction, fed through a pipe; the last chunk is held back until the
    whole plaintext's sha256 matches: pg_restore cannot reach its COMMIT without those bytes, and a
    mismatch kills it, so the server rolls everything back and the database stays empty."""
    restore = subprocess.Popen(
        [
            "pg_restore",
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            connection.settings_dict["NAME"],
        ],  # fmt: skip
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_pg_env(),
    )
    assert restore.stdin is not None
    try:
        pending = stream.read(CHUNK)
        while chunk := stream.read(CHUNK):
            restore.stdin.write(pending)
            pending = chunk
        verify()  # the whole plaintext read and checked: only now the archive's last bytes go
        restore.stdin.write(pending)
        restore.stdin.close()
    except BrokenPipeError:
        pass  # pg_restore stopped early: its error says why
    except BaseException:
        restore.kill()  # before its COMMIT: the transaction is rolled back
        restore.wait()
        raise
    assert restore.stderr is not None
    error = restore.stderr.read()
    if restore.wait():
        raise BackupError(f"pg_restore failed: {error.decode(errors='replace').strip()}")


def _restore_sqlite(stream: _Decrypting, verify: Callable[[], None]) -> None:
    data = bytearray()
    while chunk := stream.read(CHUNK):
        data += chunk
    verify()  # before a page is written
    copy = sqlite3.connect(":memory:")
    connection.close()  # Django's handle on the (empty) target, reopened after
    target = sqlite3.connect(connection.settings_dict["NAME"])
    try:
        copy.deserialize(_rollback_journal(bytes(data)))
        copy.backup(target)
    finally:
        copy.close()
        target.close()


class _Forward(io.RawIOBase):
    """A tar member's bytes as a forward-only stream: the storage streams it (S3 in multipart
    pieces) instead of seeking, and nothing is spooled to a plaintext temporary file."""

    def __init__(self, content: IO[bytes]):
        super().__init__()
        self._content = content

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._content.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _restore_objects(stream: _Decrypting, verify: Callable[[], None], saved: list[str]) -> int:
    """Each object into the storage as it streams (``saved``: the keys written, removed again by
    the caller if the restore fails); the sha256 is known at the archive's end."""
    restored = 0
    with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
        for member in archive:
            if not member.isfile() or member.name.startswith("/") or ".." in member.name.split("/"):
                raise BackupError(f"The objects archive holds an entry that is not an object: {member.name!r}")
            content: IO[bytes] | None = archive.extractfile(member)
            assert content is not None
            saved_as = default_storage.save(member.name, File(_Forward(content), name=member.name))
            saved.append(saved_as)
            if saved_as != member.name:
                raise BackupError(f"The storage renamed {member.name!r} to {saved_as!r}: it was not empty.")
            restored += 1
    verify()
    return restored


def _decrypted_into(source: Path, part: Part, identity: Path, consume):
    """``consume(stream, verify)``: it calls ``verify()`` before it commits what it read."""
    stream = _Decrypting(_check_encrypted(source, part), identity)
    try:
        result = consume(stream, lambda: stream.finish(part))
        stream.finish(part)
    except BaseException:
        stream.abort()
        raise
    return result


def backup_restore(*, source: Path, identity: Path, operator: str = "") -> Manifest:
    """Restore a backup into this deployment's database and storage; both must be empty."""
    actor = actor_label(operator)
    manifest = manifest_read(source)
    engine = _engine()
    if manifest.engine != engine:
        raise BackupError(f"This backup is of a {manifest.engine} database; this deployment runs {engine}.")
    if not identity.is_file():
        raise BackupError(f"No identity file at {identity}.")
    for part in manifest.parts:  # every file whole before anything is written
        _check_encrypted(source, part)
    if not database_is_empty():
        raise BackupError("The database is not empty: restore into a new, empty database (no tables).")
    if not storage_is_empty():
        raise BackupError("The storage is not empty: restore into an empty folder or bucket.")
    restore = _restore_postgresql if engine == "postgresql" else _restore_sqlite
    saved: list[str] = []
    try:
        # the objects first: what they wrote can be removed again; then the database, in one
        # transaction that commits only once its plaintext's sha256 matches
        restored = _decrypted_into(
            source, manifest.part(OBJECTS), identity, lambda stream, verify: _restore_objects(stream, verify, saved)
        )
        if restored != manifest.objects:
            raise BackupError(f"{restored} objects restored; the manifest names {manifest.objects}.")
        _decrypted_into(source, manifest.part(_database_part_name(engine)), identity, restore)
        _record("backup.restore", manifest.backup_id, actor)
    except BaseException as error:
        _remove_objects(saved)
        if isinstance(error, Exception):
            raise BackupError(f"The restore failed: {error} {_before_a_retry(engine)}") from error
        raise
    return manifest


def _remove_objects(keys: list[str]) -> None:
    for key in keys:
        try:
            default_storage.delete(key)
        except Exception:  # best effort: the message tells the operator to empty the storage
            logger.warning("restore: an object it wrote could not be removed again")


def _before_a_retry(engine: str) -> str:
    """What the operator does before a retry (a non-empty target is refused), in words."""
    name = connection.settings_dict["NAME"]
    database = f"dropdb {name} && createdb {name}" if engine == "postgresql" else f"delete the file {name}"
    bucket = getattr(default_storage, "bucket_name", None)
    storage = f"the bucket {bucket}" if bucket else f"the folder {getattr(default_storage, 'location', '')}"
    return (
        "Before a retry, drop and recreate the target database "
        f"({database}) and empty the storage (every object in {storage}): this run rolled back what it "
        "could, but do not start the platform on this target."
    )
