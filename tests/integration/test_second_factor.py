"""The second factor everywhere a person signs in: the token endpoint asks for it like the sign-in
page, tokens say whether it was given (and keep saying so when refreshed), a hospital that
requires it for admins refuses admin API calls without it; a first enrolment needs an enrolment
code from another admin; recovery codes; resets; platform staff in production settings."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import time
from datetime import timedelta

import jwt
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient
from rest_framework_simplejwt.token_blacklist.models import BlacklistedToken, OutstandingToken

from accounts.models import AccessEvent, Membership, RecoveryCode, Role, TwoFactorEnrolmentCode
from accounts.two_factor import recovery_codes_replace
from accounts.ws_auth import _user_for_token
from tests.conftest import PASSWORD, member

pytestmark = pytest.mark.django_db

TOKEN_URL = "/api/v1/auth/token/"
REFRESH_URL = "/api/v1/auth/token/refresh/"
LOGIN_URL = "/accounts/login/"
SETUP_URL = "/accounts/two-factor/"
MEMBERS_PAGE = "/hospital/members/"


# --- helpers ----------------------------------------------------------------------------------


def code_at(device: TOTPDevice, steps: int = 0) -> str:
    """The device's code ``steps`` periods from now (tolerance 1 accepts the next one too)."""
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps * device.step
    return f"{totp.token():0{device.digits}d}"


def wrong_code(device: TOTPDevice) -> str:
    valid = {code_at(device, steps) for steps in range(-device.tolerance - 1, device.tolerance + 2)}
    return next(f"{n:06d}" for n in range(123456, 10**6) if f"{n:06d}" not in valid)


def obtain(username, password=PASSWORD, otp=None, **extra):
    body = {"username": username, "password": password}
    if otp is not None:
        body["otp"] = otp
    return APIClient().post(TOKEN_URL, body, format="json", **extra)


def bearer(token, **headers) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", **headers)
    return client


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def with_device(membership) -> TOTPDevice:
    return TOTPDevice.objects.create(user=membership.user, name="Authenticator", confirmed=True)


@pytest.fixture(autouse=True)
def _no_otp_throttle(settings):
    """django-otp slows a device down after each wrong code (1 s, 2 s, ...); the tests that
    follow a wrong code with a right one would otherwise depend on the clock."""
    settings.OTP_TOTP_THROTTLE_FACTOR = 0


@pytest.fixture
def strict_hospital(hospital_a):
    hospital_a.require_admin_two_factor = True
    hospital_a.save(update_fields=["require_admin_two_factor"])
    return hospital_a


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "hospital-admin", Role.TENANT_ADMIN)


@pytest.fixture
def second_admin(hospital_a):
    return member(hospital_a, "second-admin", Role.TENANT_ADMIN)


def verified_browser(client, membership, device=None):
    """Signs ``membership`` in on the page with password and code: a verified session."""
    device = device or TOTPDevice.objects.get(user=membership.user, confirmed=True)
    response = client.post(LOGIN_URL, {"username": membership.user.username, "password": PASSWORD})
    assert response.status_code == 302 and "/two-factor/verify/" in response["Location"]
    step = 0
    while True:  # a code used earlier in the test is refused, as it should be: take the next one
        answer = client.post(response["Location"], {"code": code_at(device, step)})
        if answer.status_code == 302:
            return client
        step += 1
        assert step <= 1, answer.content


# --- item 3: the token endpoint asks for the second factor -----------------------------------


def test_a_user_with_an_authenticator_gets_no_tokens_for_the_password_alone(clinician_a):
    with_device(clinician_a)
    error = assert_error(obtain("clinician"), 401, "otp_required")
    assert "otp" in error["message"]
    failed = AccessEvent.objects.filter(action="auth.two_factor", outcome="failed", actor=clinician_a.user)
    assert failed.count() == 1
    assert not AccessEvent.objects.filter(action="auth.token").exists()


def test_a_wrong_code_gets_no_tokens(clinician_a):
    device = with_device(clinician_a)
    response = obtain("clinician", otp=wrong_code(device))
    assert_error(response, 401, "otp_invalid")
    assert "access" not in response.json()


