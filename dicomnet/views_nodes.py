"""The sending-nodes page: a tenant admin registers the modalities and PACS that send to the
hospital over DICOM, deactivates and reactivates them, and says which are read on the
interactive lane."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from accounts.selectors import membership_for_session
from core.errors import DomainError

from .models import HospitalAETitle
from .nodes import (
    dicom_node_create,
    dicom_node_deactivate,
    dicom_node_get,
    dicom_node_interactive_set,
    dicom_node_list,
    dicom_node_reactivate,
    mutual_tls_configured,
)


def _nodes_render(request, actor, *, status: int = 200, form: dict | None = None):
    return render(
        request,
        "dicomnet/nodes.html",
        {
            "actor": actor,
            "nodes": dicom_node_list(actor=actor, request=request),
            "called": HospitalAETitle.objects.filter(tenant=actor.tenant).first(),
            "dicom_port": settings.SIGHTLINE_DICOM_PORT,
            "tls": bool(settings.SIGHTLINE_DICOM_TLS_CERT),
            "mutual_tls": mutual_tls_configured(),
            "form": form or {"bind_host": True},
        },
        status=status,
    )


@login_required
@require_GET
def nodes_page(request):
    return _nodes_render(request, membership_for_session(request))


@login_required
@require_POST
def node_create_page(request):
    actor = membership_for_session(request)
    form = {
        "name": request.POST.get("name", "").strip(),
        "ae_title": request.POST.get("ae_title", ""),
        "host": request.POST.get("host", "").strip(),
        "bind_host": request.POST.get("bind_host") == "on",
        "tls_client_fingerprint": request.POST.get("tls_client_fingerprint", "").strip(),
        "interactive": request.POST.get("interactive") == "on",
    }
    try:
        node = dicom_node_create(actor=actor, request=request, **form)
    except DomainError as exc:
        messages.error(request, exc.message)
        return _nodes_render(request, actor, status=exc.status, form=form)
    messages.success(request, f"Node {node.name} registered: {node.ae_title} may now send from {node.host}.")
    return redirect("dicom-nodes")


@login_required
@require_POST
def node_deactivate_page(request, node_id: int):
    actor = membership_for_session(request)
    node = dicom_node_get(actor=actor, node_id=node_id, request=request)
    dicom_node_deactivate(actor=actor, node=node, request=request)
    messages.success(request, f"Node {node.name} deactivated; its associations are refused from now on.")
    return redirect("dicom-nodes")


@login_required
@require_POST
def node_reactivate_page(request, node_id: int):
    actor = membership_for_session(request)
    node = dicom_node_get(actor=actor, node_id=node_id, request=request)
    dicom_node_reactivate(actor=actor, node=node, request=request)
    messages.success(request, f"Node {node.name} reactivated: {node.ae_title} may send from {node.host} again.")
    return redirect("dicom-nodes")


@login_required
@require_POST
def node_lane_page(request, node_id: int):
    actor = membership_for_session(request)
    node = dicom_node_get(actor=actor, node_id=node_id, request=request)
    interactive = request.POST.get("interactive") == "on"
    dicom_node_interactive_set(actor=actor, node=node, interactive=interactive, request=request)
    lane = "the interactive lane" if interactive else "the bulk lane"
    messages.success(request, f"What {node.name} sends is now read on {lane}.")
    return redirect("dicom-nodes")
