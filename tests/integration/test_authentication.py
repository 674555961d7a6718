"""Authentication against the real database: JWT forgeries, revocation, lockout, session
lifetimes, invitations and password rules, TOTP for hospital admins, production settings."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import timedelta

import jwt
import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from accounts.models import AccessEvent, Invitation, Membership, Role
from accounts.services import (
    invitation_create,
    membership_deactivate,
    membership_grant,
    user_deactivate,
    user_get_or_create,
)
from accounts.signals import username_tried
from accounts.two_factor import enrolment_code_issue_by_staff
from tests.conftest import PASSWORD, PRODUCTION_SECRET, member, production_env

pytestmark = pytest.mark.django_db

TOKEN_URL = "/api/v1/auth/token/"
REFRESH_URL = "/api/v1/auth/token/refresh/"
IMAGES_URL = "/api/v1/images/"
MEMBERS_URL = "/api/v1/members/"
LOGIN_URL = "/accounts/login/"
GOOD_NEW_PASSWORD = "violet-lantern-orbit-42"


def images_page() -> str:
    return reverse("recognition:image-list")


# --- personas and helpers ---------------------------------------------------------------


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "hospital-admin", Role.TENANT_ADMIN)


@pytest.fixture
def two_factor_hospital(hospital_a):
    hospital_a.require_admin_two_factor = True
    hospital_a.save(update_fields=["require_admin_two_factor"])
    return hospital_a


def obtain(username, password, client=None, **extra):
    return (client or APIClient()).post(TOKEN_URL, {"username": username, "password": password}, format="json", **extra)


def bearer(token, **headers) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", **headers)
    return client


def assert_error_shape(response, status, code=None):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_of(token) -> dict:
    return jwt.decode(str(token), options={"verify_signature": False})


def signed(claims: dict, settings, key: str | None = None) -> str:
    """A token signed exactly as the server signs, with claims of the test's choosing."""
    return jwt.encode(claims, key or settings.SECRET_KEY, algorithm="HS256")


def current_code(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time()
    return f"{totp.token():0{device.digits}d}"


def wrong_code(device: TOTPDevice) -> str:
    """A code that is not valid at any step the device tolerates now."""
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    now = time.time()
    valid = set()
    for offset in range(-device.tolerance - 1, device.tolerance + 2):
        totp.time = now + offset * device.step
        valid.add(totp.token())
    return next(f"{n:06d}" for n in range(123456, 10**6) if n not in valid)


# --- 1. JWT: forged, expired and misused tokens -----------------------------------------


def test_a_freshly_issued_access_token_reads_the_image_list(clinician_a):
    """The control for the forgeries below: a genuine token built the same way works."""
    response = bearer(AccessToken.for_user(clinician_a.user)).get(IMAGES_URL)
    assert response.status_code == 200, response.content


def test_a_token_re_signed_with_the_server_key_and_unchanged_claims_still_works(clinician_a, settings):
    """The control for the audience and issuer tests: only the changed claim makes them fail."""
    claims = claims_of(AccessToken.for_user(clinician_a.user))
    assert claims["aud"] == "sightline-api" and claims["iss"] == "sightline"
    assert bearer(signed(claims, settings)).get(IMAGES_URL).status_code == 200


def test_an_expired_access_token_is_401(clinician_a):
    token = AccessToken.for_user(clinician_a.user)
    token.set_exp(lifetime=-timedelta(seconds=30))
    assert_error_shape(bearer(token).get(IMAGES_URL), 401)


def test_a_token_whose_payload_was_changed_but_signature_kept_is_401(clinician_a, clinician_b):
    header, payload, signature = str(AccessToken.for_user(clinician_a.user)).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["user_id"] = str(clinician_b.user.pk)  # try to become someone else
    forged = ".".join([header, b64url_json(claims), signature])
    response = bearer(forged).get(IMAGES_URL)
    assert_error_shape(response, 401)
    assert not AccessEvent.objects.filter(actor=clinician_b.user, outcome="success").exists()


def test_an_unsigned_alg_none_token_is_401(clinician_a):
    claims = claims_of(AccessToken.for_user(clinician_a.user))
    unsigned = f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims)}."
    assert_error_shape(bearer(unsigned).get(IMAGES_URL), 401)


