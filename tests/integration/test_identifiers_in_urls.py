"""No patient or person identifier in a URL, a Location, a link or a cursor.

Cursors come from one codec (core.cursor): encrypted, so the bytes of a cursor taken after a
row sorted by patient or accession do not hold the value; anything tampered is a 400 in words.
Identifier filters (the worklist's patient/accession search, the access log's person and patient
filters) travel in POST bodies, their next pages and CSV export too; a GET naming one is a 400.
"""

from __future__ import annotations

import base64
import csv
import html
import importlib
import io
import re
from contextlib import contextmanager

import pytest
from django.urls import reverse

from accounts.models import AccessEvent
from core.cursor import cursor_decode, cursor_encode
from core.errors import Invalid
from tests.conftest import api_client_for, png_bytes
from tests.integration.test_audit_view import auditor_a, log, patient_record  # noqa: F401 (fixture)
from tests.integration.test_workspace import post_file

pytestmark = pytest.mark.django_db

PATIENT = "PAT-SECRET-4711"
ACCESSIONS = [f"ACC-SECRET-{i}" for i in range(5)]
ACCESS_LOG = reverse("access-log")
ACCESS_LOG_CSV = reverse("access-log-csv")
ACCESS_LOG_API = reverse("api-access-log")
ACCESS_LOG_SEARCH = reverse("api-access-log-search")


def cursor_bytes(cursor: str) -> bytes:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))


def assert_carries_none(response, *identifiers: str) -> None:
    """No identifier in the response's Location, in any URL of its page (href, action, src), or
    in any cursor it hands out (as text and as decoded bytes)."""
    texts = [response.get("Location", "")]
    body = response.content.decode() if not response.streaming else ""
    texts += [html.unescape(url) for url in re.findall(r'(?:href|action|src)="([^"]*)"', body)]
    cursors = re.findall(r'name="cursor" value="([^"]*)"', body)
    if response.get("Content-Type", "").startswith("application/json"):
        data = response.json()
        for key in ("next", "previous"):
            if data.get(key):
                texts.append(data[key])
                cursors += re.findall(r"cursor=([^&]+)", data[key])
        if data.get("next_cursor"):
            cursors.append(data["next_cursor"])
    texts += [cursor for cursor in cursors]
    for identifier in identifiers:
        for text in texts:
            assert identifier not in text, (identifier, text)
        for cursor in cursors:
            raw = cursor_bytes(cursor)
            assert identifier.encode() not in raw and identifier.encode().hex().encode() not in raw, cursor


def worklist(clinician):
    """Five studies of one patient (the PNG API takes the pseudonym as given) and one of another."""
    client = api_client_for(clinician)
    for i, accession in enumerate(ACCESSIONS):
        response = post_file(
            client, png_bytes(seed=i, size=64), name="x.png", patient_id=PATIENT, accession_number=accession
        )
        assert response.status_code == 201, response.json()
    post_file(client, png_bytes(seed=9, size=64), name="x.png", patient_id="PAT-OTHER", accession_number="ACC-OTHER")
    return client


# --- the codec --------------------------------------------------------------------------


def test_a_cursor_is_sealed_and_bound_to_its_purpose():
    cursor = cursor_encode(["P-7A3F-ABCDEF", 42], purpose="worklist:patient")
    assert b"ABCDEF" not in cursor_bytes(cursor) and "ABCDEF" not in cursor
    assert cursor_decode(cursor, purpose="worklist:patient") == ["P-7A3F-ABCDEF", 42]
    assert cursor != cursor_encode(["P-7A3F-ABCDEF", 42], purpose="worklist:patient")  # a fresh nonce each time
    raw = bytearray(cursor_bytes(cursor))
    raw[-1] ^= 1
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad, purpose in [
        (tampered, "worklist:patient"),
        (cursor, "worklist:accession"),  # another list's cursor
        (cursor, "access-log"),
        ("not-a-cursor", "worklist:patient"),
        (base64.urlsafe_b64encode(b'["P-1",1]').decode(), "worklist:patient"),  # the old, readable kind
        ("A" * 5000, "worklist:patient"),
        ("", "worklist:patient"),
    ]:
        with pytest.raises(Invalid, match="start from the first page") as refused:
            cursor_decode(bad, purpose=purpose)
        assert refused.value.status == 400 and refused.value.code == "bad_cursor"


