"""The auditor's view of the access log: scope, filters, keyset pages, entry details, CSV export.

Personas: an auditor of hospital A, an auditor of hospital B, a clinician of A, and a platform
auditor who belongs to no hospital.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.models import AccessEvent, Role
from accounts.services import access_event_record, membership_grant, user_get_or_create
from accounts.signals import username_tried
from audit.exports import CSV_COLUMNS
from recognition.models import Image, Review, Series, Study
from tests.conftest import PASSWORD, api_client_for

pytestmark = pytest.mark.django_db

PAGE = reverse("access-log")
CSV_URL = reverse("access-log-csv")
API = reverse("api-access-log")
SEARCH_API = reverse("api-access-log-search")


@pytest.fixture
def auditor_a(hospital_a):
    return membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="auditor-a", password=PASSWORD), role=Role.AUDITOR
    )


@pytest.fixture
def auditor_b(hospital_b):
    return membership_grant(
        tenant=hospital_b, user=user_get_or_create(username="auditor-b", password=PASSWORD), role=Role.AUDITOR
    )


@pytest.fixture
def platform_auditor(db):
    user = user_get_or_create(username="platform-auditor", password=PASSWORD)
    user.user_permissions.add(Permission.objects.get(codename="audit_all_hospitals"))
    return get_user_model().objects.get(pk=user.pk)  # a fresh object: no stale permission cache


def log(tenant, action="image.view", *, target=None, target_type="", user=None, username="", outcome="success"):
    if target is not None:
        target_type = target_type or type(target).__name__.lower()
    return access_event_record(
        action=action,
        outcome=outcome,
        tenant=tenant,
        user=user,
        username=username,
        target_type=target_type,
        target_id=target.pk if target is not None else "",
    )


def log_at(monkeypatch, when: datetime, tenant, **kwargs):
    """An entry written at ``when``: the chain stamps the time under its lock, so freeze it."""
    with monkeypatch.context() as patch:
        patch.setattr("django.utils.timezone.now", lambda: when)
        return log(tenant, **kwargs)


def patient_record(tenant, pseudonym, author, images=1):
    """A study of the patient, its images, and one review of each image."""
    study = Study.objects.create(tenant=tenant, patient_pseudonym=pseudonym)
    series = Series.objects.create(tenant=tenant, study=study)
    made = []
    for _ in range(images):
        image = Image.objects.create(
            tenant=tenant, study=study, series=series, sha256="0" * 64, width=1, height=1, format="png", byte_size=1
        )
        review = Review.objects.create(tenant=tenant, image=image, verdict="agree", author=author)
        made.append((image, review))
    return study, made


def api_ids(membership, **params) -> list[int]:
    """The ids the API lists; person and patient filters go in a POST body, never a URL."""
    client = api_client_for(membership)
    if {"person", "patient"} & set(params):
        response = client.post(SEARCH_API, params, format="json")
    else:
        response = client.get(API, params)
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def csv_rows(response) -> list[list[str]]:
    assert response.status_code == 200
    assert response.streaming
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


# --- scope ------------------------------------------------------------------------------


def test_an_auditor_sees_only_their_own_hospitals_entries(client, auditor_a, hospital_a, hospital_b):
    mine = log(hospital_a, username="a-side-marker")
    theirs = log(hospital_b, username="b-side-marker")
    client.force_login(auditor_a.user)
    page = client.get(PAGE)
    assert page.status_code == 200
    assert b"a-side-marker" in page.content and b"b-side-marker" not in page.content
    response = api_client_for(auditor_a).get(API)
    results = response.json()["results"]
    assert mine.pk in [row["id"] for row in results] and theirs.pk not in [row["id"] for row in results]
    assert {row["hospital"] for row in results} == {hospital_a.slug}


def test_reading_a_page_is_logged_once_per_page(client, auditor_a, hospital_a):
    client.force_login(auditor_a.user)
    client.get(PAGE)
    api_client_for(auditor_a).get(API)
    views = AccessEvent.objects.filter(action="audit.view", actor=auditor_a.user, tenant=hospital_a)
    assert views.count() == 2
    assert set(views.values_list("target_type", flat=True)) == {"access_log"}


def test_a_clinician_is_refused_everywhere(client, clinician_a, hospital_a):
    entry = log(hospital_a)
    client.force_login(clinician_a.user)
    assert client.get(PAGE).status_code == 403
    assert client.get(CSV_URL).status_code == 403
    assert client.get(reverse("access-log-entry", args=[entry.pk])).status_code == 403
    assert api_client_for(clinician_a).get(API).status_code == 403
    assert not AccessEvent.objects.filter(action="audit.export").exists()
    refusals = AccessEvent.objects.filter(actor=clinician_a.user, action="audit.view")
    assert list(refusals.values_list("outcome", flat=True)) == ["denied"] * 4


# --- filters ----------------------------------------------------------------------------


def test_the_person_filter_matches_the_user_and_failed_sign_ins_under_that_name(
    auditor_a, clinician_a, viewer_a, hospital_a
):
    by_clinician = log(hospital_a, user=clinician_a.user)
    # a failed sign-in keeps the keyed hash of the name typed, no user attached
    typed_name = log(hospital_a, "auth.login", username=username_tried("clinician"), outcome="failed")
    log(hospital_a, user=viewer_a.user)
    log(hospital_a, username="viewer")
    assert set(api_ids(auditor_a, person="clinician")) == {by_clinician.pk, typed_name.pk}
    assert api_ids(auditor_a, person="nobody-at-all") == []


def test_the_patient_filter_finds_entries_about_their_studies_images_and_reviews_only(
    auditor_a, clinician_a, clinician_b, hospital_a, hospital_b
):
    study, [(image, review), (image2, review2)] = patient_record(hospital_a, "P-ALICE", clinician_a.user, images=2)
    other_study, [(other_image, other_review)] = patient_record(hospital_a, "P-BOB", clinician_a.user)
    b_study, [(b_image, _)] = patient_record(hospital_b, "P-ALICE", clinician_b.user)  # same pseudonym, other hospital
    about_alice = [
        log(hospital_a, "study.view", target=study),
        log(hospital_a, target=image),
        log(hospital_a, target=image2),
        log(hospital_a, "review.write", target=review),
        log(hospital_a, "review.write", target=review2),
    ]
    log(hospital_a, "study.view", target=other_study)
    log(hospital_a, target=other_image)
    log(hospital_a, "review.write", target=other_review)
    log(hospital_a, "image.view", target=b_image, outcome="denied")  # someone in A tried B's image
    log(hospital_a, "membership.view", target_type="membership", target=study)  # same id, another kind
    log(hospital_b, target=b_image)
    assert sorted(api_ids(auditor_a, patient="P-ALICE")) == sorted(e.pk for e in about_alice)
    assert api_ids(auditor_a, patient="P-NOBODY") == []


def test_the_study_filter_finds_entries_about_the_study_its_images_and_their_reviews(
    auditor_a, clinician_a, hospital_a
):
    study, [(image, review)] = patient_record(hospital_a, "P-ALICE", clinician_a.user)
    second_study, [(second_image, _)] = patient_record(hospital_a, "P-ALICE", clinician_a.user)
    expected = {
        log(hospital_a, "study.view", target=study).pk,
        log(hospital_a, target=image).pk,
        log(hospital_a, "review.write", target=review).pk,
    }
    log(hospital_a, "study.view", target=second_study)
    log(hospital_a, target=second_image)
    assert set(api_ids(auditor_a, study=study.pk)) == expected
    assert set(api_ids(auditor_a, patient="P-ALICE", study=study.pk)) == expected


def test_the_action_filter_is_exact_or_a_prefix_ending_in_a_dot(auditor_a, hospital_a):
    login = log(hospital_a, "auth.login", username="someone")
    logout = log(hospital_a, "auth.logout", username="someone")
    log(hospital_a, "authority.check", username="someone")  # starts with "auth" but not "auth."
    log(hospital_a, "image.view", username="someone")
    assert api_ids(auditor_a, action="auth.login") == [login.pk]
    assert api_ids(auditor_a, action="auth.") == [logout.pk, login.pk]
    assert api_ids(auditor_a, action="auth") == []
    assert api_ids(auditor_a, action="nothing.") == []


def test_the_outcome_filter(auditor_a, hospital_a):
    denied = log(hospital_a, outcome="denied")
    failed = log(hospital_a, "auth.login", outcome="failed", username="x")
    log(hospital_a)
    assert api_ids(auditor_a, outcome="denied") == [denied.pk]
    assert api_ids(auditor_a, outcome="failed") == [failed.pk]
    assert api_client_for(auditor_a).get(API, {"outcome": "maybe"}).status_code == 400


def test_the_date_range_is_whole_days_in_the_sites_time_zone(auditor_a, hospital_a, monkeypatch, settings):
    settings.TIME_ZONE = "America/New_York"  # UTC-5 in March: the days end at 05:00 UTC
    at = [
        datetime(2020, 3, 2, 4, 59, 59, tzinfo=UTC),  # 1 March, 23:59:59 in New York
        datetime(2020, 3, 2, 5, 0, 0, tzinfo=UTC),  # 2 March, 00:00
        datetime(2020, 3, 4, 4, 59, 59, tzinfo=UTC),  # 3 March, 23:59:59
        datetime(2020, 3, 4, 5, 0, 0, tzinfo=UTC),  # 4 March, 00:00
    ]
    entries = [log_at(monkeypatch, when, hospital_a) for when in at]
    assert api_ids(auditor_a, date_from="2020-03-02", date_to="2020-03-03") == [entries[2].pk, entries[1].pk]
    assert api_ids(auditor_a, date_to="2020-03-01") == [entries[0].pk]
    assert api_ids(auditor_a, date_from="2020-03-04", date_to="2020-03-04") == [entries[3].pk]


def test_the_page_filters_like_the_api_and_its_links_carry_them(client, auditor_a, hospital_a):
    for _ in range(3):
        log(hospital_a, "auth.login", username="page-person", outcome="failed")
    log(hospital_a, "auth.login", username="someone-else", outcome="failed")
    client.force_login(auditor_a.user)
    page = client.post(PAGE, {"person": "page-person", "action": "auth.", "outcome": "failed"})
    assert page.status_code == 200
    assert [e.actor_label for e in page.context["entries"]] == ["page-person"] * 3
    assert b"someone-else" not in page.content
    # the CSV form carries the filters as hidden fields of a POST, not in its action's URL
    assert dict(page.context["csv_fields"]) == {"person": "page-person", "action": "auth.", "outcome": "failed"}
    assert b'action="/hospital/access-log.csv"' in page.content
    assert client.get(PAGE, {"date_from": "yesterday"}).status_code == 400
    assert client.get(PAGE, {"cursor": "not-a-cursor"}).status_code == 400


# --- pages ------------------------------------------------------------------------------


def test_keyset_pages_walk_every_entry_once_in_order_even_with_equal_times(auditor_a, hospital_a, monkeypatch):
    same_moment = datetime(2020, 1, 10, 12, 0, tzinfo=UTC)
    for i in range(25):
        when = same_moment if i % 3 == 0 else same_moment + timedelta(minutes=i)
        log_at(monkeypatch, when, hospital_a, username=f"walker-{i}")
    expected = list(
        AccessEvent.objects.filter(tenant=hospital_a).order_by("-created", "-id").values_list("pk", flat=True)
    )
    assert len(expected) > 25  # the audited grant of the auditor's membership too
    seen, cursor, pages = [], "", 0
    client = api_client_for(auditor_a)
    while True:
        body = client.get(API, {"page_size": 4, "cursor": cursor}).json()
        seen += [row["id"] for row in body["results"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(body["results"]) == 4
    # the walk's own audit.view entries are newer than its first page, so never on a later one
    assert seen == [pk for pk in expected]
    assert len(set(seen)) == len(seen)
    assert pages == -(-len(expected) // 4)


def test_a_page_costs_the_same_queries_for_5_and_50_entries(client, auditor_a, hospital_a, clinician_a):
    client.force_login(auditor_a.user)

    def queries_with(total: int) -> int:
        while AccessEvent.objects.filter(tenant=hospital_a, action="image.view").count() < total:
            log(hospital_a, user=clinician_a.user, target_type="image", username="")
        client.get(PAGE)  # warm-up: session, permission caches
        with CaptureQueriesContext(connection) as queries:
            page = client.get(PAGE, {"action": "image.view"})
        assert len(page.context["entries"]) == total
        return len(queries.captured_queries)

    assert queries_with(5) == queries_with(50)


# --- entry details ----------------------------------------------------------------------


def test_an_entry_shows_every_field_and_the_view_is_logged(client, auditor_a, hospital_a, clinician_a):
    entry = log(hospital_a, target_type="image", user=clinician_a.user)
    entry.refresh_from_db()
    client.force_login(auditor_a.user)
    page = client.get(reverse("access-log-entry", args=[entry.pk]))
    assert page.status_code == 200
    for value in (entry.chain, str(entry.sequence), entry.previous_hash, entry.entry_hash, "clinician", "image.view"):
        assert value.encode() in page.content, value
    view = AccessEvent.objects.filter(action="audit.view", target_type="access_event").get()
    assert (view.target_id, view.outcome, view.actor, view.tenant) == (
        str(entry.pk),
        "success",
        auditor_a.user,
        hospital_a,
    )


def test_another_hospitals_entry_is_404_like_a_missing_one_and_the_attempt_is_logged(
    client, auditor_a, hospital_a, hospital_b
):
    theirs = log(hospital_b, username="b-detail-marker")
    missing = theirs.pk + 1000
    client.force_login(auditor_a.user)
    response = client.get(reverse("access-log-entry", args=[theirs.pk]))
    assert response.status_code == 404 and b"b-detail-marker" not in response.content
    assert client.get(reverse("access-log-entry", args=[missing])).status_code == 404
    attempts = AccessEvent.objects.filter(action="audit.view", target_type="access_event", outcome="denied")
    assert sorted(attempts.values_list("target_id", flat=True)) == sorted([str(theirs.pk), str(missing)])
    assert set(attempts.values_list("tenant", flat=True)) == {hospital_a.pk}


# --- CSV --------------------------------------------------------------------------------


def test_the_csv_has_a_header_and_one_row_per_matching_entry(client, auditor_a, hospital_a, hospital_b):
    rows_expected = [log(hospital_a, "image.view", username=f"csv-{i}") for i in range(3)]
    log(hospital_a, "study.view", username="csv-other")
    log(hospital_b, "image.view", username="csv-b")
    client.force_login(auditor_a.user)
    rows = csv_rows(client.get(CSV_URL, {"action": "image.view"}))
    assert rows[0] == list(CSV_COLUMNS)
    assert [int(row[0]) for row in rows[1:]] == [e.pk for e in reversed(rows_expected)]
    assert {row[2] for row in rows[1:]} == {hospital_a.slug}
    assert [row[3] for row in rows[1:]] == ["csv-2", "csv-1", "csv-0"]
    newest = rows_expected[-1]
    newest.refresh_from_db()
    assert rows[1][11:] == [newest.chain, str(newest.sequence), newest.previous_hash, newest.entry_hash]


def test_the_csv_neutralises_formulas(client, auditor_a, hospital_a):
    for label in ("=HYPERLINK(1)", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "plain"):
        log(hospital_a, "csv.formula", username=label)
    client.force_login(auditor_a.user)
    rows = csv_rows(client.get(CSV_URL, {"action": "csv.formula"}))
    assert sorted(row[3] for row in rows[1:]) == sorted(
        ["'=HYPERLINK(1)", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "plain"]
    )


def test_the_export_is_logged_once_before_it_streams(client, auditor_a, hospital_a):
    for i in range(5):
        log(hospital_a, username=f"export-{i}")
    client.force_login(auditor_a.user)
    response = client.get(CSV_URL)
    exports = AccessEvent.objects.filter(action="audit.export")
    assert list(exports.values_list("actor", "tenant")) == [(auditor_a.user.pk, hospital_a.pk)]
    rows = csv_rows(response)
    assert exports.count() == 1
    assert len(rows) - 1 == AccessEvent.objects.filter(tenant=hospital_a).count()


def test_the_csv_streams_chunk_by_chunk_under_asgi(auditor_a, hospital_a):
    for i in range(3):
        log(hospital_a, "asgi.row", username=f"asgi-{i}")
    client = AsyncClient()
    client.force_login(auditor_a.user)

    async def fetch():
        response = await client.get(CSV_URL, {"action": "asgi.row"})
        return response, [chunk async for chunk in response.streaming_content]

    response, chunks = async_to_sync(fetch)()
    assert response.status_code == 200 and response.is_async  # Django would buffer a sync iterator here
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert rows[0] == list(CSV_COLUMNS) and [row[3] for row in rows[1:]] == ["asgi-2", "asgi-1", "asgi-0"]


# --- the platform auditor ---------------------------------------------------------------


def test_a_platform_auditor_sees_every_hospital_and_can_pick_one(client, platform_auditor, hospital_a, hospital_b):
    a_entry = log(hospital_a, username="a-platform-marker")
    b_entry = log(hospital_b, username="b-platform-marker")
    client.force_login(platform_auditor)
    everything = client.get(PAGE)
    assert everything.status_code == 200
    assert b"a-platform-marker" in everything.content and b"b-platform-marker" in everything.content
    only_b = client.get(PAGE, {"hospital": hospital_b.slug})
    assert [e.pk for e in only_b.context["entries"] if e.actor_label.endswith("marker")] == [b_entry.pk]
    assert {e.tenant_id for e in only_b.context["entries"]} == {hospital_b.pk}
    assert client.get(reverse("access-log-entry", args=[a_entry.pk])).status_code == 200
    rows = csv_rows(client.post(CSV_URL, {"hospital": hospital_a.slug, "person": "a-platform-marker"}))
    assert [int(row[0]) for row in rows[1:]] == [a_entry.pk]
    assert client.get(PAGE, {"hospital": "no-such-hospital"}).status_code == 400
    # a read of one hospital's log is written into that hospital's chain
    reads = AccessEvent.objects.filter(actor=platform_auditor, action__in=["audit.view", "audit.export"])
    assert sorted(reads.values_list("tenant", flat=True), key=str) == sorted(
        [None, hospital_b.pk, hospital_a.pk, hospital_a.pk], key=str
    )


def test_a_platform_auditor_finds_failed_sign_ins_by_the_name_typed(client, platform_auditor, hospital_a):
    client.post(reverse("login"), {"username": "mallory", "password": "wrong"})
    log(hospital_a, "auth.token", username="a-token")
    client.force_login(platform_auditor)
    page = client.post(PAGE, {"person": "mallory"})
    assert [(e.action, e.outcome, e.tenant_id) for e in page.context["entries"]] == [("auth.login", "failed", None)]
    # a prefix covers the platform's own chain (sign-ins belong to no hospital) and every hospital's
    prefixed = client.get(PAGE, {"action": "auth."})
    assert {(e.action, e.tenant_id) for e in prefixed.context["entries"]} == {
        ("auth.login", None),
        ("auth.token", hospital_a.pk),
    }


def test_a_hospitals_auditor_cannot_widen_the_scope_with_the_hospital_filter(client, auditor_a, hospital_b):
    log(hospital_b, username="b-scope-marker")
    client.force_login(auditor_a.user)
    page = client.get(PAGE, {"hospital": hospital_b.slug})
    assert page.status_code == 200 and b"b-scope-marker" not in page.content
    assert {e.tenant_id for e in page.context["entries"]} == {auditor_a.tenant_id}


def test_a_platform_auditor_starts_on_the_access_log_and_sees_it_in_the_menu(client, platform_auditor):
    client.force_login(platform_auditor)
    response = client.get("/")
    assert response.status_code == 302 and response["Location"] == "/hospital/access-log/"
    page = client.get("/hospital/access-log/").content.decode()
    menu = page[page.index("<nav>") : page.index("</nav>")]
    assert 'href="/hospital/access-log/"' in menu