def test_a_valid_code_gets_tokens_that_say_a_second_factor_was_used_and_the_code_works_once(clinician_a):
    device = with_device(clinician_a)
    code = code_at(device)
    response = obtain("clinician", otp=code)
    assert response.status_code == 200, response.content
    tokens = response.json()
    assert claims(tokens["access"])["amr"] == ["pwd", "otp"]
    assert claims(tokens["refresh"])["amr"] == ["pwd", "otp"]
    assert bearer(tokens["access"]).get("/api/v1/images/").status_code == 200
    assert_error(obtain("clinician", otp=code), 401, "otp_invalid")  # the same code again


def test_a_user_without_an_authenticator_gets_password_only_tokens(clinician_a):
    tokens = obtain("clinician", otp="123456").json()
    assert claims(tokens["access"])["amr"] == ["pwd"]


def test_refreshing_keeps_the_second_factor_claim(clinician_a):
    device = with_device(clinician_a)
    refresh = obtain("clinician", otp=code_at(device)).json()["refresh"]
    for _ in range(2):  # and the rotated refresh token keeps it for the next refresh
        renewed = APIClient().post(REFRESH_URL, {"refresh": refresh}, format="json")
        assert renewed.status_code == 200, renewed.content
        assert claims(renewed.json()["access"])["amr"] == ["pwd", "otp"]
        refresh = renewed.json()["refresh"]


def test_missing_and_wrong_codes_count_towards_the_lockout(clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    device = with_device(clinician_a)
    answers = [obtain("clinician").status_code, obtain("clinician", otp=wrong_code(device)).status_code]
    answers.append(obtain("clinician", otp=wrong_code(device)).status_code)
    assert answers == [401, 401, 429]
    assert_error(obtain("clinician", otp=code_at(device)), 429, "locked_out")  # the right code too


def test_wrong_codes_on_the_code_page_count_towards_the_lockout_and_end_the_attempt(client, clinician_a, settings):
    settings.AXES_FAILURE_LIMIT = 3
    device = with_device(clinician_a)
    first = client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD})
    verify_url = first["Location"]
    answers = [client.post(verify_url, {"code": wrong_code(device)}).status_code for _ in range(3)]
    assert answers == [200, 200, 429]
    # the pending sign-in is gone: the right code on the same page does not sign in
    assert client.post(verify_url, {"code": code_at(device)}).status_code == 302
    assert "_auth_user_id" not in client.session
    # and the password step is locked for this username here, the token endpoint too
    assert client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}).status_code == 429
    assert_error(obtain("clinician", otp=code_at(device)), 429, "locked_out")


def test_a_recovery_code_works_once_at_the_token_endpoint_and_is_logged(clinician_a):
    with_device(clinician_a)
    codes = recovery_codes_replace(user=clinician_a.user)
    response = obtain("clinician", otp=codes[0].lower())  # typed in lower case: still the code
    assert response.status_code == 200, response.content
    assert claims(response.json()["access"])["amr"] == ["pwd", "otp"]
    assert_error(obtain("clinician", otp=codes[0]), 401, "otp_invalid")
    used = RecoveryCode.objects.get(user=clinician_a.user, used_at__isnull=False)
    assert AccessEvent.objects.filter(action="auth.recovery_code", target_id=str(used.pk)).count() == 1
    assert obtain("clinician", otp=codes[1]).status_code == 200


