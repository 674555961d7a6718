"""The C-STORE SCP (pynetdicom): the DICOM way in for a hospital's modalities and PACS.

Who may associate: the called AE title names the hospital (platform staff assign it, unique across
the platform); the calling AE title and the peer's address must be an active node that hospital
registered (host binding on by default), and, where the node has a fingerprint, the TLS client
certificate must be exactly that one. A client certificate is asked for only with mutual TLS
(SIGHTLINE_DICOM_TLS_CA set): then every node presents one that CA signed, and a pinned node that
very one; a fingerprint cannot be saved without it (dicomnet.nodes). Anything else is an
A-ASSOCIATE-RJ (permanent, calling or called AE title not recognised), an access-log entry (the
hospital's chain, or the platform's when no hospital was named) and a count: an address rejected
SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW times within the window is refused unread (transient), and
logged once per window.

Each C-STORE is ``dicomnet.ingest.instance_receive`` as the node's service account: the answer's
DIMSE status is the ingest's. A handler never takes the process down: an unexpected error is logged
(ids only) and answered 0xA700 (out of resources; the sender may try again).

Limits: associations at once (in all, and per hospital: one hospital's senders cannot take
them all), the largest PDU, the bytes one association may deliver (past it the
C-STORE is answered 0xA700 and the association aborted) and one message's bytes (the upload limit),
ACSE/DIMSE/network timeouts. Nothing here logs a patient identifier: ids, AE titles, addresses.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, connections
from django.utils import timezone
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from accounts.models import AccessEvent
from accounts.services import access_event_record
from core.logging import bind_request_id, current_request_id

from .ingest import OUT_OF_RESOURCES, REFUSED_NOT_AUTHORIZED, instance_receive
from .models import DicomNode
from .nodes import Caller, caller_resolve, certificate_fingerprint

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
REJECT_CALLING = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_BUSY = (0x02, 0x03, 0x01)  # transient, presentation related, temporary congestion
REJECT_HOSPITAL_BUSY = (0x02, 0x03, 0x02)  # transient, presentation related, local limit exceeded
MESSAGE_SLACK = 1024 * 1024  # a C-STORE's command set and PDU headers, over its dataset
ERROR_COMMENT = 64  # (0000,0902) Error Comment is LO: at most 64 characters


class DicomPeer:
    """What the platform's services read from a request, for an association: the peer's address
    (the access log's ip), who it is (the user agent names the node and its AE title), and a
    fresh attribute space per C-STORE (the decode budget of one instance)."""

    def __init__(self, *, address: str, calling_ae: str, node: DicomNode | None = None) -> None:
        label = f"DICOM {calling_ae}" + (f" (node {node.pk})" if node is not None else "")
        self.META = {"REMOTE_ADDR": address, "HTTP_USER_AGENT": label}
        self.request_id = ""
        self.auth = None
        self.user = node.service_account.user if node is not None else None
        self.session: dict = {}


@dataclass
class _Association:
    node: DicomNode
    address: str
    calling_ae: str
    received_bytes: int = 0  # every PDU's bytes
    message_bytes: int = 0  # since the last C-STORE was answered
    over: bool = False
    aborting: bool = False
    stored: int = 0
    refused: int = 0  # C-STOREs answered with anything but success
    called_ae: str = ""
    started: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=current_request_id)  # the association's id, bound first
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reject_key(address: str) -> str:
    return f"dicom:rejections:{address}"


class StoreSCP:
    """One SCP: the AE, its handlers and the state of its associations."""

    def __init__(self) -> None:
        self._associations: dict[int, _Association] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()
        self.server: ThreadedAssociationServer | None = None

    # -- set-up ---------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=settings.SIGHTLINE_DICOM_AE_TITLE)
        ae.maximum_associations = settings.SIGHTLINE_DICOM_MAX_ASSOCIATIONS
        ae.maximum_pdu_size = settings.SIGHTLINE_DICOM_MAX_PDU
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.SIGHTLINE_DICOM_TIMEOUT
        # the called AE title names one of many hospitals: checked in the EVT_REQUESTED handler
        ae.require_called_aet = False
        ae.require_calling_aet = []
        # every storage SOP class in every transfer syntax pydicom knows: a compressed one the
        # decoders cannot read is kept, marked unprocessable; Deflate is inflated with a bound
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_CONN_OPEN, self._on_open),
        ]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not settings.SIGHTLINE_DICOM_TLS_CERT:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.9 (BCP 195)
        context.load_cert_chain(settings.SIGHTLINE_DICOM_TLS_CERT, settings.SIGHTLINE_DICOM_TLS_KEY or None)
        if settings.SIGHTLINE_DICOM_TLS_CA:
            context.load_verify_locations(settings.SIGHTLINE_DICOM_TLS_CA)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def start(self, *, host: str, port: int, block: bool = False):
        self.server = self.ae.start_server(
            (host, port), block=block, evt_handlers=self.handlers(), ssl_context=self.ssl_context()
        )
        return self.server

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    # -- association --------------------------------------------------------------------------------

    def _state(self, assoc) -> _Association | None:
        with self._lock:
            return self._associations.get(id(assoc))

    def _on_open(self, event) -> None:
        """Before the association's thread starts: whatever way it ends (released, aborted,
        rejected in EVT_REQUESTED, a dropped connection, a timeout, a DUL error), the database
        connections that thread opened are closed when it does, not left to the server."""
        assoc = event.assoc
        run = assoc.run

        def run_then_close() -> None:
            try:
                run()
            finally:
                connections.close_all()

        assoc.run = run_then_close

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        bind_request_id(f"assoc-{uuid.uuid4().hex}")  # this association's thread: its lines, its tasks
        request = assoc.requestor.primitive
        called, calling = str(request.called_ae_title).strip(), str(request.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        accepted = False
        try:
            close_old_connections()
            if self._throttled(address, calling):
                self._reject(assoc, REJECT_BUSY)
                return
            caller = caller_resolve(called_ae=called, calling_ae=calling, address=address)
            if caller.accepted and caller.node is not None and not self._certificate_matches(assoc, caller.node):
                caller = Caller(caller.hospital, None, f"client certificate does not match node {caller.node.pk}")
            if not caller.accepted or caller.node is None:
                self._refuse(assoc, caller, called=called, calling=calling, address=address)
                return
            node = caller.node
            cap = settings.SIGHTLINE_DICOM_MAX_ASSOCIATIONS_PER_HOSPITAL
            with self._lock:
                open_here = sum(1 for s in self._associations.values() if s.node.tenant_id == node.tenant_id)
                full = open_here >= cap
                if not full:
                    self._associations[id(assoc)] = _Association(
                        node=node, address=address, calling_ae=calling, called_ae=called
                    )
            if full:  # one hospital's senders never take every association the SCP has
                logger.warning(
                    "association from %s (%s) to %s refused for now: tenant %s has %d open (the cap)",
                    address,
                    calling,
                    called,
                    node.tenant_id,
                    open_here,
                )
                self._reject(assoc, REJECT_HOSPITAL_BUSY)
                return
            DicomNode.objects.filter(pk=node.pk).update(last_seen=timezone.now())
            logger.info("association from %s (%s) to %s accepted: node %s", address, calling, called, node.pk)
            accepted = True
        except Exception:
            logger.exception("association request from %s (%s) could not be checked; rejected", address, calling)
            self._reject(assoc, REJECT_BUSY)
        finally:
            if not accepted:  # no EVT_RELEASED or EVT_ABORTED follows a rejection
                connections.close_all()

    def _certificate_matches(self, assoc, node: DicomNode) -> bool:
        if not node.tls_client_fingerprint:
            return True
        sock = getattr(assoc.dul.socket, "socket", None)
        der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        return der is not None and certificate_fingerprint(der) == node.tls_client_fingerprint

    def _reject(self, assoc, reason: tuple[int, int, int]) -> None:
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def _refuse(self, assoc, caller: Caller, *, called: str, calling: str, address: str) -> None:
        """Rejected, logged in the access log (a security event) and counted against the address;
        the peer hears of it once the entry is written."""
        # the entry first: a cache that is down must not leave a refusal unlogged
        access_event_record(
            action="dicom.association_rejected",
            outcome=AccessEvent.Outcome.DENIED,
            request=DicomPeer(address=address, calling_ae=calling),
            username=f"dicom:{calling}"[:150],
            tenant=caller.hospital.tenant if caller.hospital is not None else None,
            target_type="ae_title",
            target_id=called,
        )
        try:
            count = self._count_rejection(address)
        except Exception:  # the cache is down: refused and logged all the same, just not counted
            logger.warning("rejections from %s not counted: the cache is unavailable", address)
            count = 0
        logger.warning(
            "association from %s (%s) to %s rejected: %s (%d in window)", address, calling, called, caller.reason, count
        )
        self._reject(assoc, REJECT_CALLED if caller.hospital is None else REJECT_CALLING)

    def _count_rejection(self, address: str) -> int:
        key, window = _reject_key(address), settings.SIGHTLINE_DICOM_REJECTION_WINDOW_SECONDS
        cache.add(key, 0, timeout=window)
        try:
            return cache.incr(key)
        except ValueError:  # expired between the two calls
            cache.set(key, 1, timeout=window)
            return 1

    def _throttled(self, address: str, calling: str) -> bool:
        try:
            count = cache.get(_reject_key(address)) or 0
        except Exception:
            # the cache is down: the throttle cannot be read, so every association is refused for
            # now (fail closed), and each refusal is in the access log all the same
            logger.warning("association from %s (%s) refused: the cache is unavailable", address, calling)
            access_event_record(
                action="dicom.association_rejected",
                outcome=AccessEvent.Outcome.DENIED,
                request=DicomPeer(address=address, calling_ae=calling),
                username=f"dicom:{calling}"[:150],
                target_type="address",
                target_id=address,
            )
            return True
        if count < settings.SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW:
            return False
        window = settings.SIGHTLINE_DICOM_REJECTION_WINDOW_SECONDS
        if cache.add(f"dicom:throttle-logged:{address}", 1, timeout=window):  # once per window
            logger.warning("associations from %s throttled: %d rejections within %d s", address, count, window)
            access_event_record(
                action="dicom.association_throttled",
                outcome=AccessEvent.Outcome.DENIED,
                request=DicomPeer(address=address, calling_ae=calling),
                username=f"dicom:{calling}"[:150],
                target_type="address",
                target_id=address,
            )
        return True

    # -- data -------------------------------------------------------------------------------------------

    def _on_data(self, event) -> None:
        """Every PDU (the DUL thread): bytes per association and per message are counted here, so
        an over-long dataset is cut off while it arrives, not once it is all in memory."""
        state = self._state(event.assoc)
        if state is None:
            return
        size = len(event.data)
        with state.lock:
            state.received_bytes += size
            state.message_bytes += size
            message_limit = settings.SIGHTLINE_MAX_UPLOAD_BYTES + MESSAGE_SLACK
            if state.received_bytes > settings.SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES:
                state.over = True
            if state.message_bytes > message_limit or (
                state.received_bytes > settings.SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES + message_limit
            ):
                self._abort_later(event.assoc, state, "too many bytes")

    def _abort_later(self, assoc, state: _Association, why: str) -> None:
        if state.aborting:
            return
        state.aborting = True
        logger.warning("association from %s (node %s) aborted: %s", state.address, state.node.pk, why)
        # not from the DUL thread or a handler: abort waits for the threads that call it
        threading.Timer(0.2, assoc.abort).start()

    def _on_store(self, event):
        state = self._state(event.assoc)
        if state is None:  # cannot happen: only accepted associations get here
            return OUT_OF_RESOURCES
        with state.lock:
            state.message_bytes = 0
            over = state.over
        if over:
            self._abort_later(event.assoc, state, "association byte limit reached")
            return _status(OUT_OF_RESOURCES, "This association delivered more bytes than allowed.")
        started = time.perf_counter()
        try:
            close_old_connections()
            node = _node_now(state.node.pk)
            if node is None:  # deactivated (or its account revoked) since the association began
                self._abort_later(event.assoc, state, "node deactivated during the association")
                return _status(REFUSED_NOT_AUTHORIZED, "This node is no longer registered with the hospital.")
            state.node = node
            received = instance_receive(
                membership=node.service_account.membership,
                data=event.encoded_dataset(),
                node=node,
                request=DicomPeer(address=state.address, calling_ae=state.calling_ae, node=node),
            )
        except Exception:
            logger.exception("C-STORE from node %s failed", state.node.pk)
            return _status(OUT_OF_RESOURCES, "The instance could not be stored; try again later.")
        state.stored += received.status == "stored"
        state.refused += received.dimse_status != 0x0000
        instance_id = received.instance.pk if received.instance is not None else None
        logger.info(
            "C-STORE from node %s: %s (instance %s, 0x%04X, %s) in %.0f ms",
            state.node.pk,
            received.status,
            instance_id,
            received.dimse_status,
            received.code or "ok",
            (time.perf_counter() - started) * 1000,
        )
        if received.dimse_status == 0x0000:
            return 0x0000
        return _status(received.dimse_status, received.reason)

    def _on_echo(self, event) -> int:
        return 0x0000  # only registered nodes are associated at all

    def _on_end(self, event) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is not None:
            logger.info(
                "association from node %s ended: %d stored, %d refused, %d bytes",
                state.node.pk,
                state.stored,
                state.refused,
                state.received_bytes,
                extra={
                    "request_id": state.request_id or None,
                    "calling_ae": state.calling_ae,
                    "called_ae": state.called_ae,
                    "node_id": state.node.pk,
                    "tenant_id": state.node.tenant_id,
                    "stored": state.stored,
                    "refused": state.refused,
                    "received_bytes": state.received_bytes,
                    "duration_ms": round((time.perf_counter() - state.started) * 1000, 1),
                },
            )
        connections.close_all()  # this association's thread's connections

    def _on_closed(self, event) -> None:
        with self._lock:
            self._associations.pop(id(event.assoc), None)


def _node_now(node_id: int) -> DicomNode | None:
    """The node as it is now, with a fresh service account and membership; None once it no longer
    qualifies (deactivated, its account revoked or its membership ended)."""
    return (
        DicomNode.objects.select_related(
            "service_account__membership__tenant", "service_account__membership__user", "tenant"
        )
        .filter(
            pk=node_id,
            is_active=True,
            service_account__revoked_at__isnull=True,
            service_account__membership__is_active=True,
        )
        .first()
    )


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:ERROR_COMMENT]
    return status