def test_a_token_signed_with_another_key_is_401(clinician_a, settings):
    claims = claims_of(AccessToken.for_user(clinician_a.user))
    forged = signed(claims, settings, key="not-the-server-key-" + "x" * 40)
    assert_error_shape(bearer(forged).get(IMAGES_URL), 401)


def test_a_refresh_token_is_not_accepted_as_an_access_token(clinician_a):
    refresh = RefreshToken.for_user(clinician_a.user)
    assert_error_shape(bearer(refresh).get(IMAGES_URL), 401)


@pytest.mark.parametrize(
    ("claim", "value"),
    [("aud", "another-api"), ("iss", "someone-else"), ("aud", None), ("iss", None)],
    ids=["wrong-audience", "wrong-issuer", "no-audience", "no-issuer"],
)
def test_a_token_for_another_audience_or_issuer_is_401(clinician_a, settings, claim, value):
    claims = claims_of(AccessToken.for_user(clinician_a.user))
    if value is None:
        del claims[claim]
    else:
        claims[claim] = value
    assert_error_shape(bearer(signed(claims, settings)).get(IMAGES_URL), 401)


def test_an_invalid_token_error_has_a_readable_message_and_a_specific_code(clinician_a):
    token = AccessToken.for_user(clinician_a.user)
    token.set_exp(lifetime=-timedelta(seconds=30))
    error = assert_error_shape(bearer(token).get(IMAGES_URL), 401)
    assert error["code"] == "token_not_valid"
    assert "ErrorDetail" not in error["message"]  # not a Python repr of DRF internals


# --- 2. Revocation: users, memberships, refresh rotation ---------------------------------


def test_a_deactivated_user_can_use_neither_the_old_access_token_nor_the_refresh_token(clinician_a):
    tokens = obtain("clinician", PASSWORD).json()
    assert bearer(tokens["access"]).get(IMAGES_URL).status_code == 200

    user_deactivate(user=clinician_a.user)

    assert_error_shape(bearer(tokens["access"]).get(IMAGES_URL), 401)
    assert_error_shape(APIClient().post(REFRESH_URL, {"refresh": tokens["refresh"]}, format="json"), 401)
    assert_error_shape(obtain("clinician", PASSWORD), 401)
    assert AccessEvent.objects.filter(action="user.deactivate", target_id=str(clinician_a.user.pk)).count() == 1


def test_a_deactivated_users_browser_session_ends(client, clinician_a):
    client.force_login(clinician_a.user)
    assert client.get(images_page()).status_code == 200
    user_deactivate(user=clinician_a.user)
    response = client.get(images_page())
    assert response.status_code == 302 and response["Location"].startswith(LOGIN_URL)


def test_a_deactivated_membership_closes_that_hospital_but_not_the_other(admin_a, hospital_b):
    user = user_get_or_create(username="travelling-clinician", password=PASSWORD)
    in_a = membership_grant(tenant=admin_a.tenant, user=user, role=Role.CLINICIAN)
    membership_grant(tenant=hospital_b, user=user, role=Role.CLINICIAN)
    access = obtain("travelling-clinician", PASSWORD).json()["access"]
    a, b = bearer(access, HTTP_X_TENANT="demo-general"), bearer(access, HTTP_X_TENANT="demo-childrens")
    assert a.get(IMAGES_URL).status_code == 200 and b.get(IMAGES_URL).status_code == 200

    membership_deactivate(actor=admin_a, membership=in_a)

    assert_error_shape(a.get(IMAGES_URL), 404, "not_found")
    assert b.get(IMAGES_URL).status_code == 200
    # without a header the one remaining hospital is the one the token works in
    assert bearer(access).get(IMAGES_URL).status_code == 200
    assert AccessEvent.objects.filter(action="membership.deactivate", target_id=str(in_a.pk)).count() == 1
    assert AccessEvent.objects.filter(action="tenant.select", outcome="denied", actor=user).count() == 1


