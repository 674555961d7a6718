"""Losing access takes effect at once, on the live stack: open sockets close, old tokens stop working.

Every check runs against the real Daphne server and its Redis channel layer (the ``stack``
fixture). Rows are committed (``transactional_db`` through ``live_demo``), so the server sees them.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import pytest
import requests
from django.conf import settings
from django.test import override_settings
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from accounts.models import Membership, Role, Tenant
from accounts.permissions import Action, can
from accounts.services import membership_grant, user_deactivate, user_get_or_create
from recognition.routing import websocket_urlpatterns
from tests.conftest import PASSWORD, png_bytes

pytestmark = pytest.mark.e2e

CLOSE_ACCESS_REVOKED = 4403
FOREIGN_ORIGIN = "http://evil.example"


# -- helpers ------------------------------------------------------------------------------------


def member(username: str, tenant_slug: str, role: Role) -> Membership:
    """A committed user with one membership (the fixture's database is transactional)."""
    user = user_get_or_create(username=username, password=PASSWORD)
    return membership_grant(tenant=Tenant.objects.get(slug=tenant_slug), user=user, role=role)


def token_pair(stack, username: str) -> dict:
    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": username, "password": PASSWORD}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def bearer(access: str) -> dict:
    return {"Authorization": f"Bearer {access}"}


def ws_paths() -> list[str]:
    """Every WebSocket route, as a path. A route with parameters needs this test extended."""
    paths = []
    for route in websocket_urlpatterns:
        pattern = str(route.pattern).removeprefix("^").removesuffix("$")
        assert "<" not in pattern and "(" not in pattern, f"route {pattern!r} has parameters: extend this test"
        paths.append("/" + pattern)
    assert paths, "no WebSocket routes"
    return paths


@contextmanager
def open_socket(stack, access: str, path: str = "/ws/events/"):
    with connect(f"{stack.ws_url}{path}?token={access}", open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
        yield socket


def subscribe(socket, tenant: str) -> dict:
    socket.send(json.dumps({"type": "subscribe", "tenant": tenant}))
    return json.loads(socket.recv(timeout=10))


@contextmanager
def open_feed(stack, access: str, tenant: str):
    """A socket subscribed to one hospital's feed."""
    with open_socket(stack, access) as socket:
        assert subscribe(socket, tenant) == {"type": "subscribed", "tenant": tenant}
        yield socket


def assert_alive(socket) -> None:
    """The socket still answers, and nothing else arrived before the answer."""
    socket.send(json.dumps({"type": "ping"}))
    assert json.loads(socket.recv(timeout=10)) == {"type": "pong"}


def close_code(socket, timeout: float = 10) -> int | None:
    """Waits for the server to close the socket; nothing may arrive before the close."""
    try:
        message = socket.recv(timeout=timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    except TimeoutError:
        pytest.fail(f"the server left the socket open for {timeout} s")
    pytest.fail(f"the socket stayed open and received {message!r}")


def assert_error_shape(response, *codes: str) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] in codes, body


def stack_channel_layers(stack) -> dict:
    """This process's channel-layer settings, pointed at the stack's Redis."""
    layers = json.loads(json.dumps(settings.CHANNEL_LAYERS))
    for host in layers["default"]["CONFIG"]["hosts"]:
        host["address"] = stack.redis_url
    return layers


def session_cookie_header(stack, username: str) -> str:
    """Signs in through the login page, as a browser does, and returns its cookies."""
    browser = requests.Session()
    login = f"{stack.base_url}/accounts/login/"
    browser.get(login, timeout=10).raise_for_status()
    response = browser.post(
        login,
        data={
            "username": username,
            "password": PASSWORD,
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
        },
        headers={"Referer": login},
        timeout=10,
    )
    assert response.status_code == 200 and "sessionid" in browser.cookies, response.text[:500]
    return "; ".join(f"{name}={value}" for name, value in browser.cookies.items())


# -- 1. a membership deactivated ---------------------------------------------------------------


def test_deactivating_a_membership_closes_the_socket_and_refuses_the_token_at_once(stack, live_demo):
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    target = Membership.objects.get(user__username="clinician", tenant__slug="demo-general")
    access = token_pair(stack, "clinician")["access"]
    admin_access = token_pair(stack, admin.user.username)["access"]
    images = f"{stack.base_url}/api/v1/images/"
    assert requests.get(images, headers=bearer(access), timeout=10).status_code == 200  # before: it works

    with open_feed(stack, access, "demo-general") as socket:
        started = time.monotonic()
        response = requests.post(
            f"{stack.base_url}/api/v1/members/{target.pk}/deactivate/", headers=bearer(admin_access), timeout=10
        )
        assert response.status_code == 200, response.text
        assert response.json()["is_active"] is False
        assert close_code(socket) == CLOSE_ACCESS_REVOKED
        elapsed = time.monotonic() - started
    print(f"\nmembership deactivated → socket closed with 4403: {elapsed * 1000:.0f} ms")

    response = requests.get(images, headers=bearer(access), timeout=10)  # the same, still unexpired token
    assert response.status_code in (403, 404), response.text
    assert_error_shape(response, "forbidden", "not_found")

    # the user is still a user, so a new socket opens, but the hospital is gone from it
    with open_socket(stack, access) as socket:
        refused = subscribe(socket, "demo-general")
        assert refused["type"] == "error" and refused["code"] == "not_found", refused
        assert_alive(socket)


def test_losing_one_of_two_hospitals_closes_only_that_feed(stack, live_demo):
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    both = member("clinician-both", "demo-general", Role.CLINICIAN)
    member("clinician-both", "demo-childrens", Role.CLINICIAN)
    access = token_pair(stack, "clinician-both")["access"]
    admin_access = token_pair(stack, admin.user.username)["access"]
    uploader = token_pair(stack, "clinician")["access"]

    with open_feed(stack, access, "demo-general") as socket, open_feed(stack, uploader, "demo-general") as watcher:
        assert subscribe(socket, "demo-childrens") == {"type": "subscribed", "tenant": "demo-childrens"}
        response = requests.post(
            f"{stack.base_url}/api/v1/members/{both.pk}/deactivate/", headers=bearer(admin_access), timeout=10
        )
        assert response.status_code == 200, response.text
        assert_alive(socket)  # the other hospital's feed keeps the socket open

        response = requests.post(
            f"{stack.base_url}/api/v1/images/",
            headers=bearer(uploader),
            files={"file": ("scan.png", png_bytes(seed=61), "image/png")},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        image_id = response.json()["id"]
        deadline = time.monotonic() + 60
        while True:  # the hospital's feed still works for its members
            message = json.loads(watcher.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("type") == "result.ready" and message["image"] == image_id:
                break
        assert_alive(socket)  # the pong came first: demo-general's result never reached the removed member


# -- 2. a user deactivated ---------------------------------------------------------------------


def test_deactivating_a_user_ends_their_tokens_refresh_and_sockets(stack, live_demo):
    from django.contrib.auth import get_user_model

    pair = token_pair(stack, "clinician")
    user = get_user_model().objects.get(username="clinician")

    with open_feed(stack, pair["access"], "demo-general") as socket:
        # the platform-staff action has no API: run it here for its database effect, with this
        # process's channel layer pointed at the stack's Redis so its notice reaches the server
        with override_settings(CHANNEL_LAYERS=stack_channel_layers(stack)):
            user_deactivate(user=user)
        assert close_code(socket) == CLOSE_ACCESS_REVOKED

    response = requests.get(f"{stack.base_url}/api/v1/images/", headers=bearer(pair["access"]), timeout=10)
    assert response.status_code == 401, response.text
    assert "error" in response.json()

    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/refresh/", json={"refresh": pair["refresh"]}, timeout=10
    )
    assert response.status_code == 401, response.text
    assert "access" not in response.json() and "error" in response.json()

    response = requests.post(
        f"{stack.base_url}/api/v1/auth/token/", json={"username": "clinician", "password": PASSWORD}, timeout=10
    )
    assert response.status_code == 401, response.text  # and no new pair either

    for path in ws_paths():
        with (
            pytest.raises(InvalidStatus) as refused,
            connect(f"{stack.ws_url}{path}?token={pair['access']}", open_timeout=10),
        ):
            pass
        assert refused.value.response.status_code == 403


# -- 3. a role changed -------------------------------------------------------------------------


def test_a_role_without_events_subscribe_closes_the_feed(stack, live_demo):
    admin = member("admin-general", "demo-general", Role.TENANT_ADMIN)
    target = Membership.objects.get(user__username="clinician", tenant__slug="demo-general")
    access = token_pair(stack, "clinician")["access"]
    admin_access = token_pair(stack, admin.user.username)["access"]
    detail = f"{stack.base_url}/api/v1/members/{target.pk}/"
    assert can(Membership(role=Role.VIEWER, is_active=True), Action.EVENTS_SUBSCRIBE)
    assert not can(Membership(role=Role.AUDITOR, is_active=True), Action.EVENTS_SUBSCRIBE)

    with open_feed(stack, access, "demo-general") as socket:
        # a role that keeps the action keeps the feed
        response = requests.patch(detail, json={"role": "viewer"}, headers=bearer(admin_access), timeout=10)
        assert response.status_code == 200 and response.json()["role"] == "viewer", response.text
        assert_alive(socket)
        assert subscribe(socket, "demo-general") == {"type": "subscribed", "tenant": "demo-general"}

        response = requests.patch(detail, json={"role": "auditor"}, headers=bearer(admin_access), timeout=10)
        assert response.status_code == 200 and response.json()["role"] == "auditor", response.text
        assert close_code(socket) == CLOSE_ACCESS_REVOKED


# -- 4. the role → action table at the socket --------------------------------------------------


@pytest.mark.parametrize("role", list(Role), ids=[str(role) for role in Role])
def test_subscribing_follows_the_role_table(stack, live_demo, role):
    from accounts.models import AccessEvent

    membership = member(f"member-{role}", "demo-general", role)
    access = token_pair(stack, membership.user.username)["access"]
    denials = AccessEvent.objects.filter(action="events.subscribe", outcome="denied", actor=membership.user)
    with open_socket(stack, access) as socket:
        answer = subscribe(socket, "demo-general")
        if can(membership, Action.EVENTS_SUBSCRIBE):
            assert answer == {"type": "subscribed", "tenant": "demo-general"}
            assert not denials.exists()
        else:
            assert answer["type"] == "error" and answer["code"] == "forbidden", answer
            # the refused subscription is in the access log, once, with who, what and where
            (entry,) = denials
            assert (entry.tenant_id, entry.target_type, entry.target_id) == (
                membership.tenant_id,
                "tenant",
                "demo-general",
            )
        assert_alive(socket)


def test_no_route_lets_another_hospitals_member_subscribe(stack, live_demo):
    access = token_pair(stack, "clinician-b")["access"]
    for path in ws_paths():
        with open_socket(stack, access, path) as socket:
            answer = subscribe(socket, "demo-general")
            assert answer["type"] == "error" and answer["code"] == "not_found", (path, answer)
            assert_alive(socket)  # nothing else came first
            answer = subscribe(socket, "no-such-hospital")  # the same answer as a hospital that does not exist
            assert answer["type"] == "error" and answer["code"] == "not_found", (path, answer)
            assert_alive(socket)


def test_a_session_socket_from_a_foreign_origin_is_refused(stack, live_demo):
    cookies = session_cookie_header(stack, "clinician")
    for path in ws_paths():
        url = f"{stack.ws_url}{path}"
        with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=10, origin=FOREIGN_ORIGIN):
            pass
        assert refused.value.response.status_code == 403
        with (
            pytest.raises(InvalidStatus) as refused,
            connect(url, open_timeout=10, origin=FOREIGN_ORIGIN, additional_headers={"Cookie": cookies}),
        ):
            pass
        assert refused.value.response.status_code == 403, path  # a valid session does not help a foreign page
        # the same cookie from the site's own origin works: the refusal above was the origin's
        with connect(url, open_timeout=10, origin=stack.base_url, additional_headers={"Cookie": cookies}) as socket:
            assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
            assert subscribe(socket, "demo-general") == {"type": "subscribed", "tenant": "demo-general"}


# -- sockets end with the credentials that opened them -----------------------------------------


def test_signing_out_closes_the_sessions_sockets(stack, live_demo):
    browser = requests.Session()
    login = f"{stack.base_url}/accounts/login/"
    browser.get(login, timeout=10).raise_for_status()
    browser.post(
        login,
        data={"username": "clinician", "password": PASSWORD, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
        headers={"Referer": login},
        timeout=10,
    ).raise_for_status()
    cookies = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    url = f"{stack.ws_url}/ws/events/"
    with connect(url, open_timeout=10, origin=stack.base_url, additional_headers={"Cookie": cookies}) as socket:
        assert json.loads(socket.recv(timeout=10)) == {"type": "hello"}
        assert subscribe(socket, "demo-general")["type"] == "subscribed"
        response = browser.post(
            f"{stack.base_url}/accounts/logout/",
            data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]},
            headers={"Referer": login},
            timeout=10,
        )
        assert response.status_code == 200
        assert close_code(socket) == 4403


def test_a_socket_closes_when_its_token_expires(stack, live_demo):
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    user = get_user_model().objects.get(username="clinician")
    short = AccessToken.for_user(user)
    short.set_exp(lifetime=timedelta(seconds=3))
    with open_feed(stack, str(short), "demo-general") as socket:
        time.sleep(3.5)
        socket.send(json.dumps({"type": "subscribe", "tenant": "demo-general"}))
        assert close_code(socket) == 4401
