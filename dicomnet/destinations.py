"""A hospital's PACS destinations: where its findings go back, and how to reach them.

A tenant admin (``Action.MEMBERS_MANAGE``: the action that already guards who and what acts for
the hospital — members, service accounts, sending nodes — and one a hospital can put behind a
second factor) names destinations: a DICOM node (C-STORE SCU to host, port and called AE title) or
a STOW-RS URL with a username and a password or token. The secret is encrypted at rest (Fernet,
key derived from ``SIGHTLINE_DESTINATION_KEY``, else from ``SECRET_KEY``), decrypted only by the
sender, never logged, never shown back: the page says whether one is set. It belongs to the server
it was entered for: a change of the URL's scheme, host or port drops it unless a new one is entered
with the change, and it goes only over https:// (http:// only to a host inside
SIGHTLINE_DESTINATION_ALLOWED_NETWORKS, e.g. a loopback test server).

Every create, change, connection test and delete is an access-log entry in the same transaction.

Where a destination may point (``reach_check``): the host's addresses, resolved at save and again
at every test and send, may not be loopback, link-local (169.254.0.0/16, fe80::/10, the cloud
metadata address among them), unspecified or multicast, unless inside an operator's
SIGHTLINE_DESTINATION_ALLOWED_NETWORKS (CIDRs; default none). Private ranges (10/8, 172.16/12,
192.168/16, fc00::/7) are allowed: a PACS lives there. So "test connection", run from the web
process, probes nothing of the platform's own. A name that does not resolve yet may be saved; it
is checked when it is reached.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.access import member_action_record, tenant_object_get
from accounts.models import AccessEvent, Membership
from accounts.permissions import Action
from accounts.services import require
from core.errors import Conflict, Invalid

from .models import AE_TITLE_LENGTH, REASON_LENGTH, Destination

NAME_LENGTH = 64
SECRET_LENGTH = 4096  # a bearer token (a JWT) fits; more is a paste gone wrong
# PS3.5 AE VR: printable ASCII without backslash, not only spaces
_AE_TITLE = re.compile(rf"^[\x20-\x5b\x5d-\x7e]{{1,{AE_TITLE_LENGTH}}}$")
_KEY_INFO = b"sightline destination secrets v1"


# --- the secret, encrypted at rest ------------------------------------------------------------


def _fernet() -> Fernet:
    """The key: HKDF-SHA256 of SIGHTLINE_DESTINATION_KEY (or SECRET_KEY when unset), so a
    database dump alone never yields a PACS password. Changing the key makes the stored secrets
    unreadable: the sender then fails them with that reason, and an admin enters them again."""
    material = (settings.SIGHTLINE_DESTINATION_KEY or settings.SECRET_KEY).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(material)
    return Fernet(base64.urlsafe_b64encode(key))


def secret_encrypt(raw: str) -> str:
    return _fernet().encrypt(raw.encode()).decode() if raw else ""


class SecretUnreadable(Exception):
    """The stored secret does not decrypt with the present key (the key was changed)."""


def secret_decrypt(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("the destination's stored secret cannot be decrypted; enter it again") from None


# --- where a destination may point -------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# cloud instance-metadata services outside 169.254.0.0/16 (which is refused as link-local anyway)
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))


class DestinationRefused(Invalid):
    """The destination points where the platform never connects (its own loopback, link-local,
    metadata, unspecified or multicast addresses), outside the operator's allowlist."""

    code = "destination_address"


class HostUnresolvable(Exception):
    """The host name does not resolve (now): reaching it fails like an unreachable peer."""


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [
            ipaddress.ip_network(str(cidr).strip(), strict=False)
            for cidr in settings.SIGHTLINE_DESTINATION_ALLOWED_NETWORKS
            if str(cidr).strip()
        ]
    except ValueError as exc:
        raise ImproperlyConfigured(f"SIGHTLINE_DESTINATION_ALLOWED_NETWORKS: {exc}") from None


def _allowed(address: IPAddress, networks) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def _forbidden(address: IPAddress) -> str:
    """Why the platform never connects to this address by default, in words; "" when it may."""
    if address in METADATA_ADDRESSES or address == ipaddress.ip_address("169.254.169.254"):
        return "the cloud metadata address"
    if address.is_loopback:
        return "a loopback address (this machine)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    return ""


def host_addresses(host: str, port: int | None) -> list[IPAddress]:
    """Every address ``host`` resolves to (IPv4-mapped IPv6 as IPv4, scope ids dropped)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise HostUnresolvable(f"{host} does not resolve") from exc
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address not in found:
            found.append(address)
    if not found:
        raise HostUnresolvable(f"{host} does not resolve")
    return found


def where_to(destination) -> tuple[str, str, int]:
    """(scheme, host, port) of a destination, or of ``_checked``'s values: "dicom" for C-STORE."""
    values = destination if isinstance(destination, dict) else vars(destination)
    if values.get("kind") == Destination.Kind.DIMSE:
        return "dicom", values.get("host") or "", int(values.get("port") or 0)
    parts = urlsplit(values.get("url") or "")
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port or (443 if parts.scheme == "https" else 80)


