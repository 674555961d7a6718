"""A service account's API key on the live stack (uvicorn, Channels over the stack's Redis, a
worker): it opens sockets, revoking it closes them at once and refuses its next request, and
its rate is counted across processes."""

from __future__ import annotations

import json
import time

import pytest
import requests
from django.conf import settings
from django.test import override_settings
from rest_framework.test import APIClient
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from accounts.models import Role
from accounts.service_accounts import api_key_create, service_account_create
from tests.e2e.test_revocation import (
    CLOSE_ACCESS_REVOKED,
    assert_alive,
    assert_error_shape,
    bearer,
    close_code,
    member,
    subscribe,
    token_pair,
    ws_paths,
)

pytestmark = pytest.mark.e2e


def key_socket(stack, raw: str, path: str = "/ws/events/"):
    return connect(f"{stack.ws_url}{path}", open_timeout=10, additional_headers=bearer(raw))


def test_revoking_a_key_closes_its_sockets_and_refuses_it_at_once(stack, live_demo):
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name="nightly", role=Role.CLINICIAN)
    key, raw = api_key_create(actor=admin, service_account=account)
    _, other = api_key_create(actor=admin, service_account=account)  # the replacement, mid-rotation
    admin_access = token_pair(stack, admin.user.username)["access"]
    images = f"{stack.base_url}/api/v1/images/"
    assert requests.get(images, headers=bearer(raw), timeout=10).status_code == 200

    with key_socket(stack, raw) as socket, key_socket(stack, other) as replacement:
        for live in (socket, replacement):
            assert json.loads(live.recv(timeout=10)) == {"type": "hello"}
            assert subscribe(live, "demo-general") == {"type": "subscribed", "tenant": "demo-general"}
        started = time.monotonic()
        response = requests.post(
            f"{stack.base_url}/api/v1/service-account-keys/{key.pk}/revoke/", headers=bearer(admin_access), timeout=10
        )
        assert response.status_code == 200, response.text
        assert close_code(socket) == CLOSE_ACCESS_REVOKED
        elapsed = time.monotonic() - started
        assert_alive(replacement)  # the account's other key keeps its socket
    print(f"\nkey revoked → its socket closed with 4403: {elapsed * 1000:.0f} ms")

    response = requests.get(images, headers=bearer(raw), timeout=10)
    assert response.status_code == 401, response.text
    assert_error_shape(response, "api_key_invalid")
    assert requests.get(images, headers=bearer(other), timeout=10).status_code == 200
    for path in ws_paths():  # and no new socket opens with it
        with pytest.raises(InvalidStatus) as refused, key_socket(stack, raw, path):
            pass
        assert refused.value.response.status_code == 403


def test_revoking_the_account_closes_every_socket_it_holds(stack, live_demo):
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name="bridge", role=Role.VIEWER)
    _, raw = api_key_create(actor=admin, service_account=account)
    admin_access = token_pair(stack, admin.user.username)["access"]
    with key_socket(stack, raw) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
        assert subscribe(socket, "demo-general")["type"] == "subscribed"
        response = requests.post(
            f"{stack.base_url}/api/v1/service-accounts/{account.pk}/revoke/", headers=bearer(admin_access), timeout=10
        )
        assert response.status_code == 200, response.text
        assert close_code(socket) == CLOSE_ACCESS_REVOKED


def test_a_key_in_the_query_string_is_refused(stack, live_demo):
    """Query strings land in proxy and server logs: a key is accepted in the header only."""
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name="nightly", role=Role.CLINICIAN)
    _, raw = api_key_create(actor=admin, service_account=account)
    with pytest.raises(InvalidStatus) as refused, connect(f"{stack.ws_url}/ws/events/?token={raw}", open_timeout=10):
        pass
    assert refused.value.response.status_code == 403


def test_the_rate_is_shared_by_every_web_process(stack, live_demo):
    """This test process and the stack's server are two web processes: requests made here use up
    the key's minute for the server too, because both count in the stack's Redis."""
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    account = service_account_create(actor=admin, name="nightly", role=Role.CLINICIAN)
    _, raw = api_key_create(actor=admin, service_account=account, rate=5)
    shared = {"default": {**settings.CACHES["default"], "LOCATION": stack.redis_url}}
    if int(time.time()) % 60 > 50:  # all requests in one window
        time.sleep(61 - int(time.time()) % 60)
    with override_settings(CACHES=shared):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        for _ in range(3):
            assert client.get("/api/v1/images/").status_code == 200
    images = f"{stack.base_url}/api/v1/images/"
    for _ in range(2):
        assert requests.get(images, headers=bearer(raw), timeout=10).status_code == 200
    response = requests.get(images, headers=bearer(raw), timeout=10)
    assert response.status_code == 429, response.text
    assert_error_shape(response, "throttled")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