ADMIN_CALLS = [
    ("get", "/api/v1/members/", None),
    ("get", "/api/v1/activity/", None),
    ("post", "/api/v1/invitations/", {"email": "new.person@example.org", "role": "viewer"}),
    ("patch", "/api/v1/members/{member}/", {"role": "viewer"}),
    ("post", "/api/v1/members/{member}/deactivate/", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS, ids=[c[1] for c in ADMIN_CALLS])
def test_a_strict_hospitals_admin_api_needs_a_token_obtained_with_a_second_factor(
    admin_a, clinician_a, strict_hospital, method, path, body
):
    url = path.format(member=clinician_a.pk)
    password_only = obtain("hospital-admin").json()["access"]
    refused = getattr(bearer(password_only), method)(url, body, format="json")
    error = assert_error(refused, 403, "two_factor_required")
    assert "one-time code" in error["message"]

    device = with_device(admin_a)
    verified = obtain("hospital-admin", otp=code_at(device)).json()["access"]
    allowed = getattr(bearer(verified), method)(url, body, format="json")
    assert allowed.status_code in (200, 201), allowed.content


def test_a_hospital_that_does_not_require_it_accepts_password_only_admin_tokens(admin_a):
    access = obtain("hospital-admin").json()["access"]
    assert bearer(access).get("/api/v1/members/").status_code == 200


def test_the_schema_documents_the_otp_field_of_the_token_request(client, clinician_a):
    client.force_login(clinician_a.user)
    schema = client.get("/api/v1/schema/", {"format": "json"}).json()
    body = schema["paths"]["/api/v1/auth/token/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][name]
    assert "otp" in fields["properties"] and "otp" not in fields.get("required", [])
    assert {"username", "password"} <= set(fields["required"])


@pytest.mark.django_db(transaction=True)
def test_a_websocket_token_is_verified_only_when_it_carries_the_second_factor(hospital_a):
    admin = member(hospital_a, "ws-admin", Role.TENANT_ADMIN)
    device = with_device(admin)
    with_otp = obtain("ws-admin", otp=code_at(device)).json()["access"]
    TOTPDevice.objects.filter(pk=device.pk).delete()
    without = obtain("ws-admin").json()["access"]
    user, _ = async_to_sync(_user_for_token)(with_otp)
    assert user.is_authenticated and user.is_verified()
    user, _ = async_to_sync(_user_for_token)(without)
    assert user.is_authenticated and not user.is_verified()


# --- item 5: a first enrolment needs an enrolment code ----------------------------------------


def enrol_page(client):
    page = client.get(SETUP_URL)
    assert page.status_code == 200
    device = TOTPDevice.objects.get(pk=client.session["two_factor_pending_device"])
    return page, device


def test_an_admin_of_a_strict_hospital_cannot_enrol_with_the_password_alone(client, admin_a, strict_hospital):
    client.force_login(admin_a.user)
    page, device = enrol_page(client)
    assert b'name="enrolment_code"' in page.content
    for enrolment_code in ("", "AAAA-BBBB-CCCC-DDDD"):
        response = client.post(SETUP_URL, {"code": code_at(device), "enrolment_code": enrolment_code})
        assert response.status_code == 200 and b"enrolment code is not valid" in response.content
    device.refresh_from_db()
    assert not device.confirmed
    assert client.get(MEMBERS_PAGE).status_code == 403
    assert AccessEvent.objects.filter(action="auth.two_factor_enrol", outcome="failed").count() == 2


def issue_on_the_members_page(client, membership) -> str:
    response = client.post(f"/hospital/members/{membership.pk}/enrolment-code/")
    assert response.status_code == 200, response.content[:500]
    assert response["Cache-Control"] == "no-store"
    text = response.content.decode()
    start = text.index('data-role="enrolment-code">') + len('data-role="enrolment-code">')
    return text[start : text.index("<", start)]


def test_another_admin_issues_an_enrolment_code_that_works_once_and_is_stored_hashed(
    client, admin_a, second_admin, strict_hospital
):
    with_device(second_admin)
    issuer = verified_browser(type(client)(), second_admin)
    raw = issue_on_the_members_page(issuer, admin_a)
    stored = TwoFactorEnrolmentCode.objects.get(user=admin_a.user)
    assert stored.code_hash == hashlib.sha256(raw.replace("-", "").encode()).hexdigest()
    assert raw not in str(list(TwoFactorEnrolmentCode.objects.values()))
    assert stored.expires_at > timezone.now() + timedelta(hours=1)
    issued = AccessEvent.objects.get(action="two_factor.enrolment_code_issue")
    assert issued.actor == second_admin.user and issued.target_id == str(admin_a.user.pk)
    assert issuer.get(MEMBERS_PAGE).content.count(raw.encode()) == 0  # shown only once

    client.force_login(admin_a.user)
    _, device = enrol_page(client)
    response = client.post(SETUP_URL, {"code": code_at(device), "enrolment_code": raw})
    assert response.status_code == 200 and b'id="recovery-codes"' in response.content
    device.refresh_from_db()
    assert device.confirmed
    assert client.get(MEMBERS_PAGE).status_code == 200  # the enrolling session is verified
    stored.refresh_from_db()
    assert stored.used_at is not None
    enrolled = AccessEvent.objects.get(action="auth.two_factor_enrol", outcome="success")
    assert enrolled.target_type == "enrolment_code" and enrolled.target_id == str(stored.pk)

    # the same code cannot enrol again (after a reset, say)
    TOTPDevice.objects.filter(user=admin_a.user).delete()
    other = type(client)()
    other.force_login(admin_a.user)
    _, device = enrol_page(other)
    again = other.post(SETUP_URL, {"code": code_at(device, 1), "enrolment_code": raw})
    assert b"enrolment code is not valid" in again.content


def test_an_expired_enrolment_code_is_refused(client, admin_a, second_admin, strict_hospital):
    with_device(second_admin)
    raw = issue_on_the_members_page(verified_browser(type(client)(), second_admin), admin_a)
    TwoFactorEnrolmentCode.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    client.force_login(admin_a.user)
    _, device = enrol_page(client)
    response = client.post(SETUP_URL, {"code": code_at(device), "enrolment_code": raw})
    assert b"enrolment code is not valid" in response.content


def test_an_admin_cannot_issue_a_code_for_themselves_or_for_someone_in_another_hospital(
    client, admin_a, second_admin, strict_hospital, hospital_b
):
    with_device(second_admin)
    issuer = verified_browser(client, second_admin)
    traveller = member(strict_hospital, "traveller", Role.TENANT_ADMIN)
    Membership.objects.create(user=traveller.user, tenant=hospital_b, role=Role.TENANT_ADMIN)
    for target in (second_admin, traveller):
        response = issuer.post(f"/hospital/members/{target.pk}/enrolment-code/", follow=True)
        assert b'data-role="enrolment-code"' not in response.content
    assert not TwoFactorEnrolmentCode.objects.exists()
    assert AccessEvent.objects.filter(action="two_factor.manage", outcome="denied").count() == 2


def test_an_unverified_admin_of_a_strict_hospital_cannot_issue_codes(client, admin_a, second_admin, strict_hospital):
    client.force_login(second_admin.user)  # password only: no verified session
    response = client.post(f"/hospital/members/{admin_a.pk}/enrolment-code/")
    assert response.status_code == 403
    assert not TwoFactorEnrolmentCode.objects.exists()


def test_a_secret_shown_to_another_session_is_not_the_one_that_gets_confirmed(client, clinician_a):
    """Someone holding the password opens the page first: the person's own enrolment is
    another secret, and the other session's pending device is discarded."""
    intruder = type(client)()
    intruder.force_login(clinician_a.user)
    _, theirs = enrol_page(intruder)
    client.force_login(clinician_a.user)
    _, mine = enrol_page(client)
    assert mine.pk != theirs.pk and mine.key != theirs.key
    assert client.post(SETUP_URL, {"code": code_at(mine)}).status_code == 200
    assert list(TOTPDevice.objects.filter(user=clinician_a.user).values_list("pk", "confirmed")) == [(mine.pk, True)]


def test_recovery_codes_are_shown_once_stored_hashed_and_work_once_on_the_sign_in_page(client, clinician_a):
    client.force_login(clinician_a.user)
    _, device = enrol_page(client)
    response = client.post(SETUP_URL, {"code": code_at(device)})
    text = response.content.decode()
    codes = [line.split("<code>")[1].split("</code>")[0] for line in text.split("<li>")[1:] if "<code>" in line]
    assert len(codes) == 10 and len(set(codes)) == 10
    stored = set(RecoveryCode.objects.filter(user=clinician_a.user).values_list("code_hash", flat=True))
    assert stored == {hashlib.sha256(c.replace("-", "").encode()).hexdigest() for c in codes}
    assert codes[0].encode() not in client.get(SETUP_URL).content  # never shown again
    client.post("/accounts/logout/")

    fresh = type(client)()
    first = fresh.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD})
    signed_in = fresh.post(first["Location"], {"code": codes[0]})
    assert signed_in.status_code == 302 and fresh.session["_auth_user_id"] == str(clinician_a.user.pk)
    assert AccessEvent.objects.filter(action="auth.recovery_code", actor=clinician_a.user).count() == 1

    again = type(client)()
    first = again.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD})
    refused = again.post(first["Location"], {"code": codes[0]})
    assert refused.status_code == 200 and b"not valid" in refused.content
    assert "_auth_user_id" not in again.session