def addresses_check(host: str, port: int, addresses: list[IPAddress]) -> None:
    """DestinationRefused when any of the host's addresses is one the platform never connects to
    (outside SIGHTLINE_DESTINATION_ALLOWED_NETWORKS)."""
    networks = allowed_networks()
    for address in addresses:
        reason = _forbidden(address)
        if reason and not _allowed(address, networks):
            named = f"{address} is" if host.strip("[]") == str(address) else f"{host} is {address},"
            raise DestinationRefused(
                f"{named} {reason}: a destination may not point there. Give the PACS's own "
                "address (private networks are fine); an operator may allow a network with "
                "SIGHTLINE_DESTINATION_ALLOWED_NETWORKS."
            )


def _cleartext_check(values, *, has_secret: bool, addresses: list[IPAddress] | None) -> None:
    """A password or token goes only over https://, except to a host every address of which is
    inside SIGHTLINE_DESTINATION_ALLOWED_NETWORKS (the operator's own, e.g. a loopback test
    server). ``addresses`` None: the name does not resolve, so it cannot be shown to be inside."""
    scheme, host, _ = where_to(values)
    if scheme != "http" or not has_secret:
        return
    networks = allowed_networks()
    if addresses and all(_allowed(address, networks) for address in addresses):
        return
    raise DestinationRefused(
        "A password or token is sent only over https://: give the https:// URL, or remove the secret "
        "(http:// with a secret only to hosts inside SIGHTLINE_DESTINATION_ALLOWED_NETWORKS).",
        code="cleartext_secret",
    )


def reach_check(destination) -> list[IPAddress]:
    """At a test or a send: the destination's addresses, resolved now, every one allowed
    (DestinationRefused otherwise; HostUnresolvable when the name does not resolve). The sender
    connects to the first of them (C-STORE), so a name re-pointed after this check is not
    followed."""
    _, host, port = where_to(destination)
    addresses = host_addresses(host, port)
    addresses_check(host, port, addresses)
    _cleartext_check(destination, has_secret=bool(destination.secret_encrypted), addresses=addresses)
    return addresses


def _save_check(values: dict, *, has_secret: bool) -> None:
    """At save: refused when the host resolves to an address never connected to, or when a secret
    would go over http:// (``_cleartext_check``); a name that does not resolve now is kept
    (checked again when it is tested or sent to), unless it is to get a secret over http://."""
    _, host, port = where_to(values)
    try:
        addresses: list[IPAddress] | None = host_addresses(host, port)
    except HostUnresolvable:
        addresses = None
    if addresses is not None:
        addresses_check(host, port, addresses)
    _cleartext_check(values, has_secret=has_secret, addresses=addresses)


# --- reads -------------------------------------------------------------------------------------


def destination_list(*, actor: Membership, request=None) -> QuerySet[Destination]:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    return Destination.objects.for_tenant(actor.tenant).order_by("name", "id")


def destination_get(*, actor: Membership, destination_id: int, request=None) -> Destination:
    """One of the actor's hospital's destinations; another hospital's is a 404 like a missing one."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    return tenant_object_get(
        Destination.objects.all(),
        membership=actor,
        pk=destination_id,
        request=request,
        action="dicom.destination_view",
        target_type="destination",
        message="No such destination.",
    )


# --- writes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationFields:
    """What a tenant admin enters. ``secret`` empty on a change keeps the stored one, unless
    ``clear_secret`` or the URL's scheme, host or port changes (the secret was for that server)."""

    name: str
    kind: str
    send_on: str = Destination.SendOn.SIGNOFF
    host: str = ""
    port: int | None = None
    ae_title: str = ""
    url: str = ""
    username: str = ""
    secret: str = ""
    clear_secret: bool = False
    is_active: bool = True


def _port(value) -> int | None:
    if value in (None, ""):
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise Invalid("The port is a whole number from 1 to 65535.", code="invalid_port") from None
    if not 1 <= port <= 65535:
        raise Invalid("The port is a whole number from 1 to 65535.", code="invalid_port")
    return port