def test_a_deactivated_only_membership_leaves_the_token_with_no_hospital(admin_a, clinician_a):
    access = obtain("clinician", PASSWORD).json()["access"]
    membership_deactivate(actor=admin_a, membership=clinician_a)
    assert_error_shape(bearer(access).get(IMAGES_URL), 403, "forbidden")
    assert_error_shape(bearer(access, HTTP_X_TENANT="demo-general").get(IMAGES_URL), 404, "not_found")


def test_a_refresh_token_works_once_and_its_successor_keeps_working(clinician_a):
    client = APIClient()
    first = obtain("clinician", PASSWORD).json()["refresh"]
    second = client.post(REFRESH_URL, {"refresh": first}, format="json")
    assert second.status_code == 200
    assert_error_shape(client.post(REFRESH_URL, {"refresh": first}, format="json"), 401)
    third = client.post(REFRESH_URL, {"refresh": second.json()["refresh"]}, format="json")
    assert third.status_code == 200
    assert bearer(third.json()["access"]).get(IMAGES_URL).status_code == 200


def test_changing_the_password_revokes_existing_tokens(clinician_a):
    access = obtain("clinician", PASSWORD).json()["access"]
    user = clinician_a.user
    user.set_password(GOOD_NEW_PASSWORD)
    user.save()
    assert_error_shape(bearer(access).get(IMAGES_URL), 401)


# --- 3. Lockout -------------------------------------------------------------------------


def test_the_token_endpoint_locks_a_username_after_the_failure_limit_even_for_the_right_password(clinician_a, settings):
    limit = settings.AXES_FAILURE_LIMIT
    failures = [obtain("clinician", "wrong-password") for _ in range(limit)]
    assert [r.status_code for r in failures] == [401] * (limit - 1) + [429]
    locked = obtain("clinician", PASSWORD)
    error = assert_error_shape(locked, 429, "locked_out")
    assert "access" not in locked.json()
    assert "Try again later" in error["message"]
    assert AccessAttempt.objects.filter(username=username_tried("clinician")).exists()  # axes keeps the hash (ids)
    assert not AccessEvent.objects.filter(action="auth.token", actor=clinician_a.user).exists()


def test_an_unknown_username_fails_and_locks_exactly_like_a_wrong_password(clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    wrong = obtain("clinician", "wrong-password")
    unknown = obtain("nobody-here", "wrong-password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    obtain("nobody-here", "wrong-password")
    assert_error_shape(obtain("nobody-here", "wrong-password"), 429, "locked_out")
    assert_error_shape(obtain("nobody-here", "anything"), 429, "locked_out")
    typed = username_tried("nobody-here")  # the keyed hash of the name typed (ids)
    assert AccessEvent.objects.filter(action="auth.login", outcome="failed", actor_label=typed).exists()


def test_a_lockout_holds_one_username_from_one_address_only(clinician_a, viewer_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(3):
        obtain("clinician", "wrong-password")
    assert obtain("clinician", PASSWORD).status_code == 429
    assert obtain("viewer", PASSWORD).status_code == 200  # another username, same address
    assert obtain("clinician", PASSWORD, REMOTE_ADDR="10.20.30.40").status_code == 200  # same name, other address


def test_a_successful_page_sign_in_before_the_limit_resets_the_count(client, clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
    assert client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}).status_code == 302
    client.post("/accounts/logout/")
    for _ in range(2):
        assert client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"}).status_code == 200
    assert client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}).status_code == 302


def test_a_successful_token_grant_before_the_limit_resets_the_count_like_a_page_sign_in(clinician_a, settings):
    """AXES_RESET_ON_SUCCESS is on, and the settings promise the same lockout for the browser and the API."""
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        obtain("clinician", "wrong-password")
    assert obtain("clinician", PASSWORD).status_code == 200
    for _ in range(2):
        assert obtain("clinician", "wrong-password").status_code == 401
    assert obtain("clinician", PASSWORD).status_code == 200


