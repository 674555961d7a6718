"""Who may send DICOM to whom: a hospital's called AE title (platform staff assign it) and its
registered sending nodes (a tenant admin registers them). Services write, selectors read.

A node acts through its own service account (role clinician, so it may store), made with it and
revoked with it: every scoping rule, role check and access-log entry applies to a node as to any
member. DICOM has no second factor; the node registry, the host binding, the optional client
certificate and the SCP's throttling of rejected associations are what stands in for one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils.text import slugify

from accounts.access import member_action_record, tenant_object_get
from accounts.models import Membership, Role, ServiceAccount, Tenant
from accounts.permissions import Action
from accounts.service_accounts import service_account_create, service_account_revoke
from accounts.services import access_event_record, require
from core.errors import Conflict, Invalid

from .models import AE_TITLE_LENGTH, DicomNode, HospitalAETitle

NODE_NAME_LENGTH = 64
HOST_LENGTH = 255
FINGERPRINT_HEX = 64  # SHA-256
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


# --- validation --------------------------------------------------------------------------------


def ae_title_clean(value: str) -> str:
    """An AE title as PS3.5 (Table 6.2-1, AE) allows it: at most 16 characters of the default
    repertoire, no backslash or control characters, not only spaces. Leading and trailing
    spaces are not significant: they are dropped."""
    title = (value or "").strip(" ")
    if not title:
        raise Invalid("An AE title must have at least one character other than a space.", code="invalid_ae_title")
    if len(title) > AE_TITLE_LENGTH:
        raise Invalid(f"An AE title is at most {AE_TITLE_LENGTH} characters.", code="invalid_ae_title")
    if any(not (0x20 <= ord(c) < 0x7F) for c in title) or "\\" in title:
        raise Invalid(
            "An AE title uses letters, digits, spaces and punctuation only: no backslash, control or "
            "non-ASCII characters.",
            code="invalid_ae_title",
        )
    return title


def host_clean(value: str) -> str:
    host = (value or "").strip()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise Invalid(
            "The host is an IP address or a host name (e.g. 10.0.4.21 or ct1.radiology).", code="invalid_host"
        )
    return host.lower()


def fingerprint_clean(value: str) -> str:
    """A SHA-256 certificate fingerprint, as people copy it (colons, any case): kept as lowercase
    hex without separators."""
    digits = re.sub(r"[\s:]", "", value or "").lower()
    if not digits:
        return ""
    if len(digits) != FINGERPRINT_HEX or not re.fullmatch(r"[0-9a-f]+", digits):
        raise Invalid(
            "The client certificate fingerprint is its SHA-256 digest: 64 hexadecimal digits (colons allowed).",
            code="invalid_fingerprint",
        )
    return digits


def mutual_tls_configured() -> bool:
    """Whether the SCP asks every node for a client certificate (TLS on, with a CA to verify it):
    the one setting under which a pinned fingerprint can ever be presented. Python's ssl asks
    for a client certificate only with a CA to check it against, so a pinned certificate is one
    that CA signed, and every node, pinned or not, presents one the CA signed."""
    return bool(settings.SIGHTLINE_DICOM_TLS_CERT and settings.SIGHTLINE_DICOM_TLS_CA)


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


# --- the hospital's AE title (platform staff) --------------------------------------------------


def hospital_ae_title_assign(*, tenant: Tenant, ae_title: str, assigned_by=None, request=None) -> HospitalAETitle:
    """Give the hospital its called AE title (or change it): unique across the platform."""
    title = ae_title_clean(ae_title)
    taken = HospitalAETitle.objects.filter(ae_title=title).exclude(tenant=tenant).exists()
    if taken:
        raise Conflict(f"The AE title {title!r} belongs to another hospital.", code="ae_title_taken")
    try:
        with transaction.atomic():
            assigned, _ = HospitalAETitle.objects.update_or_create(
                tenant=tenant, defaults={"ae_title": title, "assigned_by": assigned_by}
            )
            access_event_record(
                action="dicom.ae_title_assign",
                request=request,
                user=assigned_by,
                username="" if assigned_by else "manage.py",
                tenant=tenant,
                target_type="hospital_ae_title",
                target_id=assigned.pk,
            )
    except IntegrityError as exc:
        raise Conflict(f"The AE title {title!r} belongs to another hospital.", code="ae_title_taken") from exc
    return assigned


def hospital_for_called_ae(ae_title: str) -> HospitalAETitle | None:
    """The hospital an association calls (its called AE title), active hospitals only."""
    return (
        HospitalAETitle.objects.select_related("tenant")
        .filter(ae_title=ae_title.strip(" "), tenant__is_active=True)
        .first()
    )


# --- sending nodes (tenant admins) -------------------------------------------------------------


def dicom_node_list(*, actor: Membership, request=None) -> QuerySet[DicomNode]:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    return (
        DicomNode.objects.for_tenant(actor.tenant)
        .select_related("service_account", "service_account__user")
        .order_by("-is_active", "name")
    )


def dicom_node_get(*, actor: Membership, node_id: int, request=None, for_update: bool = False) -> DicomNode:
    """One of the actor's hospital's nodes; another hospital's is a 404 like a missing one."""
    return tenant_object_get(
        dicom_node_list(actor=actor, request=request),
        membership=actor,
        pk=node_id,
        request=request,
        action="dicom.node_view",
        target_type="dicom_node",
        message="No such DICOM node.",
        for_update=for_update,
    )