def test_an_admin_resets_a_members_device_who_then_needs_a_new_enrolment_code(
    client, admin_a, second_admin, strict_hospital
):
    device = with_device(admin_a)
    recovery_codes_replace(user=admin_a.user)
    refresh = obtain("hospital-admin", otp=code_at(device)).json()["refresh"]
    with_device(second_admin)
    issuer = verified_browser(type(client)(), second_admin)

    response = issuer.post(f"/hospital/members/{admin_a.pk}/two-factor-reset/")
    assert response.status_code == 302
    assert not TOTPDevice.objects.filter(user=admin_a.user).exists()
    assert not RecoveryCode.objects.filter(user=admin_a.user).exists()
    reset = AccessEvent.objects.get(action="two_factor.reset")
    assert reset.actor == second_admin.user and reset.target_id == str(admin_a.user.pk)
    assert reset.tenant == strict_hospital
    # tokens obtained with the lost device end
    assert APIClient().post(REFRESH_URL, {"refresh": refresh}, format="json").status_code == 401
    # the member signs in with the password, and cannot enrol again without a new code
    client.force_login(admin_a.user)
    _, pending = enrol_page(client)
    assert b"enrolment code is not valid" in client.post(SETUP_URL, {"code": code_at(pending)}).content
    raw = issue_on_the_members_page(issuer, admin_a)
    enrolled = client.post(SETUP_URL, {"code": code_at(pending, 1), "enrolment_code": raw})
    assert b'id="recovery-codes"' in enrolled.content


