"""Pages for people: sign-in with an optional second factor, members, invitations, service
accounts (the access log's pages are the audit app's: audit/views.py)."""

from __future__ import annotations

from urllib.parse import urlencode

import segno
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.db import transaction
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from core.errors import Conflict, DomainError, Invalid

from .lockout import ACCOUNT_LOCKED_MESSAGE, sign_in_is_locked, sign_in_second_factor_failed
from .models import Role
from .selectors import activity_list, invitation_list, membership_for_session, membership_get, membership_list
from .service_accounts import (
    API_KEY_RATE_MAX,
    SERVICE_ACCOUNT_ROLE_CHOICES,
    api_key_create,
    api_key_get,
    api_key_revoke,
    service_account_create,
    service_account_get,
    service_account_list,
    service_account_revoke,
)
from .services import (
    invitation_accept,
    invitation_create,
    invitation_for_token,
    membership_change_role,
    membership_deactivate,
)
from .two_factor import (
    confirmed_device,
    device_enrol,
    device_reset,
    enrolment_code_issue,
    enrolment_code_required,
    recovery_codes_left,
    recovery_codes_replace,
    second_factor_verify,
    users_with_second_factor,
)

PENDING_USER = "two_factor_pending_user"
PENDING_BACKEND = "two_factor_pending_backend"
PENDING_DEVICE = "two_factor_pending_device"  # the authenticator this session is enrolling
QR_SCALE = 4  # pixels per QR module in the enrolment code
RECENT_ACTIVITY = 20  # access-log entries on the members page


def _no_store(response):
    """Pages that show a code once: never kept by the browser or a proxy."""
    response["Cache-Control"] = "no-store"
    return response


def _locked_page(request):
    message = ACCOUNT_LOCKED_MESSAGE if getattr(request, "sightline_account_locked", False) else ""
    return render(request, "registration/locked_out.html", {"message": message}, status=429)


class SignInView(auth_views.LoginView):
    """Password first; a user with a confirmed authenticator then gives a one-time code."""

    def form_valid(self, form):
        user = form.get_user()
        if confirmed_device(user) is None:
            return super().form_valid(form)
        self.request.session.cycle_key()
        self.request.session[PENDING_USER] = user.pk
        self.request.session[PENDING_BACKEND] = user.backend
        return redirect(f"{reverse('two-factor-verify')}?{urlencode({'next': self.get_success_url()})}")

    def form_invalid(self, form):
        if getattr(self.request, "sightline_account_locked", False):  # accounts.lockout
            return _locked_page(self.request)
        return super().form_invalid(form)


@require_http_methods(["GET", "POST"])
def two_factor_verify(request):
    user_id = request.session.get(PENDING_USER)
    if user_id is None:
        return redirect("login")
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    device = confirmed_device(user) if user else None
    if device is None:
        return redirect("login")
    error = ""
    if request.method == "POST":
        if sign_in_is_locked(request=request, username=user.get_username()):
            request.session.flush()
            return _locked_page(request)
        factor = second_factor_verify(user=user, code=request.POST.get("code", ""), request=request)
        if factor is not None:
            backend = request.session.pop(PENDING_BACKEND)
            request.session.pop(PENDING_USER)
            login(request, user, backend=backend)
            otp_login(request, factor.device)
            if factor.method == "recovery_code":
                messages.warning(
                    request,
                    f"You signed in with a recovery code; {recovery_codes_left(user)} left. "
                    "Make new ones under Two-factor sign-in.",
                )
            target = request.GET.get("next", "")
            safe = url_has_allowed_host_and_scheme(
                target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
            )
            return redirect(target if safe else "recognition:home")
        sign_in_second_factor_failed(request=request, user=user)
        if getattr(request, "axes_locked_out", False) or getattr(request, "sightline_account_locked", False):
            request.session.flush()
            return _locked_page(request)
        error = "That code is not valid. Codes change every 30 seconds; a recovery code works once."
    return render(request, "registration/two_factor_verify.html", {"error": error})


