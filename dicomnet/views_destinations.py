"""The PACS destinations pages (tenant admins) and the resend button (study page, destinations
page). Thin: read the form, call one service, say what happened."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.selectors import membership_for_session
from core.errors import DomainError

from .destinations import (
    DestinationFields,
    destination_create,
    destination_delete,
    destination_get,
    destination_list,
    destination_test,
    destination_update,
)
from .models import Destination
from .sending import KIND_LABELS, REFUSED_LABELS, delivery_resend, destination_deliveries_unsent, exports_refused

UNSENT_SHOWN = 50  # deliveries not sent, newest first, on the destinations page


def _fields(post) -> DestinationFields:
    return DestinationFields(
        name=post.get("name", ""),
        kind=post.get("kind", ""),
        send_on=post.get("send_on", ""),
        host=post.get("host", ""),
        port=post.get("port") or None,
        ae_title=post.get("ae_title", ""),
        url=post.get("url", ""),
        username=post.get("username", ""),
        secret=post.get("secret", ""),
        clear_secret=post.get("clear_secret") == "on",
        # an unticked box sends nothing: the hidden field says the form had one
        is_active=post.get("is_active") == "on" or "is_active_sent" not in post,
    )


def _no_store(response):
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def destinations_page(request):
    actor = membership_for_session(request)
    destinations = destination_list(actor=actor, request=request)
    unsent = list(destination_deliveries_unsent(destinations=destinations)[:UNSENT_SHOWN])
    refused = [
        (event, REFUSED_LABELS.get(event.target_type, event.target_type))
        for event in exports_refused(tenant=actor.tenant)[:UNSENT_SHOWN]
    ]
    return _no_store(
        render(
            request,
            "dicomnet/destinations.html",
            {
                "actor": actor,
                "destinations": destinations,
                "unsent": unsent,
                "refused": refused,
                "kind_labels": KIND_LABELS,
                "kinds": Destination.Kind.choices,
                "send_ons": Destination.SendOn.choices,
            },
        )
    )


@login_required
@require_POST
def destination_create_page(request):
    actor = membership_for_session(request)
    try:
        destination = destination_create(actor=actor, fields=_fields(request.POST), request=request)
        messages.success(request, f"Destination {destination.name} added. Test its connection.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("destinations")


@login_required
@require_http_methods(["GET", "POST"])
def destination_edit_page(request, destination_id: int):
    actor = membership_for_session(request)
    destination = destination_get(actor=actor, destination_id=destination_id, request=request)
    if request.method == "POST":
        try:
            fields = _fields(request.POST)
            had_secret = bool(destination.secret_encrypted)
            destination = destination_update(actor=actor, destination_id=destination.pk, fields=fields, request=request)
            messages.success(request, f"Destination {destination.name} saved.")
            if had_secret and not destination.secret_encrypted and not fields.clear_secret:
                messages.warning(
                    request,
                    f"{destination.name}: the stored password or token was removed, because the URL now points "
                    "at another scheme, host or port (or the destination is no longer STOW-RS). Enter it again "
                    "if this server needs it.",
                )
            return redirect("destinations")
        except DomainError as exc:
            messages.error(request, exc.message)
    return _no_store(
        render(
            request,
            "dicomnet/destination_edit.html",
            {
                "actor": actor,
                "destination": destination,
                "kinds": Destination.Kind.choices,
                "send_ons": Destination.SendOn.choices,
            },
        )
    )


@login_required
@require_POST
def destination_test_page(request, destination_id: int):
    actor = membership_for_session(request)
    destination = destination_test(actor=actor, destination_id=destination_id, request=request)
    if destination.last_test_ok:
        messages.success(request, f"{destination.name}: {destination.last_test_message}")
    else:
        messages.error(request, f"{destination.name}: {destination.last_test_message}")
    return redirect("destinations")


@login_required
@require_POST
def destination_delete_page(request, destination_id: int):
    actor = membership_for_session(request)
    destination = destination_get(actor=actor, destination_id=destination_id, request=request)
    name = destination.name
    destination_delete(actor=actor, destination_id=destination.pk, request=request)
    messages.success(request, f"Destination {name} removed; nothing more is sent to it.")
    return redirect("destinations")


@login_required
@require_POST
def delivery_resend_page(request, delivery_id: int):
    """From the study page (a clinician) or the destinations page (an admin): back where it came from."""
    actor = membership_for_session(request)
    try:
        delivery = delivery_resend(actor=actor, delivery_id=delivery_id, request=request)
        messages.success(request, f"Sending again to {delivery.destination.name}.")
    except DomainError as exc:
        if exc.status == 404 or exc.status == 403:
            raise
        messages.error(request, exc.message)
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}, require_https=False):
        return redirect(back)
    return redirect("destinations")