def _checked(fields: DestinationFields) -> dict:
    name = fields.name.strip()
    if not 1 <= len(name) <= NAME_LENGTH:
        raise Invalid(f"A destination's name is 1 to {NAME_LENGTH} characters.", code="invalid_name")
    if fields.kind not in Destination.Kind.values:
        raise Invalid("Choose DICOM C-STORE or DICOMweb STOW-RS.", code="invalid_kind")
    if fields.send_on not in Destination.SendOn.values:
        raise Invalid("Choose when to send: every AI result, or only after sign-off.", code="invalid_send_on")
    values: dict = {
        "name": name,
        "kind": fields.kind,
        "send_on": fields.send_on,
        "is_active": fields.is_active,
        "host": "",
        "port": None,
        "ae_title": "",
        "url": "",
        "username": "",
    }
    if fields.kind == Destination.Kind.DIMSE:
        host, ae_title = fields.host.strip(), fields.ae_title.strip()
        if not host or len(host) > 255 or any(c.isspace() for c in host):
            raise Invalid("Give the PACS's host name or IP address.", code="invalid_host")
        port = _port(fields.port)
        if port is None:
            raise Invalid("Give the PACS's DICOM port (often 104 or 11112).", code="invalid_port")
        if not _AE_TITLE.match(ae_title):
            raise Invalid(
                f"The PACS's AE title is 1 to {AE_TITLE_LENGTH} printable characters, no backslash.",
                code="invalid_ae_title",
            )
        values.update(host=host, port=port, ae_title=ae_title)
    else:
        url = fields.url.strip()
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a port that is not one)
        except ValueError:
            raise Invalid("The URL's port is a whole number from 1 to 65535.", code="invalid_url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 500:
            raise Invalid("Give the STOW-RS studies URL, http(s)://…/studies.", code="invalid_url")
        if parts.username or parts.password:
            raise Invalid("Put the username and password in their own fields, not in the URL.", code="invalid_url")
        if len(fields.username) > 200:
            raise Invalid("The username is at most 200 characters.", code="invalid_username")
        if len(fields.secret) > SECRET_LENGTH:
            raise Invalid(f"The password or token is at most {SECRET_LENGTH} characters.", code="invalid_secret")
        values.update(url=url, username=fields.username.strip())
    return values


def _name_taken(actor: Membership, name: str) -> Conflict:
    return Conflict(f"{actor.tenant.name} already has a destination named {name!r}.", code="name_taken")


def destination_create(*, actor: Membership, fields: DestinationFields, request=None) -> Destination:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    values = _checked(fields)
    secret = fields.secret if fields.kind == Destination.Kind.STOW else ""
    _save_check(values, has_secret=bool(secret))
    try:
        with transaction.atomic():
            destination = Destination.objects.create(
                tenant=actor.tenant, created_by=actor.user, secret_encrypted=secret_encrypt(secret), **values
            )
            member_action_record(
                actor,
                "dicom.destination_create",
                request=request,
                target_type="destination",
                target_id=destination.pk,
            )
    except IntegrityError:
        raise _name_taken(actor, values["name"]) from None
    return destination


def destination_update(
    *, actor: Membership, destination_id: int, fields: DestinationFields, request=None
) -> Destination:
    require(actor, Action.MEMBERS_MANAGE, request=request)
    values = _checked(fields)
    # looked up outside the transaction: another hospital's id stays logged as denied
    found = destination_get(actor=actor, destination_id=destination_id, request=request)
    try:
        with transaction.atomic():
            destination = Destination.objects.select_for_update().get(pk=found.pk)
            switched_on = values["is_active"] and not destination.is_active
            reached_differently = any(
                getattr(destination, field) != values[field] for field in ("kind", "host", "port", "ae_title", "url")
            )
            # the stored secret was entered for one server: a URL to another scheme, host or port
            # (or another kind) drops it unless a new one is entered with the change
            repointed = where_to(destination) != where_to(values) or destination.kind != values["kind"]
            for field, value in values.items():
                setattr(destination, field, value)
            if fields.kind != Destination.Kind.STOW or fields.clear_secret:
                destination.secret_encrypted = ""
            elif fields.secret:
                destination.secret_encrypted = secret_encrypt(fields.secret)
            elif repointed:
                destination.secret_encrypted = ""
            _save_check(values, has_secret=bool(destination.secret_encrypted))
            if reached_differently or fields.secret or fields.clear_secret:
                destination.last_test_ok, destination.last_test_message, destination.last_tested_at = None, "", None
            destination.save()
            if switched_on:
                from .sending import destination_deliveries_wake

                destination_deliveries_wake(destination)
            member_action_record(
                actor, "dicom.destination_change", request=request, target_type="destination", target_id=destination.pk
            )
    except IntegrityError:
        raise _name_taken(actor, values["name"]) from None
    return destination


def destination_delete(*, actor: Membership, destination_id: int, request=None) -> None:
    """Its deliveries go with it (what was sent stays in the PACS; what was not is never sent)."""
    require(actor, Action.MEMBERS_MANAGE, request=request)
    found = destination_get(actor=actor, destination_id=destination_id, request=request)
    with transaction.atomic():
        destination = Destination.objects.select_for_update().get(pk=found.pk)
        member_action_record(
            actor, "dicom.destination_delete", request=request, target_type="destination", target_id=destination.pk
        )
        destination.delete()


def destination_test(*, actor: Membership, destination_id: int, request=None) -> Destination:
    """C-ECHO the node, or ask the STOW-RS URL over HTTP with the credentials; the answer is kept
    on the row (last_test_*) and logged. Outside any transaction while it waits on the network."""
    from .sending import connection_check

    destination = destination_get(actor=actor, destination_id=destination_id, request=request)
    ok, message = connection_check(destination)
    with transaction.atomic():
        Destination.objects.filter(pk=destination.pk).update(
            last_test_ok=ok, last_test_message=message[:REASON_LENGTH], last_tested_at=timezone.now()
        )
        member_action_record(
            actor,
            "dicom.destination_test",
            request=request,
            target_type="destination",
            target_id=destination.pk,
            outcome=AccessEvent.Outcome.SUCCESS if ok else AccessEvent.Outcome.FAILED,
        )
    destination.refresh_from_db()
    return destination
