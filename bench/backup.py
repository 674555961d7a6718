"""Backup and restore: time and size for a given number of stored objects and access-log entries.

    .venv/bin/python bench/backup.py [--objects 1000] [--object-kb 200] [--entries 20000]

A throw-away deployment in a temporary folder: a SQLite file (or, with DATABASE_URL naming
PostgreSQL, a new database on that server, dropped afterwards), migrated, with ``--objects``
incompressible objects of ``--object-kb`` KiB in its storage (PNG and DICOM bytes barely
compress either) and ``--entries`` verified access-log entries. Then ``manage.py backup_create``
(age to one recipient) and ``manage.py backup_restore`` into a second, empty database and storage,
then ``verify_audit_log`` there. Each step is a process of its own, timed from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent

FILL = """
import os, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from accounts.models import Tenant
from accounts.services import access_event_record
tenant = Tenant.objects.create(name="Bench General", slug="bench-general")
objects, size, entries = int(os.environ["B_OBJECTS"]), int(os.environ["B_BYTES"]), int(os.environ["B_ENTRIES"])
for index in range(objects):
    default_storage.save(f"tenants/{tenant.pk}/images/{index:06d}.png", ContentFile(os.urandom(size)))
for start in range(0, entries, 500):
    with transaction.atomic():
        for _ in range(min(500, entries - start)):
            access_event_record(action="image.view", username="bench", tenant=tenant, target_type="image", target_id=1)
"""


def run(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--object-kb", type=int, default=200)
    parser.add_argument("--entries", type=int, default=20000)
    args = parser.parse_args()
    base_url = os.environ.get("DATABASE_URL", "")
    postgres = base_url.startswith("postgres")
    with tempfile.TemporaryDirectory(prefix="sightline-backup-bench-") as tmp:
        tmp_path = Path(tmp)
        created: list[str] = []

        def database(name: str) -> str:
            if not postgres:
                return f"sqlite:///{tmp_path / name}.sqlite3"
            import psycopg

            database_name = f"bench_{name}_{uuid.uuid4().hex[:8]}"
            parts = urlsplit(base_url)
            with psycopg.connect(base_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{database_name}"')
            created.append(database_name)
            return urlunsplit(parts._replace(path=f"/{database_name}"))

        def env_for(url: str, var: str) -> dict:
            return {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "config.settings.test",
                "DATABASE_URL": url,
                "SIGHTLINE_VAR_DIR": str(tmp_path / var),
                "B_OBJECTS": str(args.objects),
                "B_BYTES": str(args.object_kb * 1024),
                "B_ENTRIES": str(args.entries),
            }

        try:
            identity = tmp_path / "operator.key"
            subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
            public = next(line.split(": ", 1)[1] for line in identity.read_text().splitlines() if "public key" in line)
            source = env_for(database("source"), "source")
            fill_s = run([sys.executable, "-c", FILL], source)
            backup = tmp_path / "backup"
            backup_s = run([sys.executable, "manage.py", "backup_create", str(backup), "--recipient", public], source)
            target = env_for(database("target"), "target")
            restore_s = run(
                [sys.executable, "manage.py", "backup_restore", str(backup), "--identity", str(identity)], target
            )
            verify_s = run([sys.executable, "manage.py", "verify_audit_log"], target)
            manifest = json.loads((backup / "manifest.json").read_text())
            report = {
                "engine": "postgresql" if postgres else "sqlite",
                "objects": args.objects,
                "object_kb": args.object_kb,
                "entries": args.entries,
                "fill_s": round(fill_s, 1),
                "backup_s": round(backup_s, 1),
                "restore_s": round(restore_s, 1),
                "verify_s": round(verify_s, 1),
                "backup_bytes": folder_bytes(backup),
                "parts": {part["name"]: [part["plain_size"], part["size"]] for part in manifest["parts"]},
                "storage_bytes": folder_bytes(tmp_path / "source" / "media"),
            }
            print(json.dumps(report, indent=2))
        finally:
            if created:
                import psycopg

                with psycopg.connect(base_url, autocommit=True) as admin:
                    for name in created:
                        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
