"""Service accounts: API keys for unattended clients, scoped, role-checked, rate-limited, logged,
and refused by every way in that is meant for people (passwords, pages, sessions, tokens)."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from rest_framework.test import APIClient

from accounts.models import AccessEvent, ApiKey, Membership, Role, ServiceAccount
from accounts.service_accounts import api_key_create, service_account_create
from accounts.services import membership_grant
from accounts.signals import username_tried
from core.errors import Invalid
from tests.conftest import PASSWORD, api_client_for, member, png_bytes, upload_file

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


def make_key(admin, name="nightly", role=Role.CLINICIAN, rate=None):
    account = service_account_create(actor=admin, name=name, role=role)
    key, raw = api_key_create(actor=admin, service_account=account, rate=rate)
    return account, key, raw


def key_client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def upload(client):
    return client.post("/api/v1/images/", {"file": upload_file(png_bytes())}, format="multipart")


def assert_error_shape(response, code: str | None = None) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


# --- an admin makes one, through the API ------------------------------------------------------


def test_an_admin_creates_a_service_account_and_a_key_shown_once(admin_a):
    admin = api_client_for(admin_a)
    response = admin.post("/api/v1/service-accounts/", {"name": "nightly-import", "role": "clinician"}, format="json")
    assert response.status_code == 201, response.content
    account = response.json()
    assert account["username"] == "svc:demo-general:nightly-import" and account["role"] == "clinician"
    assert account["keys"] == [] and account["interactive"] is False  # protocol reads: the bulk lane

    response = admin.post(f"/api/v1/service-accounts/{account['id']}/keys/", {"rate": 120}, format="json")
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    created = response.json()
    raw = created["key"]
    assert raw.startswith(created["key_id"] + "_") and created["rate"] == 120
    stored = ApiKey.objects.get(pk=created["id"])
    assert raw not in {stored.prefix, stored.key_hash} and len(stored.key_hash) == 64  # only the hash is kept
    # the key is never shown again
    listed = admin.get(f"/api/v1/service-accounts/{account['id']}/").json()
    assert raw not in str(listed) and listed["keys"][0]["key_id"] == created["key_id"]
    page = admin.get("/api/v1/service-accounts/").json()
    assert [row["name"] for row in page["results"]] == ["nightly-import"] and raw not in str(page)

    # the service account is a user with an unusable password and exactly one membership
    service_account = ServiceAccount.objects.get(pk=account["id"])
    assert not service_account.user.has_usable_password()
    assert list(Membership.objects.filter(user=service_account.user).values_list("tenant__slug", "role")) == [
        ("demo-general", "clinician")
    ]
    # creation and the key are security events in the hospital's log
    logged = AccessEvent.objects.filter(tenant=admin_a.tenant, actor=admin_a.user).values_list("action", "target_id")
    assert ("service_account.create", str(account["id"])) in logged
    assert ("api_key.create", created["key_id"]) in logged


def test_only_hospital_admins_manage_service_accounts(admin_a, clinician_a):
    account, key, _ = make_key(admin_a)
    clinician = api_client_for(clinician_a)
    for method, url in [
        ("get", "/api/v1/service-accounts/"),
        ("post", "/api/v1/service-accounts/"),
        ("get", f"/api/v1/service-accounts/{account.pk}/"),
        ("post", f"/api/v1/service-accounts/{account.pk}/keys/"),
        ("post", f"/api/v1/service-accounts/{account.pk}/revoke/"),
        ("post", f"/api/v1/service-account-keys/{key.pk}/revoke/"),
    ]:
        response = getattr(clinician, method)(url, {"name": "x", "role": "viewer"}, format="json")
        assert response.status_code == 403, (method, url)
        assert_error_shape(response, "forbidden")
    assert ServiceAccount.objects.count() == 1 and ApiKey.objects.get().revoked_at is None


# --- the key at work --------------------------------------------------------------------------


def test_a_key_uploads_and_lists_in_its_own_hospital(admin_a, demo_model):
    _, key, raw = make_key(admin_a)
    client = key_client(raw)
    response = upload(client)
    assert response.status_code == 201, response.content
    image_id = response.json()["id"]
    listed = client.get("/api/v1/images/")
    assert listed.status_code == 200
    assert [row["id"] for row in listed.json()["results"]] == [image_id]
    assert client.get(f"/api/v1/images/{image_id}/").status_code == 200
    key.refresh_from_db()
    assert key.last_used is not None


def test_the_keys_role_is_enforced(admin_a, demo_model):
    _, _, viewer = make_key(admin_a, name="reader", role=Role.VIEWER)
    _, _, auditor = make_key(admin_a, name="log-export", role=Role.AUDITOR)
    response = upload(key_client(viewer))
    assert response.status_code == 403
    assert_error_shape(response, "forbidden")
    assert key_client(viewer).get("/api/v1/images/").status_code == 200
    assert key_client(auditor).get("/api/v1/images/").status_code == 403
    assert key_client(auditor).get("/api/v1/access-log/").status_code == 200
    assert key_client(viewer).get("/api/v1/members/").status_code == 403  # never an admin's API


def test_another_hospitals_objects_are_404_to_a_key(admin_a, clinician_b, demo_model):
    theirs = upload(api_client_for(clinician_b)).json()["id"]
    _, _, raw = make_key(admin_a)
    client = key_client(raw)
    for url in (f"/api/v1/images/{theirs}/", f"/api/v1/images/{theirs}/file/"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert_error_shape(response, "not_found")
    assert client.get("/api/v1/images/").json()["results"] == []
    # naming the other hospital is the same as naming one that does not exist
    response = client.get("/api/v1/images/", HTTP_X_TENANT=clinician_b.tenant.slug)
    assert response.status_code == 404


def test_a_revoked_key_is_refused_on_its_next_request(admin_a, demo_model):
    account, key, raw = make_key(admin_a)
    client = key_client(raw)
    assert client.get("/api/v1/images/").status_code == 200
    response = api_client_for(admin_a).post(f"/api/v1/service-account-keys/{key.pk}/revoke/")
    assert response.status_code == 200 and response.json()["revoked_at"]
    response = client.get("/api/v1/images/")
    assert response.status_code == 401
    assert "revoked" in assert_error_shape(response, "api_key_invalid")["message"]
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    revoked = AccessEvent.objects.filter(action="api_key.revoke", target_id=key.public_id, actor=admin_a.user)
    assert revoked.count() == 1
    # the refused use is logged against the key
    assert AccessEvent.objects.filter(
        action="auth.api_key", outcome="denied", actor=account.user, target_id=key.public_id
    ).exists()


def test_revoking_the_account_ends_every_key_and_its_membership(admin_a, demo_model):
    account, _, first = make_key(admin_a)
    _, second = api_key_create(actor=admin_a, service_account=account)
    response = api_client_for(admin_a).post(f"/api/v1/service-accounts/{account.pk}/revoke/")
    assert response.status_code == 200 and response.json()["revoked_at"]
    for raw in (first, second):
        assert key_client(raw).get("/api/v1/images/").status_code == 401
    assert not Membership.objects.get(user=account.user).is_active
    response = api_client_for(admin_a).post(f"/api/v1/service-accounts/{account.pk}/keys/")
    assert response.status_code == 410  # no new key for a revoked account
    assert_error_shape(response, "service_account_revoked")


def test_a_wrong_or_malformed_key_is_401_and_never_read_as_a_token(admin_a, clinician_a, demo_model):
    _, key, raw = make_key(admin_a)
    for credential in (raw[:-1] + ("A" if raw[-1] != "A" else "B"), "slk_garbage", f"slk_{key.prefix}_"):
        response = key_client(credential).get("/api/v1/images/")
        assert response.status_code == 401, credential
        assert_error_shape(response, "api_key_invalid")  # the key class answered, not simplejwt
    # a wrong secret for a real key is logged against that key
    assert AccessEvent.objects.filter(action="auth.api_key", outcome="failed", target_id=key.public_id).count() == 1
    # and JWTs work as before beside keys
    access = APIClient().post("/api/v1/auth/token/", {"username": "clinician", "password": PASSWORD}).json()
    assert key_client(access["access"]).get("/api/v1/images/").status_code == 200


def test_every_access_log_entry_of_a_key_names_the_key(admin_a, demo_model):
    account, key, raw = make_key(admin_a)
    client = key_client(raw)
    image_id = upload(client).json()["id"]
    client.get("/api/v1/images/")
    client.get(f"/api/v1/images/{image_id}/")
    entries = AccessEvent.objects.filter(actor=account.user).exclude(action="membership.grant")
    assert set(entries.values_list("action", flat=True)) >= {"image.upload", "image.list", "image.view"}
    for entry in entries:
        assert entry.actor_label == f"{account.user.username} (key {key.public_id})", entry


# --- the rate -------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after(admin_a, demo_model):
    _, _, raw = make_key(admin_a, rate=3)
    _, _, other = make_key(admin_a, name="other", rate=3)
    client = key_client(raw)
    for _ in range(3):
        assert client.get("/api/v1/images/").status_code == 200
    response = client.get("/api/v1/images/")
    assert response.status_code == 429
    assert_error_shape(response, "throttled")
    assert 1 <= int(response["Retry-After"]) <= 60
    assert key_client(other).get("/api/v1/images/").status_code == 200  # counted per key


def test_the_rate_is_counted_in_a_cache_every_web_process_shares():
    cache = settings.CACHES["default"]
    assert cache["BACKEND"] == "core.redis_cache.SharedPoolRedisCache"
    assert cache["LOCATION"].startswith("redis://")


def test_a_key_is_refused_in_words_when_its_rate_cannot_be_counted(admin_a, demo_model, settings, free_port):
    """No shared cache, no limit: the key is refused (503) rather than served without one."""
    _, _, raw = make_key(admin_a)
    settings.CACHES = {
        "default": {
            "BACKEND": "core.redis_cache.SharedPoolRedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port}/0",
        }
    }
    response = key_client(raw).get("/api/v1/images/")
    assert response.status_code == 503
    assert_error_shape(response, "rate_limit_unavailable")


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rate_out_of_range_is_refused(admin_a):
    account = service_account_create(actor=admin_a, name="nightly", role=Role.CLINICIAN)
    admin = api_client_for(admin_a)
    for rate in (0, 6001):
        response = admin.post(f"/api/v1/service-accounts/{account.pk}/keys/", {"rate": rate}, format="json")
        assert response.status_code == 400
    with pytest.raises(Invalid):
        api_key_create(actor=admin_a, service_account=account, rate=0)
    assert not ApiKey.objects.exists()


def test_a_third_live_key_is_refused(admin_a):
    account, _, _ = make_key(admin_a)
    api_key_create(actor=admin_a, service_account=account)
    response = api_client_for(admin_a).post(f"/api/v1/service-accounts/{account.pk}/keys/")
    assert response.status_code == 409
    assert_error_shape(response, "too_many_keys")


# --- never an admin, never a person ---------------------------------------------------------


def test_a_service_account_is_never_a_hospital_admin(admin_a, hospital_b):
    admin = api_client_for(admin_a)
    response = admin.post("/api/v1/service-accounts/", {"name": "boss", "role": "tenant_admin"}, format="json")
    assert response.status_code == 400
    with pytest.raises(Invalid):
        service_account_create(actor=admin_a, name="boss", role=Role.TENANT_ADMIN)
    account, _, _ = make_key(admin_a)
    # the members API does not reach it: its role is not a person's to change
    response = admin.patch(f"/api/v1/members/{account.membership_id}/", {"role": "tenant_admin"}, format="json")
    assert response.status_code == 404
    assert "svc:" not in str(admin.get("/api/v1/members/").json())
    # and the database refuses every other writer: a promotion, or a second hospital
    with pytest.raises(IntegrityError), transaction.atomic():
        Membership.objects.filter(pk=account.membership_id).update(role=Role.TENANT_ADMIN)
    with pytest.raises(IntegrityError), transaction.atomic():
        membership_grant(tenant=hospital_b, user=account.user, role=Role.VIEWER)
    assert Membership.objects.get(user=account.user).role == Role.CLINICIAN


def test_no_password_sign_in_even_with_a_password_set(admin_a):
    account, _, _ = make_key(admin_a)
    account.user.set_password(PASSWORD)  # as if someone gave it one in the admin
    account.user.save()
    username = account.user.username
    response = APIClient().post("/api/v1/auth/token/", {"username": username, "password": PASSWORD}, format="json")
    assert response.status_code == 401
    assert "access" not in response.json()
    assert_error_shape(response)

    browser = APIClient()
    response = browser.post("/accounts/login/", {"username": username, "password": PASSWORD})
    assert response.status_code == 200  # the form again, with its error
    assert "_auth_user_id" not in browser.session
    assert browser.get("/hospital/members/").status_code == 302  # still signed out
    failed = AccessEvent.objects.filter(action="auth.login", outcome="failed", actor_label=username_tried(username))
    assert failed.count() == 2


def test_a_service_account_cannot_hold_a_browser_session(admin_a):
    account, _, _ = make_key(admin_a)
    browser = APIClient()
    with pytest.raises(PermissionDenied):
        browser.force_login(account.user)  # even code that calls login() directly
    assert "_auth_user_id" not in browser.session
    response = browser.get("/images/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert AccessEvent.objects.filter(action="auth.login", outcome="denied", actor=account.user).exists()
    assert not AccessEvent.objects.filter(action="auth.login", outcome="success", actor=account.user).exists()


def test_a_key_opens_no_pages(admin_a):
    _, _, raw = make_key(admin_a)
    response = APIClient().get("/images/", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- the page -------------------------------------------------------------------------------


def test_an_account_whose_protocol_reads_a_person_waits_on_is_marked_interactive(admin_a):
    admin = api_client_for(admin_a)
    body = {"name": "reading-room", "role": "clinician", "interactive": True}
    account = admin.post("/api/v1/service-accounts/", body, format="json").json()
    assert account["interactive"] is True and ServiceAccount.objects.get(pk=account["id"]).interactive


def test_the_page_creates_an_account_shows_a_new_key_once_and_revokes_it(admin_a, demo_model):
    browser = APIClient()
    browser.force_login(admin_a.user)
    assert browser.get("/hospital/members/").content.count(b"/hospital/service-accounts/") >= 1
    response = browser.post("/hospital/service-accounts/create/", {"name": "pacs-bridge", "role": "viewer"})
    assert response.status_code == 302
    account = ServiceAccount.objects.get(name="pacs-bridge")
    assert account.membership.role == Role.VIEWER

    response = browser.post(f"/hospital/service-accounts/{account.pk}/keys/", {"rate": "30"})
    assert response.status_code == 201 and response["Cache-Control"] == "no-store"
    key = ApiKey.objects.get(service_account=account)
    page = response.content.decode()
    raw = page.split('data-role="new-key">')[1].split("<")[0]
    assert raw.startswith(key.public_id + "_") and key.rate == 30
    assert key_client(raw).get("/api/v1/images/").status_code == 200
    again = browser.get("/hospital/service-accounts/").content.decode()
    assert key.public_id in again and raw not in again  # listed, never shown again

    response = browser.post(f"/hospital/service-account-keys/{key.pk}/revoke/")
    assert response.status_code == 302
    assert key_client(raw).get("/api/v1/images/").status_code == 401

    response = browser.post(f"/hospital/service-accounts/{account.pk}/revoke/")
    assert response.status_code == 302
    account.refresh_from_db()
    assert account.revoked_at is not None


def test_the_page_refuses_bad_input_in_words(admin_a):
    browser = APIClient()
    browser.force_login(admin_a.user)
    response = browser.post("/hospital/service-accounts/create/", {"name": "Bad Name!", "role": "viewer"}, follow=True)
    assert response.status_code == 200 and b"lowercase letters" in response.content
    response = browser.post("/hospital/service-accounts/create/", {"name": "x", "role": "tenant_admin"}, follow=True)
    assert b"cannot be a hospital admin" in response.content
    assert not ServiceAccount.objects.exists()


def test_the_page_is_for_admins_only(clinician_a):
    browser = APIClient()
    browser.force_login(clinician_a.user)
    assert browser.get("/hospital/service-accounts/").status_code == 403


def test_platform_staff_cannot_make_one_an_admin_in_the_django_admin_either(admin_a, hospital_b):
    from django.contrib.auth import get_user_model

    account, _, _ = make_key(admin_a)
    staff = get_user_model().objects.create_superuser(username="platform-staff", password=PASSWORD)
    browser = APIClient()
    browser.force_login(staff)
    url = f"/admin/accounts/membership/{account.membership_id}/change/"
    fields = {"user": account.user_id, "tenant": admin_a.tenant_id, "is_active": "on"}
    response = browser.post(url, {**fields, "role": "tenant_admin", "created_0": "2026-01-01", "created_1": "00:00"})
    assert response.status_code == 200 and b"cannot be a hospital admin" in response.content  # the form, in words
    response = browser.post(
        "/admin/accounts/membership/add/",
        {**fields, "tenant": hospital_b.pk, "role": "viewer", "created_0": "2026-01-01", "created_1": "00:00"},
    )
    assert response.status_code == 200 and b"exactly one membership" in response.content
    assert list(Membership.objects.filter(user=account.user).values_list("role", flat=True)) == ["clinician"]


@pytest.mark.django_db(transaction=True)
def test_an_entry_a_keys_websocket_writes_names_the_key_too(hospital_a, hospital_b, settings):
    """The real ASGI application in this process (in-memory channel layer): a refused
    subscription has no request to read the key from, and still names it."""
    import json

    from asgiref.sync import async_to_sync
    from asgiref.testing import ApplicationCommunicator

    from config.asgi import application

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    account, key, raw = make_key(member(hospital_a, "admin-ws", Role.TENANT_ADMIN), name="socket")

    async def subscribe_to_another_hospital():
        headers = [(b"authorization", f"Bearer {raw}".encode()), (b"host", b"testserver")]
        socket = ApplicationCommunicator(
            application, {"type": "websocket", "path": "/ws/events/", "query_string": b"", "headers": headers}
        )
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(5))["type"] == "websocket.accept"
        assert json.loads((await socket.receive_output(5))["text"]) == {"type": "hello"}
        await socket.send_input(
            {"type": "websocket.receive", "text": json.dumps({"type": "subscribe", "tenant": hospital_b.slug})}
        )
        assert json.loads((await socket.receive_output(5))["text"])["code"] == "not_found"
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(5)

    async_to_sync(subscribe_to_another_hospital)()
    (entry,) = AccessEvent.objects.filter(actor=account.user, action="events.subscribe", outcome="denied")
    assert entry.actor_label == f"{account.user.username} (key {key.public_id})"