@login_required
@require_http_methods(["GET", "POST"])
def two_factor_setup(request):
    user = request.user
    confirmed = confirmed_device(user)
    if confirmed is not None:
        context = {"confirmed": True, "verified": user.is_verified(), "recovery_left": recovery_codes_left(user)}
        if request.method == "POST" and request.POST.get("action") == "recovery_codes":
            if not user.is_verified():
                context["error"] = "Sign out and in again with a code before making new recovery codes."
            else:
                context["recovery_codes"] = recovery_codes_replace(user=user, request=request)
                return _no_store(render(request, "accounts/two_factor.html", context))
        return render(request, "accounts/two_factor.html", context)
    # one pending authenticator per session: a secret shown to one session (say, someone else
    # holding the password) is never the one another session confirms
    device = TOTPDevice.objects.filter(pk=request.session.get(PENDING_DEVICE), user=user, confirmed=False).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name="Authenticator", confirmed=False)
        request.session[PENDING_DEVICE] = device.pk
    needs_code = enrolment_code_required(user)
    error = ""
    if request.method == "POST":
        try:
            codes = device_enrol(
                user=user,
                device=device,
                code=request.POST.get("code", ""),
                enrolment_code=request.POST.get("enrolment_code", ""),
                request=request,
            )
        except DomainError as exc:
            error = exc.message
        else:
            request.session.pop(PENDING_DEVICE, None)
            otp_login(request, device)
            context = {"confirmed": True, "verified": True, "recovery_codes": codes, "enrolled": True}
            return _no_store(render(request, "accounts/two_factor.html", context))
    qr = segno.make(device.config_url, error="m").svg_inline(scale=QR_SCALE)
    return _no_store(
        render(
            request,
            "accounts/two_factor.html",
            {"qr": qr, "secret": device.config_url, "error": error, "needs_enrolment_code": needs_code},
        )
    )


def _members_render(request, actor, **extra):
    members = list(membership_list(actor=actor, request=request))
    with_device = users_with_second_factor([m.user_id for m in members])
    for member in members:
        member.has_second_factor = member.user_id in with_device
        member.needs_enrolment_code = (
            not member.has_second_factor and member.role == Role.TENANT_ADMIN and actor.tenant.require_admin_two_factor
        )
    return render(
        request,
        "accounts/members.html",
        {
            "actor": actor,
            "members": members,
            "invitations": invitation_list(actor=actor, request=request),
            "activity": activity_list(actor=actor, request=request)[:RECENT_ACTIVITY],
            "roles": Role.choices,
            **extra,
        },
    )


@login_required
def members_page(request):
    return _members_render(request, membership_for_session(request))


@login_required
@require_POST
def member_enrolment_code(request, membership_id: int):
    """Shows the code once, on this response only; the admin hands it to the member."""
    actor = membership_for_session(request)
    membership = membership_get(actor=actor, membership_id=membership_id, request=request)
    try:
        code, raw = enrolment_code_issue(actor=actor, membership=membership, request=request)
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("members")
    issued = {"member": membership, "code": raw, "expires_at": code.expires_at}
    return _no_store(_members_render(request, actor, issued=issued))