def _service_account_name(ae_title: str, *, again: bool = False) -> str:
    slug = slugify(ae_title.replace("_", "-"))[:30].strip("-") or "node"
    digest = hashlib.sha256(ae_title.encode()).hexdigest()[:6]  # "CT_1" and "CT-1" slug alike
    # a reactivated node's new account: the revoked one keeps its name in the record
    return f"dicom-{slug}-{digest}" + (f"-{secrets.token_hex(2)}" if again else "")


def dicom_node_create(
    *,
    actor: Membership,
    name: str,
    ae_title: str,
    host: str,
    bind_host: bool = True,
    tls_client_fingerprint: str = "",
    interactive: bool = False,
    request=None,
) -> DicomNode:
    """Register a sending node with its own service account (role clinician: it stores).
    ``interactive``: what it sends is read on the interactive lane, before the batch work (a
    modality whose images a clinician waits on, e.g. the emergency department's CT); otherwise
    its reads go to the bulk lane and never crowd out the clinicians' own uploads."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    name = (name or "").strip()
    if not name or len(name) > NODE_NAME_LENGTH:
        raise Invalid(f"A node's name is 1 to {NODE_NAME_LENGTH} characters.", code="invalid_name")
    title = ae_title_clean(ae_title)
    host = host_clean(host)
    fingerprint = fingerprint_clean(tls_client_fingerprint)
    if fingerprint and not mutual_tls_configured():
        raise Invalid(
            "A client certificate can be pinned only where the SCP asks for one (mutual TLS): the operator "
            "sets SIGHTLINE_DICOM_TLS_CERT, SIGHTLINE_DICOM_TLS_KEY and SIGHTLINE_DICOM_TLS_CA, the CA that "
            "signed the node's certificate. Until then leave the fingerprint empty.",
            code="mutual_tls_off",
        )
    tenant = actor.tenant
    nodes = DicomNode.objects.for_tenant(tenant)
    if nodes.filter(ae_title=title).exists():
        raise Conflict(
            f"{tenant.name} already has a node with the AE title {title!r} (a deactivated node keeps its "
            "title in the record: reactivate it instead); give the new one its own.",
            code="ae_title_taken",
        )
    if nodes.filter(name=name).exists():
        raise Conflict(f"{tenant.name} already has a node named {name!r}.", code="name_taken")
    try:
        with transaction.atomic():
            account = service_account_create(
                actor=actor,
                name=_service_account_name(title),
                role=Role.CLINICIAN,
                description=f"DICOM node {name} ({title})"[:200],
                interactive=interactive,
                request=request,
            )
            node = DicomNode.objects.create(
                tenant=tenant,
                name=name,
                ae_title=title,
                host=host,
                bind_host=bind_host,
                tls_client_fingerprint=fingerprint,
                service_account=account,
                created_by=actor.user,
            )
            member_action_record(
                actor, "dicom.node_create", request=request, target_type="dicom_node", target_id=node.pk
            )
    except IntegrityError as exc:  # a concurrent registration took the title or the name
        raise Conflict("Another node with this AE title or name was just registered.", code="name_taken") from exc
    return node


def dicom_node_deactivate(*, actor: Membership, node: DicomNode, request=None) -> DicomNode:
    """The node's associations are refused from now on (open ones too, from their next C-STORE)
    and its service account revoked for good; reactivating the node gives it a new one."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    if not node.is_active:
        return node
    with transaction.atomic():
        DicomNode.objects.filter(pk=node.pk).update(is_active=False)
        service_account_revoke(actor=actor, service_account=node.service_account, request=request)
        member_action_record(
            actor, "dicom.node_deactivate", request=request, target_type="dicom_node", target_id=node.pk
        )
    node.refresh_from_db()
    return node