def test_the_login_page_shows_the_lockout_page_after_the_failure_limit(client, clinician_a, settings):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        response = client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
        assert response.status_code == 200 and b"did not match" in response.content
    client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
    locked = client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD})
    assert locked.status_code == 429
    assert b"Sign-in paused" in locked.content and b"Try again later" in locked.content
    assert "_auth_user_id" not in client.session
    assert client.get(images_page()).status_code == 302


def test_the_login_page_and_the_token_endpoint_share_one_failure_count(client, clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
    client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
    obtain("clinician", "wrong-password")
    assert_error_shape(obtain("clinician", PASSWORD), 429, "locked_out")


# --- 4. The login page does not tell unknown users from wrong passwords -----------------


def test_an_unknown_user_and_a_wrong_password_get_the_same_login_page(client, clinician_a):
    wrong = client.post(LOGIN_URL, {"username": "clinician", "password": "wrong-password"})
    unknown = client.post(LOGIN_URL, {"username": "nobody-here", "password": "wrong-password"})
    inactive_user = user_get_or_create(username="gone", password=PASSWORD)
    get_user_model().objects.filter(pk=inactive_user.pk).update(is_active=False)
    inactive = client.post(LOGIN_URL, {"username": "gone", "password": PASSWORD})

    def message(response):
        text = response.content.decode()
        return [line.strip() for line in text.splitlines() if 'class="error"' in line]

    assert wrong.status_code == unknown.status_code == inactive.status_code == 200
    assert message(wrong) == message(unknown) == message(inactive) != []
    assert "_auth_user_id" not in client.session


# --- 5. Session lifetimes and logout ------------------------------------------------------


@pytest.fixture
def browser(client, clinician_a):
    client.force_login(clinician_a.user)
    assert client.get(images_page()).status_code == 200  # marks the session "started" and "seen"
    session = client.session
    assert {"started", "seen"} <= set(session.keys())
    return client


def assert_sent_to_login(response):
    assert response.status_code == 302 and response["Location"].startswith(LOGIN_URL), response


def test_a_fresh_session_keeps_working(browser):
    assert browser.get(images_page()).status_code == 200
    assert browser.get("/upload/").status_code == 200
    assert not AccessEvent.objects.filter(action="auth.session_expired").exists()


def test_an_idle_session_ends_and_the_end_is_logged(browser, clinician_a, settings):
    session = browser.session
    session["seen"] = time.time() - settings.SIGHTLINE_SESSION_IDLE_SECONDS - 60
    session.save()
    assert_sent_to_login(browser.get(images_page()))
    event = AccessEvent.objects.get(action="auth.session_expired")
    assert event.actor == clinician_a.user and event.outcome == "success"
    assert_sent_to_login(browser.get(images_page()))  # and it stays ended


def test_a_session_older_than_its_maximum_age_ends_even_when_active(browser, settings):
    session = browser.session
    session["started"] = time.time() - settings.SESSION_COOKIE_AGE - 60
    session["seen"] = time.time()
    session.save()
    assert_sent_to_login(browser.get(images_page()))
    assert AccessEvent.objects.filter(action="auth.session_expired").count() == 1


def test_an_idle_session_cannot_use_the_api_either(browser, settings):
    assert browser.get(IMAGES_URL).status_code == 200
    session = browser.session
    session["seen"] = time.time() - settings.SIGHTLINE_SESSION_IDLE_SECONDS - 60
    session.save()
    assert_error_shape(browser.get(IMAGES_URL), 401, "not_authenticated")
    assert AccessEvent.objects.filter(action="auth.session_expired").count() == 1


def test_a_session_idle_just_under_the_limit_keeps_working(browser, settings):
    session = browser.session
    session["seen"] = time.time() - settings.SIGHTLINE_SESSION_IDLE_SECONDS + 120
    session.save()
    assert browser.get(images_page()).status_code == 200
    assert browser.session["seen"] > time.time() - 60  # the visit counts as activity


def test_logging_out_ends_the_session(browser, clinician_a):
    response = browser.post("/accounts/logout/")
    assert_sent_to_login(response)
    assert_sent_to_login(browser.get(images_page()))
    assert AccessEvent.objects.filter(action="auth.logout", actor=clinician_a.user).count() == 1


def test_logging_out_needs_a_post(browser):
    assert browser.get("/accounts/logout/").status_code == 405
    assert browser.get(images_page()).status_code == 200


# --- 6. Invitations and password rules ----------------------------------------------------


@pytest.fixture
def invitation(admin_a):
    return invitation_create(actor=admin_a, email="new.person@example.org", role=Role.VIEWER)


def accept(client, raw, username="new-person", password=GOOD_NEW_PASSWORD, password2=None):
    return client.post(
        f"/invitations/{raw}/",
        {"username": username, "password1": password, "password2": password2 or password},
    )


@pytest.mark.parametrize(
    "weak",
    ["password", "short1!", "8402917365", "new-person-1"],
    ids=["common", "too-short", "only-digits", "like-the-username"],
)
def test_an_invitation_refuses_a_weak_password_and_creates_no_user(client, invitation, weak):
    _, raw = invitation
    assert client.get(f"/invitations/{raw}/").status_code == 200
    users_before = get_user_model().objects.count()
    response = accept(client, raw, password=weak)
    assert response.status_code == 200
    assert b'class="error"' in response.content
    assert get_user_model().objects.count() == users_before
    assert not get_user_model().objects.filter(username="new-person").exists()
    assert Invitation.objects.get(pk=invitation[0].pk).accepted_at is None
    assert "_auth_user_id" not in client.session


def test_an_invitation_refuses_mismatched_passwords(client, invitation):
    _, raw = invitation
    response = accept(client, raw, password=GOOD_NEW_PASSWORD, password2=GOOD_NEW_PASSWORD + "x")
    assert response.status_code == 200
    assert not get_user_model().objects.filter(username="new-person").exists()


def test_an_invitation_with_a_good_password_creates_the_member_and_signs_them_in(client, invitation, admin_a):
    invite, raw = invitation
    response = accept(client, raw)
    assert response.status_code == 302 and not response["Location"].startswith(LOGIN_URL)
    user = get_user_model().objects.get(username="new-person")
    assert user.check_password(GOOD_NEW_PASSWORD)
    membership = Membership.objects.get(user=user)
    assert membership.tenant == admin_a.tenant and membership.role == Role.VIEWER and membership.is_active
    assert client.session["_auth_user_id"] == str(user.pk)
    assert client.get(images_page()).status_code == 200
    invite.refresh_from_db()
    assert invite.accepted_by == user and invite.accepted_at is not None
    assert AccessEvent.objects.filter(action="invitation.accept", actor=user, target_id=str(invite.pk)).count() == 1


def test_an_invitation_link_works_once(client, invitation):
    _, raw = invitation
    accept(client, raw)
    other = type(client)()
    assert other.get(f"/invitations/{raw}/").status_code == 410
    again = accept(other, raw, username="second-person")
    assert again.status_code == 410
    assert not get_user_model().objects.filter(username="second-person").exists()
    assert client.get(f"/invitations/{raw}/").status_code == 410  # not even for the one who used it


def test_an_expired_invitation_is_410_and_creates_no_user(client, invitation):
    invite, raw = invitation
    Invitation.objects.filter(pk=invite.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    assert client.get(f"/invitations/{raw}/").status_code == 410
    assert accept(client, raw).status_code == 410
    assert not get_user_model().objects.filter(username="new-person").exists()


def test_an_unknown_invitation_token_is_410(client, invitation):
    assert client.get("/invitations/not-a-real-token/").status_code == 410


# --- 7. TOTP for hospital admins ------------------------------------------------------------


def test_an_admin_without_a_verified_second_factor_is_refused_when_the_hospital_requires_it(
    client, admin_a, two_factor_hospital
):
    client.force_login(admin_a.user)
    assert_error_shape(client.get(MEMBERS_URL), 403, "two_factor_required")
    page = client.get("/hospital/members/")
    assert page.status_code == 403
    assert b"one-time code" in page.content
    denied = AccessEvent.objects.filter(action="members.manage", outcome="denied", actor=admin_a.user)
    assert denied.count() == 2


def test_an_admin_works_without_a_second_factor_when_the_hospital_does_not_require_it(client, admin_a):
    client.force_login(admin_a.user)
    assert client.get(MEMBERS_URL).status_code == 200
    assert client.get("/hospital/members/").status_code == 200


def test_enrolling_a_second_factor_verifies_the_session_for_admin_pages(client, admin_a, two_factor_hospital):
    _, enrolment_code = enrolment_code_issue_by_staff(user=admin_a.user)  # an operator's (manage.py) code
    client.force_login(admin_a.user)
    setup = client.get("/accounts/two-factor/")
    assert setup.status_code == 200 and b"Enrolment code" in setup.content
    device = TOTPDevice.objects.get(user=admin_a.user)
    assert not device.confirmed
    assert client.get("/accounts/two-factor/").status_code == 200
    assert TOTPDevice.objects.filter(user=admin_a.user).count() == 1  # reloading does not make another

    response = client.post("/accounts/two-factor/", {"code": current_code(device), "enrolment_code": enrolment_code})
    assert response.status_code == 200 and b'id="recovery-codes"' in response.content
    assert response["Cache-Control"] == "no-store"
    device.refresh_from_db()
    assert device.confirmed
    assert client.get("/hospital/members/").status_code == 200
    assert client.get(MEMBERS_URL).status_code == 200
    assert AccessEvent.objects.filter(action="auth.two_factor_enrol", actor=admin_a.user).count() == 1


def test_enrolling_with_a_wrong_code_confirms_nothing(client, admin_a, two_factor_hospital):
    client.force_login(admin_a.user)
    client.get("/accounts/two-factor/")
    device = TOTPDevice.objects.get(user=admin_a.user)
    response = client.post("/accounts/two-factor/", {"code": wrong_code(device)})
    assert response.status_code == 200 and b"not valid" in response.content
    device.refresh_from_db()
    assert not device.confirmed
    assert client.get("/hospital/members/").status_code == 403


@pytest.fixture
def admin_with_device(admin_a, two_factor_hospital):
    device = TOTPDevice.objects.create(user=admin_a.user, name="Authenticator", confirmed=True)
    return admin_a, device


def sign_in_with_password(client, username="hospital-admin"):
    response = client.post(f"{LOGIN_URL}?next=/hospital/members/", {"username": username, "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/two-factor/verify/")
    return response["Location"]


def test_a_password_alone_does_not_sign_in_a_user_with_a_second_factor(client, admin_with_device):
    admin, _ = admin_with_device
    sign_in_with_password(client)
    assert "_auth_user_id" not in client.session
    assert_sent_to_login(client.get("/hospital/members/"))
    assert client.get(MEMBERS_URL).status_code in (401, 403)
    assert not AccessEvent.objects.filter(action="auth.login", outcome="success", actor=admin.user).exists()


def test_a_wrong_code_is_refused_and_logged(client, admin_with_device):
    admin, device = admin_with_device
    verify_url = sign_in_with_password(client)
    response = client.post(verify_url, {"code": wrong_code(device)})
    assert response.status_code == 200 and b"not valid" in response.content
    assert "_auth_user_id" not in client.session
    assert AccessEvent.objects.filter(action="auth.two_factor", outcome="failed", actor=admin.user).count() == 1


def test_a_valid_code_signs_in_with_a_verified_session(client, admin_with_device):
    admin, device = admin_with_device
    verify_url = sign_in_with_password(client)
    assert client.get(verify_url).status_code == 200
    response = client.post(verify_url, {"code": current_code(device)})
    assert response.status_code == 302 and response["Location"] == "/hospital/members/"
    assert client.session["_auth_user_id"] == str(admin.user.pk)
    assert client.get("/hospital/members/").status_code == 200
    assert AccessEvent.objects.filter(action="auth.login", outcome="success", actor=admin.user).count() == 1


def test_a_code_cannot_be_used_twice(client, admin_with_device):
    _, device = admin_with_device
    code = current_code(device)
    client.post(sign_in_with_password(client), {"code": code})
    assert "_auth_user_id" in client.session
    client.post("/accounts/logout/")

    other = type(client)()
    verify_url = sign_in_with_password(other)
    response = other.post(verify_url, {"code": code})
    assert response.status_code == 200 and b"not valid" in response.content
    assert "_auth_user_id" not in other.session


def test_the_code_page_without_a_password_first_sends_to_login(client, admin_with_device):
    _, device = admin_with_device
    response = client.post("/accounts/two-factor/verify/", {"code": current_code(device)})
    assert_sent_to_login(response)
    assert "_auth_user_id" not in client.session


def test_the_code_page_only_redirects_within_the_site(client, admin_with_device):
    _, device = admin_with_device
    sign_in_with_password(client)
    response = client.post(
        "/accounts/two-factor/verify/?next=https://evil.example.org/", {"code": current_code(device)}
    )
    assert response.status_code == 302
    assert not response["Location"].startswith(("http://", "https://", "//")), response["Location"]


# --- 8. Production settings ----------------------------------------------------------------

SECRET = PRODUCTION_SECRET


def deploy_check(settings, **overrides) -> subprocess.CompletedProcess:
    env = production_env(**{"DJANGO_SECRET_KEY": None, "ALLOWED_HOSTS": None, **overrides})
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_production_settings_pass_the_deploy_check_with_a_secret_and_hosts(settings):
    assert len(SECRET) >= 60
    result = deploy_check(settings, DJANGO_SECRET_KEY=SECRET, ALLOWED_HOSTS="sightline.example.org")
    assert result.returncode == 0, result.stdout + result.stderr


# what a deployment behind nginx sets (README, "Deploy"; platform/): TLS ends at the proxy, which
# sets X-Forwarded-Proto; PostgreSQL, Redis and S3 by URL; JSON logs. uvicorn, not Django, trusts
# the proxy's forwarded headers (--forwarded-allow-ips), so nothing of that is Django's to check.
BEHIND_THE_PROXY = {
    "DJANGO_SECRET_KEY": SECRET,
    "ALLOWED_HOSTS": "sightline.example.org",
    "CSRF_TRUSTED_ORIGINS": "https://sightline.example.org",
    "DATABASE_URL": "postgres://sightline@db.internal:5432/sightline",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "SIGHTLINE_S3_BUCKET": "sightline",
    "SIGHTLINE_S3_ENDPOINT_URL": "https://s3.internal",
    "SIGHTLINE_LOG_FORMAT": "json",
    "SIGHTLINE_MAX_REQUEST_BYTES": str(512 * 1024 * 1024),
    "DJANGO_STATIC_ROOT": "/srv/sightline/static",
}


def test_the_deploy_check_prints_no_warning_with_the_environment_behind_the_proxy(settings):
    result = deploy_check(settings, **BEHIND_THE_PROXY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"ALLOWED_HOSTS": "sightline.example.org"}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_SECRET_KEY": SECRET}, "ALLOWED_HOSTS"),
        ({"DJANGO_SECRET_KEY": SECRET, "ALLOWED_HOSTS": ""}, "ALLOWED_HOSTS"),
        ({"DJANGO_SECRET_KEY": "short", "ALLOWED_HOSTS": "sightline.example.org"}, "SECRET_KEY"),
    ],
    ids=["no-secret", "no-hosts", "empty-hosts", "weak-secret"],
)
def test_production_settings_refuse_a_missing_secret_or_hosts(settings, overrides, complaint):
    result = deploy_check(settings, **overrides)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
