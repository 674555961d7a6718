"""A hospital's called AE title (platform staff) and its sending nodes (tenant admins): the
services, the page, the command, and who the SCP lets in (caller_resolve)."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from accounts.models import AccessEvent, Role
from core.errors import Conflict, Forbidden, Invalid, NotFound
from dicomnet.models import DicomNode, HospitalAETitle
from dicomnet.nodes import (
    ae_title_clean,
    caller_resolve,
    dicom_node_create,
    dicom_node_deactivate,
    dicom_node_get,
    fingerprint_clean,
    hospital_ae_title_assign,
)
from tests.conftest import PASSWORD, member

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "admin-a", Role.TENANT_ADMIN)


@pytest.fixture
def admin_b(hospital_b):
    return member(hospital_b, "admin-b", Role.TENANT_ADMIN)


def node_for(admin, **changes):
    fields = {"name": "CT room 2", "ae_title": "CT2", "host": "127.0.0.1", **changes}
    return dicom_node_create(actor=admin, **fields)


@pytest.mark.parametrize(
    ("value", "kept"),
    [("CT2", "CT2"), ("  PACS_MAIN ", "PACS_MAIN"), ("A" * 16, "A" * 16), ("MR 1", "MR 1")],
)
def test_ae_titles_are_checked_as_ps3_5_says(value, kept):
    assert ae_title_clean(value) == kept


@pytest.mark.parametrize("value", ["", "    ", "A" * 17, "BAD\\AE", "TAB\tAE", "ÄRZTE", "NUL\x00"])
def test_a_bad_ae_title_is_refused_in_words(value):
    with pytest.raises(Invalid, match="AE title"):
        ae_title_clean(value)


def test_a_fingerprint_is_kept_as_lowercase_hex():
    digest = "AB:" * 31 + "AB"
    assert fingerprint_clean(digest) == "ab" * 32
    with pytest.raises(Invalid):
        fingerprint_clean("12:34")


def test_a_hospitals_ae_title_is_unique_across_the_platform(hospital_a, hospital_b):
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_GENERAL")
    with pytest.raises(Conflict, match="another hospital"):
        hospital_ae_title_assign(tenant=hospital_b, ae_title="SL_GENERAL")
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_GEN")  # changed, not added
    assert HospitalAETitle.objects.get(tenant=hospital_a).ae_title == "SL_GEN"
    assert AccessEvent.objects.filter(tenant=hospital_a, action="dicom.ae_title_assign").count() == 2


def test_the_command_assigns_a_title(hospital_a, capsys):
    call_command("dicom_ae_title", hospital_a.slug, "SL_GENERAL")
    assert HospitalAETitle.objects.get(tenant=hospital_a).ae_title == "SL_GENERAL"
    with pytest.raises(CommandError, match="No hospital"):
        call_command("dicom_ae_title", "nowhere", "X")
    with pytest.raises(CommandError, match="AE title"):
        call_command("dicom_ae_title", hospital_a.slug, "A" * 17)


def test_platform_staff_assign_it_in_the_django_admin(hospital_a):
    staff = get_user_model().objects.create_superuser(username="platform-staff", password=PASSWORD)
    browser = APIClient()
    browser.force_login(staff)
    response = browser.post("/admin/dicomnet/hospitalaetitle/add/", {"tenant": hospital_a.pk, "ae_title": "BAD\\TITLE"})
    assert response.status_code == 200 and b"backslash" in response.content
    response = browser.post("/admin/dicomnet/hospitalaetitle/add/", {"tenant": hospital_a.pk, "ae_title": "SL_GEN"})
    assert response.status_code == 302
    assigned = HospitalAETitle.objects.get(tenant=hospital_a)
    assert assigned.ae_title == "SL_GEN" and assigned.assigned_by == staff
    assert AccessEvent.objects.filter(action="dicom.ae_title_assign", actor=staff).exists()


def test_registering_a_node_makes_its_clinician_service_account(admin_a):
    node = node_for(admin_a)
    account = node.service_account
    assert account.membership.role == Role.CLINICIAN and account.membership.tenant == admin_a.tenant
    assert account.user.username.startswith(f"svc:{admin_a.tenant.slug}:dicom-ct2-")
    assert node.bind_host and node.is_active
    assert AccessEvent.objects.filter(action="dicom.node_create", target_id=str(node.pk)).exists()


def test_a_title_or_name_twice_is_refused(admin_a, admin_b):
    node_for(admin_a)
    with pytest.raises(Conflict, match="AE title"):
        node_for(admin_a, name="Other")
    with pytest.raises(Conflict, match="named"):
        node_for(admin_a, ae_title="CT3")
    node_for(admin_b)  # another hospital may use the same calling AE title


def test_only_hospital_admins_register_nodes(clinician_a):
    with pytest.raises(Forbidden):
        node_for(clinician_a)


def test_deactivating_a_node_revokes_its_service_account(admin_a):
    node = dicom_node_deactivate(actor=admin_a, node=node_for(admin_a))
    assert not node.is_active and node.service_account.revoked_at is not None
    assert not node.service_account.membership.is_active
    assert AccessEvent.objects.filter(action="dicom.node_deactivate", target_id=str(node.pk)).exists()


def test_another_hospitals_node_is_404(admin_a, admin_b):
    node = node_for(admin_a)
    with pytest.raises(NotFound):
        dicom_node_get(actor=admin_b, node_id=node.pk)


def test_who_the_scp_lets_in(admin_a, admin_b, hospital_a, hospital_b):
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_A")
    hospital_ae_title_assign(tenant=hospital_b, ae_title="SL_B")
    node = node_for(admin_a)
    unbound = node_for(admin_a, name="PACS", ae_title="PACS", host="10.9.9.9", bind_host=False)

    assert caller_resolve(called_ae="SL_A", calling_ae="CT2", address="127.0.0.1").node == node
    assert caller_resolve(called_ae="SL_A ", calling_ae="CT2 ", address="127.0.0.1").node == node  # padded
    assert caller_resolve(called_ae="SL_A", calling_ae="PACS", address="10.1.2.3").node == unbound
    wrong_host = caller_resolve(called_ae="SL_A", calling_ae="CT2", address="10.1.2.3")
    assert wrong_host.node is None and wrong_host.hospital.tenant == hospital_a
    # the same calling AE title calling another hospital is not that hospital's node
    other = caller_resolve(called_ae="SL_B", calling_ae="CT2", address="127.0.0.1")
    assert other.node is None and other.hospital.tenant == hospital_b
    assert caller_resolve(called_ae="NOBODY", calling_ae="CT2", address="127.0.0.1").hospital is None
    dicom_node_deactivate(actor=admin_a, node=node)
    assert caller_resolve(called_ae="SL_A", calling_ae="CT2", address="127.0.0.1").node is None


def test_the_page_registers_and_deactivates_a_node(admin_a, hospital_a):
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_GEN")
    browser = APIClient()
    browser.force_login(admin_a.user)
    page = browser.get("/dicom/nodes/")
    assert page.status_code == 200 and b"SL_GEN" in page.content and b"No nodes registered yet" in page.content
    response = browser.post(
        "/dicom/nodes/create/", {"name": "CT room 2", "ae_title": "CT2", "host": "10.0.4.21", "bind_host": "on"}
    )
    assert response.status_code == 302
    node = DicomNode.objects.get(tenant=hospital_a)
    assert (node.ae_title, node.host, node.bind_host) == ("CT2", "10.0.4.21", True)
    assert b'data-node="CT2"' in browser.get("/dicom/nodes/").content
    refused = browser.post("/dicom/nodes/create/", {"name": "X", "ae_title": "A\\B", "host": "10.0.4.22"})
    assert refused.status_code == 400 and b"backslash" in refused.content
    response = browser.post(f"/dicom/nodes/{node.pk}/deactivate/")
    assert response.status_code == 302
    node.refresh_from_db()
    assert not node.is_active


def test_the_page_is_for_admins_and_their_own_nodes(admin_a, admin_b, clinician_a):
    node = node_for(admin_a)
    browser = APIClient()
    browser.force_login(clinician_a.user)
    assert browser.get("/dicom/nodes/").status_code == 403
    browser.force_login(admin_b.user)
    assert browser.post(f"/dicom/nodes/{node.pk}/deactivate/").status_code == 404
    node.refresh_from_db()
    assert node.is_active


def test_a_deactivated_node_is_reactivated_with_a_new_service_account(admin_a, hospital_a):
    from dicomnet.nodes import dicom_node_reactivate

    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_A")
    node = dicom_node_deactivate(actor=admin_a, node=node_for(admin_a))
    old_account = node.service_account
    with pytest.raises(Conflict, match="reactivate"):
        node_for(admin_a, name="CT again")  # its AE title is still its own
    node = dicom_node_reactivate(actor=admin_a, node=node)
    assert node.is_active and node.service_account != old_account
    assert node.service_account.revoked_at is None and node.service_account.membership.is_active
    assert node.service_account.membership.role == Role.CLINICIAN
    old_account.refresh_from_db()
    assert old_account.revoked_at is not None  # revocation is for good
    assert AccessEvent.objects.filter(action="dicom.node_reactivate", target_id=str(node.pk)).exists()
    assert caller_resolve(called_ae="SL_A", calling_ae="CT2", address="127.0.0.1").node == node
    # and again: each reactivation has its own account
    dicom_node_deactivate(actor=admin_a, node=node)
    assert dicom_node_reactivate(actor=admin_a, node=node).is_active


def test_the_page_reactivates_a_node_and_sets_its_lane(admin_a, admin_b):
    node = dicom_node_deactivate(actor=admin_a, node=node_for(admin_a))
    browser = APIClient()
    browser.force_login(admin_b.user)
    assert browser.post(f"/dicom/nodes/{node.pk}/reactivate/").status_code == 404
    assert browser.post(f"/dicom/nodes/{node.pk}/lane/", {"interactive": "on"}).status_code == 404
    browser.force_login(admin_a.user)
    assert b"Reactivate" in browser.get("/dicom/nodes/").content
    assert browser.post(f"/dicom/nodes/{node.pk}/reactivate/").status_code == 302
    node.refresh_from_db()
    assert node.is_active and not node.service_account.interactive
    assert browser.post(f"/dicom/nodes/{node.pk}/lane/", {"interactive": "on"}).status_code == 302
    node.service_account.refresh_from_db()
    assert node.service_account.interactive
    assert browser.post(f"/dicom/nodes/{node.pk}/lane/", {}).status_code == 302
    node.service_account.refresh_from_db()
    assert not node.service_account.interactive
    assert AccessEvent.objects.filter(action="dicom.node_bulk", target_id=str(node.pk)).exists()


def test_a_node_registered_interactive_says_so(admin_a):
    assert not node_for(admin_a).service_account.interactive
    assert node_for(admin_a, name="ED CT", ae_title="EDCT", interactive=True).service_account.interactive