def dicom_node_reactivate(*, actor: Membership, node: DicomNode, request=None) -> DicomNode:
    """A deactivated node back in service, under its AE title, host and certificate as they were,
    with a new service account (the old one stays revoked: revocation is for good)."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    with transaction.atomic():
        locked = DicomNode.objects.select_for_update().select_related("service_account").get(pk=node.pk)
        if locked.is_active:
            return locked
        account = service_account_create(
            actor=actor,
            name=_service_account_name(locked.ae_title, again=True),
            role=Role.CLINICIAN,
            description=f"DICOM node {locked.name} ({locked.ae_title})"[:200],
            interactive=locked.service_account.interactive,
            request=request,
        )
        DicomNode.objects.filter(pk=locked.pk).update(is_active=True, service_account=account)
        member_action_record(
            actor, "dicom.node_reactivate", request=request, target_type="dicom_node", target_id=locked.pk
        )
    node.refresh_from_db()
    return node


def dicom_node_interactive_set(*, actor: Membership, node: DicomNode, interactive: bool, request=None) -> DicomNode:
    """Whether what the node sends is read on the interactive lane (else the bulk lane); it holds
    from the node's next C-STORE on, open associations included."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    with transaction.atomic():
        ServiceAccount.objects.filter(pk=node.service_account_id).update(interactive=interactive)
        member_action_record(
            actor,
            "dicom.node_interactive" if interactive else "dicom.node_bulk",
            request=request,
            target_type="dicom_node",
            target_id=node.pk,
        )
    node.service_account.refresh_from_db()
    return node


# --- the SCP's question: who is calling? ---------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """What an association request resolved to: the hospital called and the node calling (both,
    or a rejection ``reason`` for the log: ids, AE titles and addresses only)."""

    hospital: HospitalAETitle | None
    node: DicomNode | None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.node is not None


def _host_matches(node: DicomNode, address: str) -> bool:
    if not node.bind_host:
        return True
    try:
        return ipaddress.ip_address(node.host) == ipaddress.ip_address(address)
    except ValueError:
        pass
    try:  # a host name: any of its addresses
        infos = socket.getaddrinfo(node.host, None)
    except OSError:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ipaddress.ip_address(info[4][0]) == peer for info in infos)


def caller_resolve(*, called_ae: str, calling_ae: str, address: str) -> Caller:
    """The hospital named by ``called_ae`` and its active node with ``calling_ae`` at ``address``."""
    hospital = hospital_for_called_ae(called_ae)
    if hospital is None:
        return Caller(None, None, "called AE title not recognised")
    node = (
        DicomNode.objects.for_tenant(hospital.tenant)
        .select_related("service_account__membership__tenant", "service_account__membership__user", "tenant")
        .filter(ae_title=calling_ae.strip(" "), is_active=True, service_account__revoked_at__isnull=True)
        .first()
    )
    if node is None:
        return Caller(hospital, None, "calling AE title not registered with the hospital")
    if not _host_matches(node, address):
        return Caller(hospital, None, f"calling AE title registered for another host (node {node.pk})")
    return Caller(hospital, node)
