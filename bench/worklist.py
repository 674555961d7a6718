"""Worklist benchmark: keyset pages over 100,000 studies of one hospital (and 20,000 of another).

    .venv/bin/python bench/worklist.py [--studies 100000] [--json bench/worklist.json]

Builds a throw-away SQLite database in a temporary folder (or uses DATABASE_URL's PostgreSQL, in
a test database that is dropped afterwards), then times ``study_worklist`` — the selector behind
/worklist/ and /api/v1/studies/ — on the first page, on a page deep in the list (through its
cursor), with each filter, and for a search. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "worklist.json")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="sightline-worklist-")
    os.environ["SIGHTLINE_VAR_DIR"] = workdir
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_test_environment

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0)
    try:
        report = run(args.studies)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nWorklist, {report['studies']:,} studies of one hospital on {report['database']}:")
    print(f"{'query':<42} {'median ms':>10} {'rows':>6}")
    for name, row in report["queries"].items():
        print(f"{name:<42} {row['median_ms']:>10.2f} {row['rows']:>6}")
    print(f"\nwritten to {args.json}")
    return 0


def run(count: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.utils import timezone

    from accounts.models import Membership, Role, Tenant
    from recognition.models import Study
    from recognition.selectors import WorklistFilters, study_worklist

    a = Tenant.objects.create(name="Bench A", slug="bench-a")
    b = Tenant.objects.create(name="Bench B", slug="bench-b")
    user = get_user_model().objects.create(username="bench")
    membership = Membership.objects.create(user=user, tenant=a, role=Role.CLINICIAN)
    statuses = ["done"] * 8 + ["queued", "failed"]
    labels = ["no_finding", "round_opacity"]
    reviews = ["unreviewed", "unreviewed", "in_review", "signed_off"]
    start, now = time.perf_counter(), timezone.now()
    for tenant, n in ((a, count), (b, count // 5)):
        batch = []
        for i in range(n):
            batch.append(
                Study(
                    tenant=tenant,
                    patient_pseudonym=f"P-{i % (n // 3 or 1):08d}",
                    accession_number=f"ACC-{tenant.pk}-{i:08d}",
                    modality=("CT", "DX", "MR", "CR", "US")[i % 5],
                    study_date=date(2026, 1, 1) + timedelta(days=i % 300),
                    created=now - timedelta(seconds=n - i),
                    ai_status=statuses[i % len(statuses)],
                    top_label=labels[i % 2],
                    top_probability=0.9,
                    review_state=reviews[i % len(reviews)],
                )
            )
            if len(batch) == 5000:
                Study.objects.bulk_create(batch)
                batch = []
        Study.objects.bulk_create(batch)
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    else:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE recognition_study")
    built = time.perf_counter() - start

    def timed(filters: WorklistFilters, cursor: str = "") -> dict:
        times, rows, next_cursor = [], 0, ""
        for _ in range(7):
            t0 = time.perf_counter()
            page, next_cursor = study_worklist(membership=membership, filters=filters, cursor=cursor)
            times.append((time.perf_counter() - t0) * 1000)
            rows = len(page)
        return {"median_ms": round(statistics.median(times), 2), "rows": rows, "next": next_cursor}

    queries = {"first page, newest first": timed(WorklistFilters())}
    cursor, depth = "", 0
    for _ in range(40):  # walk 40 pages (2,000 rows) through real cursors
        _, cursor = study_worklist(membership=membership, filters=WorklistFilters(), cursor=cursor)
        depth += 1
    queries[f"page {depth + 1} through its cursor"] = timed(WorklistFilters(), cursor)
    middle = Study.objects.filter(tenant=a).order_by("-created", "-id")[count // 2]
    from recognition.selectors import _cursor_encode

    queries["page at the middle (50%)"] = timed(WorklistFilters(), _cursor_encode(middle.created, middle.pk, "newest"))
    queries["AI status failed"] = timed(WorklistFilters(ai_status="failed"))
    queries["finding round_opacity, unreviewed"] = timed(WorklistFilters(finding="round_opacity", review="unreviewed"))
    queries["modality MR, signed off"] = timed(WorklistFilters(modality="MR", review="signed_off"))
    queries["date range (one week)"] = timed(
        WorklistFilters(date_from=date(2026, 3, 1), date_to=date(2026, 3, 7), sort="oldest")
    )
    queries["search: accession"] = timed(WorklistFilters(q=f"ACC-{a.pk}-{count // 3:08d}"))
    queries["search: patient"] = timed(WorklistFilters(q="P-00000042"))
    queries["sort by patient"] = timed(WorklistFilters(sort="patient"))
    for row in queries.values():
        row.pop("next")
    return {
        "database": connection.vendor,
        "studies": count,
        "other_hospital_studies": count // 5,
        "build_s": round(built, 1),
        "queries": queries,
    }


if __name__ == "__main__":
    sys.exit(main())
