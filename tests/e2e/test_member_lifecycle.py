"""End to end in headless Chromium: a hospital admin invites, re-roles and removes a member.

Run in a pytest process of its own (``-m browser``), like tests/e2e/test_browser.py.
The invitation e-mail is read from the web server's log (the stack prints mail to stdout).
"""

from __future__ import annotations

import re
import time
import uuid

import pytest
from playwright.sync_api import expect

from accounts.models import Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from tests.conftest import PASSWORD

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

expect.set_options(timeout=30_000)
INVITEE_PASSWORD = "Lumbar-Quartz-Meadow-47"


def new_context(browser):
    context = browser.new_context()
    context.set_default_timeout(30_000)
    return context


def sign_in(page, stack, username, password, next_path):
    page.goto(f"{stack.base_url}/accounts/login/?next={next_path}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")


def invitation_link(stack, email: str, timeout: float = 30) -> str:
    """The link in the invitation e-mail to ``email``, from the web server's log."""
    log = stack.logs / "web.log"
    pattern = re.compile(
        rf"^To: {re.escape(email)}$.*?^(https?://\S+/invitations/[A-Za-z0-9_-]+/)$", re.MULTILINE | re.DOTALL
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.2)
    pytest.fail(f"no invitation e-mail to {email} in {log}:\n{log.read_text(errors='replace')[-3000:]}")


def test_an_admin_invites_re_roles_and_removes_a_member(stack, live_demo, chromium):
    browser = chromium
    admin = user_get_or_create(username="hospital-admin", password=PASSWORD)
    membership_grant(tenant=Tenant.objects.get(slug="demo-general"), user=admin, role=Role.TENANT_ADMIN)
    suffix = uuid.uuid4().hex[:8]
    email, username = f"new.member.{suffix}@hospital.example", f"new-member-{suffix}"

    admin_context = new_context(browser)
    invitee_context = new_context(browser)
    try:
        # the admin invites someone as a clinician
        page = admin_context.new_page()
        sign_in(page, stack, "hospital-admin", PASSWORD, "/hospital/members/")
        expect(page.locator("h1")).to_contain_text("Members")
        page.goto(f"{stack.base_url}/hospital/members/")
        page.fill("#invite-email", email)
        page.select_option("#invite-role", Role.CLINICIAN.value)
        page.locator("#invite-form button").click()
        expect(page.locator(".messages")).to_contain_text("Invitation sent")
        expect(page.locator("body")).to_contain_text(f"{email} as Clinician")

        link = invitation_link(stack, email)
        assert link.startswith(f"{stack.base_url}/invitations/"), link  # the stack's own host

        # the invitee opens the link in a browser of their own and signs up
        invitee = invitee_context.new_page()
        invitee.goto(link)
        expect(invitee.locator("h1")).to_contain_text("Join Demo General")
        expect(invitee.locator("main")).to_contain_text("You are invited as Clinician")
        invitee.fill("#id_username", username)
        invitee.fill("#id_password1", INVITEE_PASSWORD)
        invitee.fill("#id_password2", INVITEE_PASSWORD)
        invitee.locator("#accept-form button[type=submit]").click()
        expect(invitee.locator("h1")).to_contain_text("Worklist")
        expect(invitee.locator(".messages")).to_contain_text("Welcome to Demo General")
        expect(invitee.locator("#live")).to_have_attribute("data-state", "live")

        # the link worked once
        again = invitee_context.new_page()
        assert again.goto(link).status == 410
        again.close()

        # the admin sees the new member and makes them a viewer
        page.reload()
        row = page.locator(f'tr[data-member="{username}"]')
        expect(row.locator("[data-role=state]")).to_have_text("active")
        expect(row.locator("select")).to_have_value(Role.CLINICIAN.value)
        row.locator("select").select_option(Role.VIEWER.value)
        row.get_by_role("button", name="Change role").click()
        expect(page.locator(".messages")).to_contain_text(f"{username} is now Viewer")
        row = page.locator(f'tr[data-member="{username}"]')
        expect(row.locator("select")).to_have_value(Role.VIEWER.value)

        # a viewer still reads the worklist and keeps the live feed
        invitee.reload()
        expect(invitee.locator("h1")).to_contain_text("Worklist")
        expect(invitee.locator("#live")).to_have_attribute("data-state", "live")

        # the admin removes them, confirming the browser's dialog
        dialogs = []

        def accept(dialog):
            dialogs.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        row.get_by_role("button", name="Deactivate").click()
        expect(page.locator(".messages")).to_contain_text(f"{username} no longer has access to Demo General")
        assert dialogs == [f"Remove {username}'s access to Demo General?"]
        row = page.locator(f'tr[data-member="{username}"]')
        expect(row.locator("[data-role=state]")).to_have_text("deactivated")
        expect(row.get_by_role("button", name="Deactivate")).to_have_count(0)
        expect(row.locator("select")).to_have_count(0)

        # at once: the open page's live feed is closed, and the next page load is refused
        expect(invitee.locator("#live")).to_have_attribute("data-state", "offline")
        response = invitee.reload()
        assert response.status == 403
        expect(invitee.locator("h1")).to_contain_text("Not allowed")
    finally:
        invitee_context.close()
        admin_context.close()
