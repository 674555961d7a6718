"""The hospital settings page: a hospital's tenant admins turn browser screening on, choose its
model and its routing; every change is logged in the same transaction; other roles get 403, and
each hospital sees and changes only its own settings."""

import pytest
from django.urls import reverse

from accounts.models import AccessEvent, Role
from core.errors import Unprocessable
from recognition.models import HospitalSettings
from recognition.screening import hospital_settings_for
from recognition.services.screening import hospital_settings_update
from tests.conftest import member
from tests.integration.test_second_factor import verified_browser, with_device
from tests.screening import screening_version

pytestmark = pytest.mark.django_db
URL = "/settings/"


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


@pytest.fixture
def admin_b(hospital_b):
    return member(hospital_b, "admin-b", Role.TENANT_ADMIN)


@pytest.fixture
def screen():
    return screening_version()


def form(version=None, **overrides):
    data = {
        "screening_enabled": "on",
        "screening_version": str(version.pk) if version else "",
        "negative_threshold": "0.97",
        "negative_max_wait_seconds": "600",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def signed_in(client, membership):
    client.force_login(membership.user)
    return client


def test_an_admin_turns_screening_on_with_a_screening_model_and_the_change_is_logged(client, admin_a, screen):
    signed_in(client, admin_a)
    page = client.get(URL)
    assert page.status_code == 200
    assert f'<option value="{screen.pk}"' in page.content.decode()
    response = client.post(URL, form(screen, route_negatives_to_bulk="on"))
    assert response.status_code == 302
    row = HospitalSettings.objects.get(tenant=admin_a.tenant)
    assert (row.screening_enabled, row.screening_version, row.route_negatives_to_bulk) == (True, screen, True)
    assert (row.negative_threshold, row.negative_max_wait_seconds, row.updated_by) == (0.97, 600, admin_a.user)
    logged = AccessEvent.objects.get(action="hospital.settings_update")
    assert (logged.actor, logged.tenant, logged.target_id) == (admin_a.user, admin_a.tenant, str(row.pk))


def test_routing_negatives_is_off_until_an_admin_turns_it_on(admin_a, screen):
    assert hospital_settings_for(admin_a.tenant).route_negatives_to_bulk is False
    row = hospital_settings_update(
        membership=admin_a,
        screening_enabled=True,
        screening_version_id=screen.pk,
        route_negatives_to_bulk=False,
        negative_threshold=0.95,
        negative_max_wait_seconds=900,
    )
    assert row.route_negatives_to_bulk is False


@pytest.mark.parametrize(
    "kind",
    ["not ready", "not confirmed for browsers", "a reads model", "no such version"],
)
def test_only_a_ready_screening_model_confirmed_for_browsers_can_be_chosen(client, request, admin_a, kind):
    version = {
        "not ready": lambda: screening_version("0.9.0", ready=False),
        "not confirmed for browsers": lambda: screening_version("0.8.0", confirmed=False),
        "a reads model": lambda: request.getfixturevalue("demo_model"),
        "no such version": lambda: None,
    }[kind]()
    signed_in(client, admin_a)
    response = client.post(URL, form(screening_version=str(version.pk) if version else "999999"))
    assert response.status_code == 422
    assert "not a screening model the hospital can use" in response.content.decode()
    assert not HospitalSettings.objects.exists()
    assert not AccessEvent.objects.filter(action="hospital.settings_update").exists()
    if version is not None and version.model.name == "sightline-screen":
        assert f'<option value="{version.pk}"' not in client.get(URL).content.decode()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"negative_threshold": "1"}, "between 0 and 1"),
        ({"negative_threshold": "0"}, "between 0 and 1"),
        ({"negative_threshold": "lots"}, "probability"),
        ({"negative_max_wait_seconds": "0"}, "maximum wait"),
        ({"negative_max_wait_seconds": "9999999"}, "maximum wait"),
    ],
)
def test_bad_numbers_are_refused_in_words_and_nothing_is_written(client, admin_a, screen, fields, says):
    signed_in(client, admin_a)
    response = client.post(URL, form(screen, **fields))
    assert response.status_code == 422
    assert says in response.content.decode()
    assert not HospitalSettings.objects.exists()


def test_screening_on_needs_a_model(admin_a):
    with pytest.raises(Unprocessable, match="Choose a screening model"):
        hospital_settings_update(
            membership=admin_a,
            screening_enabled=True,
            screening_version_id=None,
            route_negatives_to_bulk=False,
            negative_threshold=0.95,
            negative_max_wait_seconds=900,
        )


@pytest.mark.parametrize("persona", ["clinician_a", "viewer_a"])
def test_clinical_roles_get_403_and_the_denial_is_logged(client, request, persona, screen):
    membership = request.getfixturevalue(persona)
    signed_in(client, membership)
    assert client.get(URL).status_code == 403
    assert client.post(URL, form(screen)).status_code == 403
    assert not HospitalSettings.objects.exists()
    assert AccessEvent.objects.filter(actor=membership.user, action="hospital.settings", outcome="denied").exists()


def test_an_auditor_gets_403(client, hospital_a):
    auditor = member(hospital_a, "auditor-a", Role.AUDITOR)
    signed_in(client, auditor)
    assert client.get(URL).status_code == 403


def test_hospital_b_sees_and_changes_only_its_own_settings(client, admin_a, admin_b, screen):
    hospital_settings_update(
        membership=admin_a,
        screening_enabled=True,
        screening_version_id=screen.pk,
        route_negatives_to_bulk=True,
        negative_threshold=0.99,
        negative_max_wait_seconds=120,
    )
    signed_in(client, admin_b)
    page = client.get(URL).content.decode()
    assert admin_b.tenant.name.replace("'", "&#x27;") in page
    assert 'value="0.99"' not in page and 'value="120"' not in page
    assert client.post(URL, form(screen, negative_threshold="0.9")).status_code == 302
    a, b = (HospitalSettings.objects.get(tenant=m.tenant) for m in (admin_a, admin_b))
    assert (a.negative_threshold, a.negative_max_wait_seconds, a.updated_by) == (0.99, 120, admin_a.user)
    assert (b.negative_threshold, b.updated_by) == (0.9, admin_b.user)


def test_a_hospital_that_asks_for_a_second_factor_refuses_an_unverified_admin(client, admin_a, screen, settings):
    settings.OTP_TOTP_THROTTLE_FACTOR = 0
    admin_a.tenant.require_admin_two_factor = True
    admin_a.tenant.save(update_fields=["require_admin_two_factor"])
    signed_in(client, admin_a)
    refused = client.get(URL)
    assert refused.status_code == 403
    assert "one-time code" in refused.content.decode()
    with_device(admin_a)
    client.logout()
    verified_browser(client, admin_a)
    assert client.get(URL).status_code == 200
    assert client.post(URL, form(screen)).status_code == 302


def test_the_nav_links_the_page_for_admins_only(client, admin_a, clinician_a):
    assert 'href="/settings/"' in signed_in(client, admin_a).get(reverse("members")).content.decode()
    client.logout()
    assert 'href="/settings/"' not in signed_in(client, clinician_a).get("/worklist/").content.decode()