def test_enrolling_ends_refresh_tokens_obtained_with_the_password_alone(client, clinician_a):
    refresh = obtain("clinician").json()["refresh"]
    client.force_login(clinician_a.user)
    _, device = enrol_page(client)
    client.post(SETUP_URL, {"code": code_at(device)})
    assert APIClient().post(REFRESH_URL, {"refresh": refresh}, format="json").status_code == 401
    outstanding = OutstandingToken.objects.filter(user=clinician_a.user)
    assert BlacklistedToken.objects.filter(token__in=outstanding).count() == outstanding.count()


def test_the_members_page_shows_who_has_a_second_factor(client, admin_a, second_admin, clinician_a, strict_hospital):
    with_device(second_admin)
    with_device(clinician_a)
    page = verified_browser(client, second_admin).get(MEMBERS_PAGE).content.decode()

    def cell(username):
        row = page[page.index(f'data-member="{username}"') :]
        row = row[row.index('data-role="two-factor"') :]
        return row[: row.index("</td>")]

    assert "needs an enrolment code" in cell("hospital-admin") and "Issue enrolment code" in cell("hospital-admin")
    assert "Reset" in cell("clinician") and "enrolment code" not in cell("clinician")


# --- item 5: platform staff need a second factor in production settings ------------------------


@pytest.fixture
def staff_user(db):
    return get_user_model().objects.create_user(username="platform-staff", password=PASSWORD, is_staff=True)


def test_with_the_production_rule_staff_reach_the_admin_only_with_a_verified_session(client, staff_user, settings):
    settings.SIGHTLINE_STAFF_TWO_FACTOR = True
    client.force_login(staff_user)
    refused = client.get("/admin/")
    assert refused.status_code == 302 and refused["Location"] == SETUP_URL
    assert AccessEvent.objects.filter(action="admin.two_factor_required", actor=staff_user).count() == 1
    page, device = enrol_page(client)
    assert b'name="enrolment_code"' in page.content  # staff need an enrolment code too

    printed = io.StringIO()
    call_command("two_factor_enrolment_code", "platform-staff", stdout=printed)  # the operator's way in
    raw = printed.getvalue().splitlines()[0]
    assert AccessEvent.objects.filter(action="two_factor.enrolment_code_issue", actor_label="manage.py").count() == 1
    client.post(SETUP_URL, {"code": code_at(device), "enrolment_code": raw})
    assert client.get("/admin/").status_code == 200

    other = type(client)()
    other.force_login(staff_user)  # a session without the code: signed out and sent to sign in
    again = other.get("/admin/")
    assert again.status_code == 302 and again["Location"].startswith(LOGIN_URL)
    assert "_auth_user_id" not in other.session


def test_without_the_rule_staff_use_the_admin_as_before(client, staff_user):
    client.force_login(staff_user)
    assert client.get("/admin/").status_code == 200


