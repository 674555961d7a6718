"""Access-log benchmark: what auditing costs a request, and the auditor's pages over 1,000,000 entries.

    .venv/bin/python bench/audit.py [--entries 1000000] [--samples 200] [--json bench/audit.json]

Builds a throw-away SQLite database in a temporary folder (or uses DATABASE_URL's PostgreSQL, in
a test database that is dropped afterwards), then:

(b) bulk-inserts ``--entries`` access-log entries for one hospital and a fifth as many for
    another, with ``bulk_create`` in batches of 10,000, over 200 people, a realistic mix of actions
    and outcomes, and targets that are real studies, images and reviews (so the patient and study
    filters resolve). Each chain gets sequences 1..N and its head row, so that later appends
    continue it; the hashes are placeholders: computing ``accounts.audit.entry_hash`` for every
    entry would dominate the run, and this bench measures reads, not verification (the chains do
    not verify; never run ``verify_audit_log`` against this database). Then ANALYZE, and the
    auditor's pages through ``access_log_list`` (the selector behind /hospital/access-log/ and
    /api/v1/access-log/, including the audit.view entry each page writes): the first page, page
    50 through real cursors, and each filter: median of 7 runs each.

(a) the audit cost per request: p50 latency of GET /api/v1/images/<id>/ (``image_get`` behind it,
    with a real JWT, through Django's test client) with the access-log write on and off,
    interleaved, ``--samples`` of each, against the full log of (b), so index maintenance on a
    large table is included. "Off" replaces ``accounts.services.chain_append`` with a no-op for
    the duration of one request, inside this process only: the request does everything else
    (permission check, query, serialisation) and skips only the chain lock, hash and insert.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 10_000
PEOPLE = 200
STUDIES = 10_000  # of hospital A: four per patient, two images each, a review of every other image
PLACEHOLDER_HASH = "f" * 64
ENTRY_FIELDS = (
    "created",
    "tenant",
    "actor",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "ip_address",
    "user_agent",
    "request_id",
    "chain",
    "sequence",
    "previous_hash",
    "entry_hash",
)
# (action, share in 200, target kind); ~3% of entries are refusals, ~0.5% failed sign-ins
ACTION_MIX = [
    ("image.view", 80, "image"),
    ("image.download", 20, "image"),
    ("image.list", 20, "image"),
    ("study.view", 20, "study"),
    ("study.list", 20, "study"),
    ("review.write", 10, "review"),
    ("auth.login", 10, ""),
    ("auth.logout", 8, ""),
    ("auth.token", 6, ""),
    ("audit.view", 4, "access_log"),
    ("membership.grant", 2, "membership"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="of the first hospital; the second gets 1/5")
    parser.add_argument("--samples", type=int, default=200, help="image views with and without the audit write")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "audit.json")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="sightline-audit-")
    os.environ["SIGHTLINE_VAR_DIR"] = workdir
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_test_environment

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0)
    try:
        report = run(args.entries, args.samples)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    args.json.write_text(json.dumps(report, indent=2))
    cost = report["audit_cost"]
    print(f"\n(a) GET /api/v1/images/<id>/, {cost['samples']} each, interleaved, log at {report['entries_total']:,}:")
    print(f"{'':<22} {'p50 ms':>8} {'p90 ms':>8}")
    for mode in ("on", "off"):
        print(f"{'audit write ' + mode:<22} {cost[mode]['p50_ms']:>8.2f} {cost[mode]['p90_ms']:>8.2f}")
    print(f"{'cost of the write':<22} {cost['p50_delta_ms']:>8.2f}")
    print(f"\n(b) Access log, {report['entries']:,} entries of one hospital on {report['database']}:")
    print(f"built in {report['build_s']} s ({report['insert_rows_per_s']:,} rows/s)")
    print(f"{'query':<46} {'median ms':>10} {'rows':>6}")
    for name, row in report["queries"].items():
        print(f"{name:<46} {row['median_ms']:>10.2f} {row['rows']:>6}")
    print(f"\nwritten to {args.json}")
    return 0


def build(count: int) -> dict:
    """The two hospitals, people, clinical rows to point at, and the entries."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from accounts.audit import chain_key
    from accounts.models import AccessEvent, AuditChain, Membership, Role, Tenant
    from recognition.models import Image, Review, Series, Study

    User = get_user_model()
    a = Tenant.objects.create(name="Bench A", slug="bench-a")
    b = Tenant.objects.create(name="Bench B", slug="bench-b")
    people = User.objects.bulk_create([User(username=f"person-{i:03d}") for i in range(PEOPLE)])
    auditor = User.objects.create(username="bench-auditor")
    membership = Membership.objects.create(user=auditor, tenant=a, role=Role.AUDITOR)
    clinician = Membership.objects.create(user=people[0], tenant=a, role=Role.CLINICIAN)
    studies = Study.objects.bulk_create(
        [Study(tenant=a, patient_pseudonym=f"P-{i // 4:06d}") for i in range(STUDIES)], batch_size=BATCH
    )
    series = Series.objects.bulk_create([Series(tenant=a, study=s) for s in studies], batch_size=BATCH)
    images = Image.objects.bulk_create(
        [
            Image(tenant=a, study=s.study, series=s, sha256="0" * 64, width=1, height=1, format="png", byte_size=1)
            for s in series
            for _ in range(2)
        ],
        batch_size=BATCH,
    )
    reviews = Review.objects.bulk_create(
        [Review(tenant=a, image=image, verdict="agree", author=people[0]) for image in images[::2]], batch_size=BATCH
    )
    targets = {
        "image": [str(i.pk) for i in images],
        "study": [str(s.pk) for s in studies],
        "review": [str(r.pk) for r in reviews],
        "membership": [str(clinician.pk)],
    }
    mix = [(action, kind) for action, share, kind in ACTION_MIX for _ in range(share)]
    columns = [f for f in AccessEvent._meta.concrete_fields if not f.primary_key]
    insert = (
        f"INSERT INTO {AccessEvent._meta.db_table} ({', '.join(f.column for f in columns)}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(columns))})"
    )
    assert [f.name for f in columns] == list(ENTRY_FIELDS), [f.name for f in columns]
    adapt = connection.ops.adapt_datetimefield_value
    now = timezone.now()
    span = timedelta(days=365)
    start = time.perf_counter()
    for tenant, n in ((a, count), (b, count // 5)):
        key, step = chain_key(tenant.pk), span / n
        batch = []
        for i in range(n):
            action, kind = mix[(i * 7) % len(mix)]
            pool = targets.get(kind, [""]) if tenant is a else [""]  # B's entries name no A rows
            if action == "auth.login" and (i // len(mix)) % 10 == 0:
                outcome = AccessEvent.Outcome.FAILED
            elif i % 37 == 0:
                outcome = AccessEvent.Outcome.DENIED
            else:
                outcome = AccessEvent.Outcome.SUCCESS
            # person-199 is rare (every 10,000th entry), the others share the rest evenly
            person = people[(i * 13) % (PEOPLE - 1)] if i % 10_000 else people[-1]
            batch.append(
                (
                    adapt(now - span + step * i),
                    tenant.pk,
                    person.pk,
                    person.username,
                    action,
                    kind,
                    pool[(i * 7919) % len(pool)],
                    str(outcome),
                    f"10.0.{i % 250}.{i % 200 + 1}",
                    "bench",
                    f"{i:032x}",
                    key,
                    i + 1,
                    PLACEHOLDER_HASH,
                    PLACEHOLDER_HASH,
                )
            )
            if len(batch) == BATCH or i == n - 1:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.executemany(insert, batch)
                batch = []
        # the chain's head, so the entries the bench itself writes continue the sequence
        AuditChain.objects.update_or_create(key=key, defaults={"sequence": n, "head_hash": PLACEHOLDER_HASH})
    inserted = time.perf_counter() - start
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE" if connection.vendor == "sqlite" else f"ANALYZE {AccessEvent._meta.db_table}")
    return {
        "a": a,
        "membership": membership,
        "clinician": clinician,
        "image": images[len(images) // 2],
        # entry 0 is an image.view of images[0]: its study and patient have entries at any --entries
        "study": images[0].study,
        "patient": images[0].study.patient_pseudonym,
        "people": people,
        "inserted_s": inserted,
        "rows": count + count // 5,
        "now": now,
    }


def time_pages(world: dict) -> dict:
    from django.contrib.auth.models import Permission

    from audit.selectors import AccessLogFilters, access_log_list

    membership = world["membership"]

    def timed(filters: AccessLogFilters, cursor: str = "", actor=None) -> dict:
        times, rows = [], 0
        for _ in range(7):
            t0 = time.perf_counter()
            page, _ = access_log_list(actor=actor or membership, filters=filters, cursor=cursor)
            times.append((time.perf_counter() - t0) * 1000)
            rows = len(page)
        return {"median_ms": round(statistics.median(times), 2), "rows": rows}

    queries = {"first page, newest first": timed(AccessLogFilters())}
    cursor = ""
    for _ in range(49):  # 49 pages of 100 through real cursors
        _, cursor = access_log_list(actor=membership, filters=AccessLogFilters(), cursor=cursor)
    queries["page 50 through its cursor"] = timed(AccessLogFilters(), cursor)
    frequent, rare = world["people"][1].username, world["people"][-1].username
    queries[f"person ({frequent})"] = timed(AccessLogFilters(person=frequent))
    queries[f"person, rare ({rare})"] = timed(AccessLogFilters(person=rare))
    queries["action prefix auth."] = timed(AccessLogFilters(action="auth."))
    queries["action review.write"] = timed(AccessLogFilters(action="review.write"))
    queries["outcome denied"] = timed(AccessLogFilters(outcome="denied"))
    queries["outcome failed, action auth.login"] = timed(AccessLogFilters(outcome="failed", action="auth.login"))
    queries["patient (4 studies, 8 images, 4 reviews)"] = timed(AccessLogFilters(patient=world["patient"]))
    queries["study (1 study, 2 images, 1 review)"] = timed(AccessLogFilters(study=world["study"].pk))
    middle = (world["now"] - timedelta(days=180)).date()
    queries["date range (one week)"] = timed(AccessLogFilters(date_from=middle, date_to=middle + timedelta(days=6)))
    queries["date range (one week), page 5"] = timed(
        AccessLogFilters(date_from=middle, date_to=middle + timedelta(days=6)),
        _nth_cursor(membership, AccessLogFilters(date_from=middle, date_to=middle + timedelta(days=6)), 4),
    )
    platform = world["people"][2]
    platform.user_permissions.add(Permission.objects.get(codename="audit_all_hospitals"))
    platform = type(platform).objects.get(pk=platform.pk)
    queries["platform auditor: all hospitals"] = timed(AccessLogFilters(), actor=platform)
    queries["platform auditor: hospital B, denied"] = timed(
        AccessLogFilters(hospital="bench-b", outcome="denied"), actor=platform
    )
    return queries


def _nth_cursor(membership, filters, pages: int) -> str:
    from audit.selectors import access_log_list

    cursor = ""
    for _ in range(pages):
        _, cursor = access_log_list(actor=membership, filters=filters, cursor=cursor)
    return cursor


def audit_cost(world: dict, samples: int) -> dict:
    from rest_framework.test import APIClient
    from rest_framework_simplejwt.tokens import AccessToken

    import accounts.services

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {AccessToken.for_user(world['clinician'].user)}")
    url = f"/api/v1/images/{world['image'].pk}/"
    real_append = accounts.services.chain_append

    def one(recording: bool) -> float:
        accounts.services.chain_append = real_append if recording else (lambda event: event)
        try:
            t0 = time.perf_counter()
            response = client.get(url)
            elapsed = (time.perf_counter() - t0) * 1000
        finally:
            accounts.services.chain_append = real_append
        assert response.status_code == 200, response.content
        return elapsed

    for _ in range(20):  # warm-up: caches, the connection, the token's user
        one(True), one(False)
    times = {True: [], False: []}
    for i in range(samples):
        order = (True, False) if i % 2 else (False, True)
        for recording in order:
            times[recording].append(one(recording))

    def summary(values):
        values = sorted(values)
        return {
            "p50_ms": round(statistics.median(values), 2),
            "p90_ms": round(values[int(len(values) * 0.9)], 2),
        }

    on, off = summary(times[True]), summary(times[False])
    return {"samples": samples, "on": on, "off": off, "p50_delta_ms": round(on["p50_ms"] - off["p50_ms"], 2)}


def run(count: int, samples: int) -> dict:
    from django.db import connection

    started = time.perf_counter()
    world = build(count)
    built = time.perf_counter() - started
    queries = time_pages(world)
    cost = audit_cost(world, samples)
    return {
        "database": connection.vendor,
        "entries": count,
        "other_hospital_entries": count // 5,
        "entries_total": world["rows"],
        "build_s": round(built, 1),
        "insert_rows_per_s": int(world["rows"] / world["inserted_s"]),
        "audit_cost": cost,
        "queries": queries,
        "total_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