def test_a_cursor_made_before_the_site_secret_rotated_still_opens_while_the_old_secret_is_a_fallback(settings):
    old = settings.SECRET_KEY
    cursor = cursor_encode([1, 2], purpose="access-log")
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-site-secret-" + "n" * 40, [old]
    assert cursor_decode(cursor, purpose="access-log") == [1, 2]
    settings.SECRET_KEY_FALLBACKS = []
    with pytest.raises(Invalid):
        cursor_decode(cursor, purpose="access-log")


# --- the worklist -----------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["patient", "accession"])
def test_worklist_cursors_sorted_by_patient_or_accession_hold_neither(clinician_a, demo_model, sort):
    client = worklist(clinician_a)
    seen, cursor = [], ""
    while True:
        response = client.get("/api/v1/studies/", {"sort": sort, "page_size": 1, "cursor": cursor})
        assert response.status_code == 200, response.json()
        assert_carries_none(response, PATIENT, "PAT-OTHER", *ACCESSIONS, "ACC-OTHER")
        seen += [row["accession_number"] for row in response.json()["results"]]
        cursor = response.json()["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == sorted([*ACCESSIONS, "ACC-OTHER"]) and len(seen) == 6


def test_the_worklist_api_pages_a_patient_search_in_the_body_and_refuses_identifiers_in_the_url(
    clinician_a, demo_model
):
    client = worklist(clinician_a)
    seen, cursor = [], ""
    while True:
        body = {"q": PATIENT, "sort": "patient", "page_size": 2, "cursor": cursor}
        response = client.post("/api/v1/studies/search/", body, format="json")
        assert response.status_code == 200, response.json()
        assert_carries_none(response, PATIENT, *ACCESSIONS)
        seen += [row["accession_number"] for row in response.json()["results"]]
        cursor = response.json()["next_cursor"]
        if not cursor:
            break
    assert sorted(seen) == ACCESSIONS
    for query in ({"q": PATIENT}, {"patient_id": PATIENT}, {"accession_number": ACCESSIONS[0]}):
        refused = client.get("/api/v1/studies/", query)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "identifier_in_url" and "POST" in error["message"]
    assert client.get("/api/v1/studies/", {"cursor": "garbage"}).json()["error"]["code"] == "bad_cursor"


def test_the_worklist_page_pages_a_patient_search_by_post_and_no_url_names_the_patient(
    client, clinician_a, demo_model, monkeypatch
):
    worklist(clinician_a)
    client.force_login(clinician_a.user)
    with page_size(monkeypatch, "recognition.selectors.study_worklist", 2):
        response = client.post("/worklist/", {"q": PATIENT})
        seen = []
        while True:
            assert response.status_code == 200
            assert_carries_none(response, PATIENT, *ACCESSIONS)
            seen += [study.accession_number for study in response.context["studies"]]
            fields = dict(response.context["next_fields"])
            if not fields:
                break
            assert fields["q"] == PATIENT and 'name="q"' in response.content.decode()  # in the form body
            response = client.post("/worklist/", fields)
        assert sorted(seen) == ACCESSIONS
        by_patient = client.get("/worklist/", {"sort": "patient"})
        assert_carries_none(by_patient, PATIENT, "PAT-OTHER", *ACCESSIONS)
        assert "cursor=" in by_patient.context["next_query"]
    refused = client.get("/worklist/", {"q": PATIENT})
    assert refused.status_code == 400 and b"POST" in refused.content
    assert client.get("/worklist/", {"cursor": "garbage"}).status_code == 400


def test_drf_cursor_pages_are_sealed_and_a_bad_one_is_a_400(clinician_a, demo_model):
    client = worklist(clinician_a)
    ids, url = [], "/api/v1/images/?page_size=2"
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.json()
        assert_carries_none(response, PATIENT, *ACCESSIONS)
        ids += [row["id"] for row in response.json()["results"]]
        url = response.json()["next"]
        if url:
            raw = cursor_bytes(re.search(r"cursor=([^&]+)", url).group(1))
            assert b"p=" not in raw and b"r=" not in raw  # not DRF's readable "o=&r=&p=<time>"
    assert len(ids) == len(set(ids)) == 6
    bad = client.get("/api/v1/images/", {"cursor": "garbage"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_cursor"


# --- the access log ---------------------------------------------------------------------


def about_patient(hospital, author, count: int) -> list[AccessEvent]:
    """Entries by ``author`` about the patient's study and images, and some that are not."""
    study, made = patient_record(hospital, PATIENT, author, images=count)
    entries = [log(hospital, "study.view", target=study, user=author)]
    entries += [log(hospital, target=image, user=author) for image, _ in made]
    log(hospital, "image.view", username="noise")
    by_someone_else = log(hospital, "study.view", target=study, username="someone-else")
    return entries, by_someone_else


@contextmanager
def page_size(monkeypatch, function: str, size: int):
    """Pages of ``size`` rows for a selector the page calls with its default page size."""
    module, name = function.rsplit(".", 1)
    target = getattr(importlib.import_module(module), name)
    with monkeypatch.context() as patch:
        patch.setattr(target, "__kwdefaults__", {**target.__kwdefaults__, "limit": size})
        yield


def test_the_access_log_api_pages_a_patient_filter_in_the_body(auditor_a, clinician_a, hospital_a):  # noqa: F811
    by_clinician, by_someone_else = about_patient(hospital_a, clinician_a.user, 6)
    expected = [*by_clinician, by_someone_else]
    client = api_client_for(auditor_a)
    seen, cursor = [], ""
    while True:
        response = client.post(ACCESS_LOG_SEARCH, {"patient": PATIENT, "page_size": 2, "cursor": cursor}, format="json")
        assert response.status_code == 200, response.json()
        assert_carries_none(response, PATIENT)
        seen += [row["id"] for row in response.json()["results"]]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(entry.pk for entry in expected)
    for query in ({"patient": PATIENT}, {"person": "clinician"}):
        refused = client.get(ACCESS_LOG_API, query)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "identifier_in_url"
        assert "POST" in refused.json()["error"]["message"]
    tampered = client.post(ACCESS_LOG_SEARCH, {"patient": PATIENT, "cursor": "x" + cursor_encode([1], purpose="a")})
    assert tampered.status_code == 400 and tampered.json()["error"]["code"] == "bad_cursor"


def test_the_access_log_page_pages_and_exports_a_patient_filter_without_a_url_naming_them(
    client,
    auditor_a,  # noqa: F811
    clinician_a,
    hospital_a,
    monkeypatch,
):
    expected, _ = about_patient(hospital_a, clinician_a.user, 5)  # the filter names the clinician too
    client.force_login(auditor_a.user)
    with page_size(monkeypatch, "audit.selectors.access_log_list", 2):
        response = client.post(ACCESS_LOG, {"patient": PATIENT, "person": "clinician"})
        seen = []
        while True:
            assert response.status_code == 200
            assert_carries_none(response, PATIENT, "clinician")
            seen += [entry.pk for entry in response.context["entries"]]
            fields = dict(response.context["next_fields"])
            if not fields:
                break
            assert fields["patient"] == PATIENT and dict(response.context["csv_fields"])["patient"] == PATIENT
            response = client.post(ACCESS_LOG, fields)
    assert sorted(seen) == sorted(entry.pk for entry in expected)

    export = client.post(ACCESS_LOG_CSV, dict(response.context["csv_fields"]))
    assert export.status_code == 200 and export.streaming
    rows = list(csv.reader(io.StringIO(b"".join(export.streaming_content).decode())))
    assert sorted(int(row[0]) for row in rows[1:]) == sorted(entry.pk for entry in expected)
    assert client.get(ACCESS_LOG_CSV, {"patient": PATIENT}).status_code == 400
    assert client.get(ACCESS_LOG, {"person": "clinician"}).status_code == 400
    assert client.post(ACCESS_LOG, {"patient": PATIENT, "cursor": "garbage"}).status_code == 400