PRODUCTION_PROBE = """
from django.conf import settings
from django.test import RequestFactory
from accounts.middleware import StaffTwoFactorMiddleware

class Staff:
    is_authenticated = True
    is_staff = True
    def is_verified(self):
        return False

request = RequestFactory().get("/admin/", secure=True)
request.user = Staff()
gate = StaffTwoFactorMiddleware(lambda request: "reached the admin")
assert settings.SIGHTLINE_STAFF_TWO_FACTOR is True
assert "accounts.middleware.StaffTwoFactorMiddleware" in settings.MIDDLEWARE
assert settings.MIDDLEWARE.index("accounts.middleware.StaffTwoFactorMiddleware") > settings.MIDDLEWARE.index(
    "django_otp.middleware.OTPMiddleware"
)
try:
    answer = gate._needs_second_factor(request)
except Exception as exc:
    raise SystemExit(f"gate failed: {exc!r}")
print("needs-second-factor" if answer else "let-through")
"""


def test_production_settings_turn_the_staff_rule_on(settings):
    from tests.conftest import production_env

    env = production_env()
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{PRODUCTION_PROBE}"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("needs-second-factor"), result.stdout


# --- item 5: platform staff issue codes and reset devices in the Django admin -------------------


@pytest.fixture
def user_staff(db):
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user(username="people-staff", password=PASSWORD, is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_user", "change_user"]))
    return user


def admin_action(client, action, *users):
    return client.post("/admin/auth/user/", {"action": action, "_selected_action": [u.pk for u in users]})


def test_staff_issue_an_enrolment_code_in_the_admin_shown_once(client, user_staff, admin_a, strict_hospital):
    client.force_login(user_staff)
    response = admin_action(client, "issue_enrolment_code", admin_a.user)
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    text = response.content.decode()
    start = text.index('data-role="enrolment-code">') + len('data-role="enrolment-code">')
    raw = text[start : text.index("<", start)]
    stored = TwoFactorEnrolmentCode.objects.get(user=admin_a.user)
    assert stored.tenant is None and stored.issued_by == user_staff
    assert stored.code_hash == hashlib.sha256(raw.replace("-", "").encode()).hexdigest()
    assert AccessEvent.objects.filter(action="two_factor.enrolment_code_issue", actor=user_staff).count() == 1

    enrolling = type(client)()
    enrolling.force_login(admin_a.user)
    _, device = enrol_page(enrolling)
    assert b'id="recovery-codes"' in enrolling.post(SETUP_URL, {"code": code_at(device), "enrolment_code": raw}).content


def test_staff_reset_a_device_in_the_admin_but_only_a_superuser_does_it_for_staff(
    client, user_staff, clinician_a, staff_user
):
    with_device(clinician_a)
    with_device(Membership(user=staff_user))
    client.force_login(user_staff)
    assert admin_action(client, "reset_two_factor", clinician_a.user).status_code == 302
    assert not TOTPDevice.objects.filter(user=clinician_a.user).exists()
    assert AccessEvent.objects.filter(action="two_factor.reset", actor=user_staff).count() == 1
    admin_action(client, "reset_two_factor", staff_user)
    admin_action(client, "issue_enrolment_code", staff_user)
    assert TOTPDevice.objects.filter(user=staff_user).exists()
    assert not TwoFactorEnrolmentCode.objects.filter(user=staff_user).exists()


def test_the_hospitals_activity_shows_codes_issued_and_resets(client, admin_a, second_admin, clinician_a):
    with_device(clinician_a)
    client.force_login(second_admin.user)
    client.post(f"/hospital/members/{clinician_a.pk}/two-factor-reset/")
    client.post(f"/hospital/members/{admin_a.pk}/enrolment-code/")
    actions = [event["action"] for event in client.get("/api/v1/activity/").json()["results"]]
    assert "two_factor.reset" in actions and "two_factor.enrolment_code_issue" in actions


def test_new_recovery_codes_need_a_verified_session_and_replace_the_old_ones(client, clinician_a):
    device = with_device(clinician_a)
    old = recovery_codes_replace(user=clinician_a.user)
    unverified = type(client)()
    unverified.force_login(clinician_a.user)
    refused = unverified.post(SETUP_URL, {"action": "recovery_codes"})
    assert b"Sign out and in again" in refused.content and b'id="recovery-codes"' not in refused.content

    response = verified_browser(client, clinician_a, device).post(SETUP_URL, {"action": "recovery_codes"})
    assert b'id="recovery-codes"' in response.content and response["Cache-Control"] == "no-store"
    assert old[0].encode() not in response.content
    assert_error(obtain("clinician", otp=old[0]), 401, "otp_invalid")  # the old set no longer works
    assert AccessEvent.objects.filter(action="auth.recovery_codes_issue", actor=clinician_a.user).count() == 2
