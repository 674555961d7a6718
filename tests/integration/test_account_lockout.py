"""The per-account sign-in limit across addresses: rotating addresses no longer buys unlimited
guesses, the person and their hospital's admins are told, and the places where the person
signed in before stay open (the per-address lock still applies there)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from accounts.models import AccessEvent, AccountSignInLimit, KnownSignInAddress, Role
from tests.conftest import PASSWORD, member
from tests.integration.test_second_factor import code_at, wrong_code

pytestmark = pytest.mark.django_db

TOKEN_URL = "/api/v1/auth/token/"
LOGIN_URL = "/accounts/login/"
HOME = "10.1.0.1"  # where the clinician signed in before


def address(n: int) -> str:
    return f"198.51.100.{n}"


def token_sign_in(username, password, ip, **body):
    return APIClient().post(
        TOKEN_URL, {"username": username, "password": password, **body}, format="json", REMOTE_ADDR=ip
    )


def page_sign_in(username, password, ip):
    return Client().post(LOGIN_URL, {"username": username, "password": password}, REMOTE_ADDR=ip)


def token_ok(response) -> bool:
    return response.status_code == 200 and "access" in response.json()


def page_ok(response) -> bool:
    return response.status_code == 302 and not response["Location"].startswith(LOGIN_URL)


WAYS = [(token_sign_in, token_ok), (page_sign_in, page_ok)]
WAY_IDS = ["token-endpoint", "login-page"]


@pytest.fixture(autouse=True)
def small_limits(settings):
    settings.AXES_FAILURE_LIMIT = 3  # per username and address
    settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT = 4  # per account, across addresses
    settings.OTP_TOTP_THROTTLE_FACTOR = 0


@pytest.fixture
def clinician(hospital_a):
    membership = member(hospital_a, "clinician", Role.CLINICIAN)
    get_user_model().objects.filter(pk=membership.user_id).update(email="clinician@demo-general.example")
    assert token_ok(token_sign_in("clinician", PASSWORD, HOME))  # a place they signed in from
    return membership


@pytest.fixture
def admins(hospital_a, hospital_b):
    first = member(hospital_a, "hospital-admin", Role.TENANT_ADMIN)
    second = member(hospital_a, "second-admin", Role.TENANT_ADMIN)
    elsewhere = member(hospital_b, "admin-b", Role.TENANT_ADMIN)
    for m, email in ((first, "admin@a.example"), (second, "second@a.example"), (elsewhere, "admin@b.example")):
        get_user_model().objects.filter(pk=m.user_id).update(email=email)
    return first, second, elsewhere


def rotate(sign_in, username, count, start=1):
    """One wrong password from each of ``count`` fresh addresses: never the per-address limit."""
    return [sign_in(username, "wrong-password", address(start + n)).status_code for n in range(count)]


@pytest.mark.parametrize(("sign_in", "ok"), WAYS, ids=WAY_IDS)
def test_guesses_from_rotating_addresses_pause_the_account_but_not_where_the_person_signed_in_before(
    clinician, settings, sign_in, ok
):
    answers = rotate(sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT)
    assert answers[-1] == 429 and 429 not in answers[:-1], answers
    locked = sign_in("clinician", PASSWORD, address(99))  # the right password, another new address
    assert locked.status_code == 429
    assert b"paused" in locked.content
    assert ok(sign_in("clinician", PASSWORD, HOME))  # the person is not kept out
    event = AccessEvent.objects.get(action="auth.account_lockout")
    assert event.outcome == "denied" and event.tenant == clinician.tenant
    assert event.target_type == "user" and event.target_id == str(clinician.user_id)


def test_fewer_guesses_than_the_account_limit_are_plain_failures(clinician, settings):
    """The control for the lock above: below the limit nothing is paused."""
    answers = rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT - 1)
    assert answers == [401] * (settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT - 1)
    assert token_ok(token_sign_in("clinician", PASSWORD, address(98)))


def test_the_person_and_the_hospitals_admins_are_told_once(
    clinician, admins, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT)
    recipients = sorted(tuple(message.to) for message in mail.outbox)
    assert recipients == [("admin@a.example", "second@a.example"), ("clinician@demo-general.example",)]
    to_person = next(m for m in mail.outbox if m.to == ["clinician@demo-general.example"])
    assert "paused" in to_person.body and "signed in before" in to_person.body
    assert "wrong-password" not in "".join(m.body for m in mail.outbox)
    # after the cool-off another round pauses it again, logged, but no second e-mail within the hour
    AccountSignInLimit.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT, start=50)
    assert len(mail.outbox) == 2
    assert AccessEvent.objects.filter(action="auth.account_lockout").count() == 2


def test_the_per_address_lock_still_holds_at_a_known_address(clinician, settings):
    answers = [token_sign_in("clinician", "wrong-password", HOME).status_code for _ in range(3)]
    assert answers == [401, 401, 429]
    assert token_sign_in("clinician", PASSWORD, HOME).status_code == 429
    assert not AccountSignInLimit.objects.filter(failures__gt=0).exists()  # known address: not counted per account


def test_the_account_opens_again_after_its_short_cool_off(clinician, settings):
    assert timedelta(minutes=15) >= settings.SIGHTLINE_ACCOUNT_COOLOFF
    rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT)
    assert token_sign_in("clinician", PASSWORD, address(90)).status_code == 429
    AccountSignInLimit.objects.update(locked_until=timezone.now() + timedelta(seconds=30))
    assert token_sign_in("clinician", PASSWORD, address(90)).status_code == 429  # still inside it
    AccountSignInLimit.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
    assert token_ok(token_sign_in("clinician", PASSWORD, address(90)))


def test_attempts_refused_while_paused_do_not_extend_the_pause(clinician, settings):
    rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT)
    until = AccountSignInLimit.objects.get().locked_until
    rotate(token_sign_in, "clinician", 5, start=40)
    assert AccountSignInLimit.objects.get().locked_until == until


def test_a_name_that_is_no_account_is_paused_exactly_like_one_that_is(
    clinician, settings, django_capture_on_commit_callbacks
):
    limit = settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT
    with django_capture_on_commit_callbacks(execute=True):
        real = rotate(token_sign_in, "clinician", limit)
        unknown = rotate(token_sign_in, "nobody-here", limit, start=20)
    assert real == unknown
    assert (
        token_sign_in("nobody-here", "anything", address(97)).json()
        == token_sign_in("clinician", PASSWORD, address(96)).json()
    )
    (row,) = AccountSignInLimit.objects.filter(user__isnull=True)
    assert "nobody" not in row.subject  # a keyed hash, not the name
    assert len(mail.outbox) == 1  # only the real person


def test_wrong_second_factor_codes_from_rotating_addresses_count_too(clinician, settings):
    device = TOTPDevice.objects.create(user=clinician.user, name="Authenticator", confirmed=True)
    limit = settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT
    answers = [
        token_sign_in("clinician", PASSWORD, address(n), otp=wrong_code(device)).status_code for n in range(limit)
    ]
    assert answers[-1] == 429 and 429 not in answers[:-1], answers
    assert token_sign_in("clinician", PASSWORD, address(70), otp=code_at(device)).status_code == 429
    assert token_ok(token_sign_in("clinician", PASSWORD, HOME, otp=code_at(device)))


def test_the_code_page_refuses_a_paused_account(clinician, settings):
    device = TOTPDevice.objects.create(user=clinician.user, name="Authenticator", confirmed=True)
    browser = Client()
    first = browser.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}, REMOTE_ADDR=address(80))
    assert "/two-factor/verify/" in first["Location"]
    rotate(token_sign_in, "clinician", settings.SIGHTLINE_ACCOUNT_FAILURE_LIMIT)  # meanwhile, elsewhere
    refused = browser.post(first["Location"], {"code": code_at(device)}, REMOTE_ADDR=address(80))
    assert refused.status_code == 429 and "_auth_user_id" not in browser.session


def test_a_completed_sign_in_records_its_address_and_a_password_alone_does_not(clinician):
    TOTPDevice.objects.create(user=clinician.user, name="Authenticator", confirmed=True)
    Client().post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}, REMOTE_ADDR=address(60))
    addresses = set(KnownSignInAddress.objects.filter(user=clinician.user).values_list("ip_address", flat=True))
    assert addresses == {HOME}


def test_old_counts_are_cleared_so_sprayed_names_do_not_pile_up(clinician, settings):
    rotate(token_sign_in, "sprayed-name-1", 1)
    AccountSignInLimit.objects.update(window_started=timezone.now() - timedelta(days=1))
    rotate(token_sign_in, "sprayed-name-2", 1, start=10)
    assert AccountSignInLimit.objects.count() == 1
