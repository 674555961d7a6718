"""The access log in the Django admin: platform auditors only, and every read there is itself
an entry of the log, written in the transaction that reads the page."""

import pytest
from django.contrib.admin.templatetags import admin_list
from django.contrib.auth.models import Group, Permission
from django.db import connection

from accounts.models import AccessEvent
from accounts.services import access_event_record, user_get_or_create
from tests.conftest import PASSWORD

CHANGELIST = "/admin/accounts/accessevent/"


def staff(username: str, *, auditor: bool):
    user = user_get_or_create(username=username, password=PASSWORD)
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    if auditor:
        # the migration makes the group; a transactional test before this one may have flushed it
        group, _ = Group.objects.get_or_create(name="Platform auditors")
        permission = Permission.objects.get(codename="audit_all_hospitals", content_type__app_label="accounts")
        group.permissions.add(permission)
        user.groups.add(group)
    return user


@pytest.fixture
def entry(hospital_a):
    return access_event_record(action="image.view", username="someone", tenant=hospital_a, target_type="image")


@pytest.mark.django_db
def test_a_platform_auditor_reads_the_log_in_the_admin_and_each_read_is_logged(client, entry, hospital_a):
    auditor = staff("platform-auditor", auditor=True)
    client.force_login(auditor)
    response = client.get(CHANGELIST)
    assert response.status_code == 200 and b"image.view" in response.content
    listed = AccessEvent.objects.get(actor=auditor, action="audit.view", target_type="access_log")
    assert listed.outcome == "success"

    response = client.get(f"{CHANGELIST}{entry.pk}/change/")
    assert response.status_code == 200
    viewed = AccessEvent.objects.get(actor=auditor, action="audit.view", target_type="access_event")
    assert viewed.target_id == str(entry.pk) and viewed.tenant == hospital_a  # in that hospital's chain


@pytest.mark.django_db
def test_other_staff_get_403_and_their_attempt_is_logged(client, entry):
    operator = staff("operator", auditor=False)
    client.force_login(operator)
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(f"{CHANGELIST}{entry.pk}/change/").status_code == 403
    assert b"accessevent" not in client.get("/admin/").content  # not offered on the index either
    denied = AccessEvent.objects.filter(actor=operator, action="audit.view", outcome="denied")
    assert denied.count() == 2
    assert not AccessEvent.objects.filter(actor=operator, outcome="success", action="audit.view").exists()


@pytest.mark.django_db
def test_a_missing_entry_is_404_and_a_denied_read(client):
    auditor = staff("platform-auditor", auditor=True)
    client.force_login(auditor)
    assert client.get(f"{CHANGELIST}999999/change/").status_code == 404
    assert AccessEvent.objects.filter(actor=auditor, target_id="999999", outcome="denied").exists()


@pytest.mark.django_db
def test_when_the_audit_entry_cannot_be_written_the_page_is_not_shown(client, entry, monkeypatch):
    client.force_login(staff("platform-auditor", auditor=True))

    def broken(**kwargs):
        raise RuntimeError("the access log is unavailable")

    monkeypatch.setattr("audit.admin.access_event_record", broken)
    client.raise_request_exception = False
    response = client.get(CHANGELIST)
    assert response.status_code == 500 and b"image.view" not in response.content


@pytest.mark.django_db(transaction=True)
def test_the_rows_are_read_inside_the_transaction_that_records_the_read(client, entry, monkeypatch):
    """Admin pages render after the view returns; the rows must be read before the commit."""
    client.force_login(staff("platform-auditor", auditor=True))
    seen = []
    original = admin_list.items_for_result

    def recording(cl, result, form):
        seen.append(connection.in_atomic_block)
        yield from original(cl, result, form)

    monkeypatch.setattr(admin_list, "items_for_result", recording)
    assert client.get(CHANGELIST).status_code == 200
    assert seen and all(seen)
