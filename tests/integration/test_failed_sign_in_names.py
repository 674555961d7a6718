"""A failed sign-in keeps the keyed hash of the username tried, never the text: in the access
log and in django-axes' records (AccessAttempt, AccessFailureLog, and the POST data axes copies).
The text may be a password typed into the wrong field. The auditor's person filter hashes what it
is given, under every key of the pseudonym ring, so it still finds them.
"""

from __future__ import annotations

import pytest
from axes.models import AccessAttempt, AccessFailureLog
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import AccessEvent
from accounts.signals import username_tried
from tests.conftest import PASSWORD
from tests.integration.test_audit_view import platform_auditor  # noqa: F401 (fixture)

pytestmark = pytest.mark.django_db

TYPED = "Tr0ub4dor&3-typed-in-the-wrong-field"
KEY_A = "pseudonym-key-A-" + "a" * 40
KEY_B = "pseudonym-key-B-" + "b" * 40


def every_stored_text() -> str:
    """Every field of every access-log entry and every axes row, as one text."""
    rows = [*AccessEvent.objects.all(), *AccessAttempt.objects.all(), *AccessFailureLog.objects.all()]
    return "\n".join(str(value) for row in rows for value in row.__dict__.values())


def test_a_failed_sign_in_keeps_only_the_keyed_hash_of_the_name_typed(client, settings):
    settings.AXES_ENABLE_ACCESS_FAILURE_LOG = True
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(3):  # the third locks out: the lockout entry too
        client.post(reverse("login"), {"username": TYPED, "password": "wrong"})
    APIClient().post("/api/v1/auth/token/", {"username": TYPED, "password": "wrong"}, format="json")
    hashed = username_tried(TYPED)
    assert hashed.startswith("U-") and len(hashed.split("-")[-1]) == 32
    failed = AccessEvent.objects.filter(action="auth.login", outcome="failed")
    assert failed.count() >= 3 and set(failed.values_list("actor_label", flat=True)) == {hashed}
    assert AccessEvent.objects.filter(action="auth.lockout", actor_label=hashed).exists()
    assert set(AccessAttempt.objects.values_list("username", flat=True)) == {hashed}
    assert set(AccessFailureLog.objects.values_list("username", flat=True)) == {hashed}
    stored = every_stored_text()
    assert TYPED not in stored and "Tr0ub4dor" not in stored


def test_lockout_and_its_reset_on_success_still_follow_the_account(client, clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        client.post(reverse("login"), {"username": "clinician", "password": "wrong-password"})
    assert AccessAttempt.objects.get(username=username_tried("clinician")).failures_since_start == 2
    assert client.post(reverse("login"), {"username": "clinician", "password": PASSWORD}).status_code == 302
    assert not AccessAttempt.objects.exists()  # reset: success hashes the account's name the same way
    client.post("/accounts/logout/")
    for _ in range(3):
        client.post(reverse("login"), {"username": "clinician", "password": "wrong-password"})
    assert client.post(reverse("login"), {"username": "clinician", "password": PASSWORD}).status_code == 429


def test_the_auditors_person_filter_hashes_what_it_is_given_under_every_key_of_the_ring(
    client,
    settings,
    platform_auditor,  # noqa: F811
):
    settings.SIGHTLINE_PSEUDONYM_KEY = KEY_A
    client.post(reverse("login"), {"username": "mallory", "password": "wrong"})
    settings.SIGHTLINE_PSEUDONYM_KEY, settings.SIGHTLINE_PSEUDONYM_KEY_FALLBACKS = KEY_B, [KEY_A]
    client.post(reverse("login"), {"username": "mallory", "password": "wrong"})
    client.post(reverse("login"), {"username": "someone-else", "password": "wrong"})
    client.force_login(platform_auditor)
    page = client.post(reverse("access-log"), {"person": "mallory"})
    assert page.status_code == 200
    assert [(e.action, e.outcome) for e in page.context["entries"]] == [("auth.login", "failed")] * 2
    assert b"mallory" not in page.content.replace(b'value="mallory"', b"")  # only in the filter's own field