@login_required
@require_POST
def member_two_factor_reset(request, membership_id: int):
    actor = membership_for_session(request)
    membership = membership_get(actor=actor, membership_id=membership_id, request=request)
    try:
        device_reset(actor=actor, membership=membership, request=request)
        messages.success(
            request,
            f"{membership.user.get_username()}'s authenticator and recovery codes are removed. "
            "Where an enrolment code is needed, issue one so they can set up a new authenticator.",
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("members")


@login_required
@require_POST
def member_invite(request):
    actor = membership_for_session(request)
    try:
        invitation_create(
            actor=actor, email=request.POST.get("email", "").strip(), role=request.POST.get("role", ""), request=request
        )
        messages.success(request, "Invitation sent. The link works once and expires after a few days.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("members")


@login_required
@require_POST
def member_role(request, membership_id: int):
    actor = membership_for_session(request)
    membership = membership_get(actor=actor, membership_id=membership_id, request=request)
    try:
        membership_change_role(actor=actor, membership=membership, role=request.POST.get("role", ""), request=request)
        messages.success(request, f"{membership.user.get_username()} is now {membership.get_role_display()}.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("members")


@login_required
@require_POST
def member_deactivate(request, membership_id: int):
    actor = membership_for_session(request)
    membership = membership_get(actor=actor, membership_id=membership_id, request=request)
    try:
        membership_deactivate(actor=actor, membership=membership, request=request)
        messages.success(request, f"{membership.user.get_username()} no longer has access to {actor.tenant.name}.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("members")


@require_http_methods(["GET", "POST"])
def invitation_accept_page(request, token: str):
    invitation = invitation_for_token(token)  # 410 page when expired or used
    form = None
    if request.user.is_authenticated:
        if request.method == "POST":
            try:
                invitation_accept(raw_token=token, user=request.user, request=request)
            except Conflict as exc:
                messages.error(request, exc.message)
                return redirect("recognition:home")
            request.session["tenant_slug"] = invitation.tenant.slug
            messages.success(request, f"You have joined {invitation.tenant.name}.")
            return redirect("recognition:home")
    else:
        form = UserCreationForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            with transaction.atomic():  # no account without its membership
                user = form.save()
                invitation_accept(raw_token=token, user=user, request=request)
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            request.session["tenant_slug"] = invitation.tenant.slug
            messages.success(request, f"Welcome to {invitation.tenant.name}.")
            return redirect("recognition:home")
    return render(request, "accounts/invitation.html", {"invitation": invitation, "form": form})


# --- service accounts (tenant admins) -----------------------------------------------------------


def _service_accounts_render(request, actor, *, new_key=None, raw_key: str = "", status: int = 200):
    response = render(
        request,
        "accounts/service_accounts.html",
        {
            "actor": actor,
            "accounts": service_account_list(actor=actor, request=request),
            "roles": SERVICE_ACCOUNT_ROLE_CHOICES,
            "default_rate": settings.SIGHTLINE_API_KEY_RATE_PER_MINUTE,
            "max_rate": API_KEY_RATE_MAX,
            "new_key": new_key,
            "raw_key": raw_key,
        },
        status=status,
    )
    response["Cache-Control"] = "no-store"  # a new key is on this page once; no cache may keep it
    return response


@login_required
@require_GET
def service_accounts_page(request):
    return _service_accounts_render(request, membership_for_session(request))


@login_required
@require_POST
def service_account_create_page(request):
    actor = membership_for_session(request)
    try:
        account = service_account_create(
            actor=actor,
            name=request.POST.get("name", "").strip(),
            role=request.POST.get("role", ""),
            description=request.POST.get("description", "").strip(),
            interactive=request.POST.get("interactive") == "on",
            request=request,
        )
        messages.success(request, f"Service account {account.name} created. Give it a key to use it.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("service-accounts")


@login_required
@require_POST
def service_account_key_create_page(request, service_account_id: int):
    """The new key is shown in this response only: no redirect, nothing in the session."""
    actor = membership_for_session(request)
    account = service_account_get(actor=actor, service_account_id=service_account_id, request=request)
    rate = request.POST.get("rate", "").strip()
    try:
        if rate and not rate.isdigit():
            raise Invalid("The rate is a whole number of requests per minute.", code="invalid_rate")
        key, raw = api_key_create(
            actor=actor, service_account=account, rate=int(rate) if rate else None, request=request
        )
    except DomainError as exc:
        messages.error(request, exc.message)
        return redirect("service-accounts")
    return _service_accounts_render(request, actor, new_key=key, raw_key=raw, status=201)


@login_required
@require_POST
def service_account_revoke_page(request, service_account_id: int):
    actor = membership_for_session(request)
    account = service_account_get(actor=actor, service_account_id=service_account_id, request=request)
    service_account_revoke(actor=actor, service_account=account, request=request)
    messages.success(request, f"Service account {account.name} revoked; its keys no longer work.")
    return redirect("service-accounts")


@login_required
@require_POST
def api_key_revoke_page(request, api_key_id: int):
    actor = membership_for_session(request)
    key = api_key_get(actor=actor, api_key_id=api_key_id, request=request)
    key = api_key_revoke(actor=actor, api_key=key, request=request)
    messages.success(request, f"Key {key.public_id} revoked.")
    return redirect("service-accounts")
