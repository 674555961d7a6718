"""Findings back to the hospital's PACS: what to send where, the sending itself, its status.

Each made object (``Instance``, origin "created": the AI finding's SR, the sign-off's SR, the
heatmap) gets one ``Delivery`` row per destination (unique per pair). A Celery task claims the
row with a conditional UPDATE (pending/retrying → sending), sends the stored Part 10 bytes as
they are — C-STORE in the file's own SOP class and transfer syntax, or one STOW-RS
multipart/related POST — and records the answer and its access-log entry ("dicom.sent", a
disclosure, success or failure) in one transaction. The claim itself writes "dicom.send_attempted"
in its transaction, before a byte leaves, so a worker dying mid-send leaves the entry behind. The
object keeps its one SOP Instance UID and its bytes, so a resend is the same instance and a PACS
that got it twice stores it once.

A destination that is down delays: the row is "retrying" with the reason and its next attempt at
SIGHTLINE_DICOM_SEND_RETRY_SECONDS × 2^(attempts-1); only SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS
fails it. The database knows what is due, not the broker: ``deliveries_reconcile`` (Celery beat)
sends again what a lost message or a dead worker left behind.

When: an AI result of an image that came in as DICOM is exported at once to the destinations that
send on every result (``results_export_on_commit``, from workers/outcomes.py); a sign-off sends
its SR to every destination, with the AI SR and map to those that had not had them
(``review_export_on_commit``, from recognition/services/reviews.py). The map needs the heatmap,
which the worker computes on request: the export asks for it and ``map_follow`` waits for it.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.db.models import CharField, Exists, OuterRef, Q, QuerySet
from django.db.models.functions import Cast
from django.utils import timezone

from accounts.access import member_action_record, tenant_object_get
from accounts.models import AccessEvent, Membership
from accounts.permissions import Action, can
from accounts.services import access_event_record, require
from core.errors import Conflict, DomainError
from core.transient import is_transient
from recognition.storage import ForeignStorageKey, storage_key_for_tenant

from .destinations import DestinationRefused, HostUnresolvable, SecretUnreadable, reach_check, secret_decrypt
from .models import REASON_LENGTH, Delivery, Destination, Instance

logger = logging.getLogger(__name__)

Status = Delivery.Status
SEND_TASK = "dicomnet.tasks.delivery_send"
RESULT_EXPORT_TASK = "dicomnet.tasks.result_export"
REVIEW_EXPORT_TASK = "dicomnet.tasks.review_export"
MAP_FOLLOW_TASK = "dicomnet.tasks.map_follow"
QUEUE = "maintenance"  # the bulk node's housekeeping lane: a send never delays a clinician's read
SENDER_LABEL = "sightline sender"  # the access log's actor for a send: the platform, to a destination
# a Celery countdown may run a moment early against this clock; a row due that soon is taken
EARLY_SECONDS = 2
RECONCILE_BATCH = 500  # due rows re-enqueued per sweep; the next sweep takes the rest
RECONCILE_LOOKBACK = timedelta(days=1)  # maps still awaited: this recent
# results and sign-offs whose export was never queued (the broker was down as they were stored):
# this recent, and older than two sweeps (the normal path had its chance)
RECONCILE_EXPORT_LOOKBACK = timedelta(hours=1)
# the sweep looks at the newest this many results and reviews of hospitals with destinations (by
# id, the primary key's index: a bounded read however large the tables grow)
RECONCILE_RECENT = 5000
KIND_LABELS = {"ai_sr": "AI finding (SR)", "review_sr": "sign-off (SR)", "map": "heatmap"}
# DIMSE C-STORE statuses that mean "stored" (PS3.4 B.2.3: warnings are stored too)
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
HTTP_OK = range(200, 300)
# a person waits on "test connection" in the page: a peer that says nothing is failing after this
CONNECTION_TEST_TIMEOUT_SECONDS = 10.0


# --- the wire ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str = ""


def _timeout(*, testing: bool = False) -> float:
    timeout = float(settings.SIGHTLINE_DICOM_TIMEOUT)
    return min(timeout, CONNECTION_TEST_TIMEOUT_SECONDS) if testing else timeout


def _where(destination: Destination) -> str:
    """The destination in words for a reason: host and port only, never a URL's path or query."""
    if destination.kind == Destination.Kind.DIMSE:
        return f"{destination.ae_title}@{destination.host}:{destination.port}"
    parts = urlsplit(destination.url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def _ae(*, testing: bool = False):
    from pynetdicom import AE

    ae = AE(ae_title=settings.SIGHTLINE_DICOM_AE_TITLE)
    timeout = _timeout(testing=testing)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(ae, destination: Destination, address: str):
    """To ``address``, the destination host's address that was checked (never resolved again)."""
    assoc = ae.associate(address, destination.port, ae_title=destination.ae_title)
    if assoc.is_established:
        return assoc, ""
    if assoc.is_rejected:
        return None, (
            f"{_where(destination)} rejected the association: check its AE title, and that the PACS knows "
            f"{settings.SIGHTLINE_DICOM_AE_TITLE} and this host"
        )
    return None, f"could not reach {_where(destination)} (no DICOM association: refused, timed out or aborted)"


def _c_echo(destination: Destination, address: str) -> Outcome:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = _ae(testing=True)
    ae.add_requested_context(Verification)
    assoc, reason = _associate(ae, destination, address)
    if assoc is None:
        return Outcome(False, reason)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.Status == 0:
        return Outcome(True, f"C-ECHO answered by {_where(destination)}")
    return Outcome(False, f"{_where(destination)} did not answer the C-ECHO")


def _c_store(destination: Destination, instance: Instance, data: bytes, address: str) -> Outcome:
    """The file as it is stored: its own transfer syntax, no re-encoding (pynetdicom sends a file
    path's dataset bytes unchanged), so the PACS gets the identical instance every time."""
    from pydicom import dcmread

    meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    sop_class = instance.sop_class_uid or str(meta.MediaStorageSOPClassUID)
    syntax = str(meta.TransferSyntaxUID)
    ae = _ae()
    ae.add_requested_context(sop_class, [syntax])
    with tempfile.TemporaryDirectory(prefix="sightline-send-") as folder:
        path = Path(folder) / "object.dcm"
        path.write_bytes(data)
        assoc, reason = _associate(ae, destination, address)
        if assoc is None:
            return Outcome(False, reason)
        try:
            if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
                return Outcome(False, f"{_where(destination)} does not accept this object's SOP class {sop_class}")
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    if not status:
        return Outcome(False, f"{_where(destination)} did not answer the C-STORE (timed out or aborted)")
    if status.Status in STORED_STATUSES:
        return Outcome(True)
    return Outcome(False, f"{_where(destination)} refused the object (C-STORE status 0x{status.Status:04X})")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is refused, not followed: the credentials go to the URL the admin gave, only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener() -> urllib.request.OpenerDirector:
    """No proxy, whatever HTTP(S)_PROXY says (the credentials and the object go to the
    destination only, over the address ``reach_check`` allowed), no redirect."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _auth_headers(destination: Destination) -> dict[str, str]:
    """Basic with a username, a bearer token without one; nothing when no secret is set."""
    import base64

    secret = secret_decrypt(destination.secret_encrypted)
    if not secret and not destination.username:
        return {}
    if destination.username:
        pair = base64.b64encode(f"{destination.username}:{secret}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {"Authorization": f"Bearer {secret}"}


def _http(
    destination: Destination, *, method: str, data: bytes | None = None, headers: dict | None = None, testing=False
):
    """(status, body) of one request to the destination's URL; (0, reason) when none answered."""
    # http(s) only: the destination's URL was checked when it was entered (destinations._checked)
    request = urllib.request.Request(destination.url, data=data, method=method, headers=headers or {})  # noqa: S310
    for name, value in _auth_headers(destination).items():
        request.add_unredirected_header(name, value)
    try:
        with _opener().open(request, timeout=_timeout(testing=testing)) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as answer:
        with answer:
            return answer.code, answer.read()
    except OSError as exc:  # URLError and timeouts are OSErrors
        cause = getattr(exc, "reason", exc)
        return 0, f"could not reach {_where(destination)} ({type(cause).__name__})"


def _http_words(status: int) -> str:
    if status in (401, 403):
        return f"HTTP {status}: the credentials were refused"
    if status == 404:
        return "HTTP 404: no STOW-RS endpoint at this URL"
    if 300 <= status < 400:
        return f"HTTP {status}: a redirect; give the final URL"
    return f"HTTP {status}"


def _stow_check(destination: Destination) -> Outcome:
    """OPTIONS on the studies URL with the credentials; a server that does not answer OPTIONS is
    asked a one-study QIDO GET instead (the same resource; its answer is read and dropped)."""
    status, body = _http(destination, method="OPTIONS", testing=True)
    if status in (404, 405, 501):
        status, body = _http(destination, method="GET", headers={"Accept": "application/dicom+json"}, testing=True)
    if status == 0:
        return Outcome(False, str(body))
    if status in HTTP_OK:
        return Outcome(True, f"{_where(destination)} answered HTTP {status}")
    return Outcome(False, f"{_where(destination)} answered {_http_words(status)}")


def _stow(destination: Destination, data: bytes) -> Outcome:
    boundary = secrets.token_hex(16)
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    status, answer = _http(destination, method="POST", data=body, headers=headers)
    if status == 0:
        return Outcome(False, str(answer))
    if status not in HTTP_OK:
        return Outcome(False, f"{_where(destination)} answered {_http_words(status)}")
    try:
        failed = json.loads(answer or b"{}").get("00081198", {}).get("Value")
    except (ValueError, AttributeError):
        failed = None
    if failed:  # FailedSOPSequence: answered, but this instance not stored
        reason = (failed[0].get("00081197", {}).get("Value") or ["?"])[0]
        return Outcome(False, f"{_where(destination)} did not store the object (failure reason {reason})")
    return Outcome(True)


def _unresolvable(destination: Destination) -> str:
    return f"could not reach {_where(destination)} (the host name does not resolve)"


def connection_check(destination: Destination) -> tuple[bool, str]:
    """The destination's "test connection": (ok, what happened in words)."""
    try:
        address = str(reach_check(destination)[0])
    except DestinationRefused as exc:
        return False, exc.message
    except HostUnresolvable:
        return False, _unresolvable(destination)
    try:
        if destination.kind == Destination.Kind.DIMSE:
            outcome = _c_echo(destination, address)
        else:
            outcome = _stow_check(destination)
    except SecretUnreadable as exc:
        return False, str(exc)
    except Exception as exc:  # a peer's odd answer is a failed test, in words, not a 500
        logger.warning("connection test of destination %s failed: %s", destination.pk, type(exc).__name__)
        return False, f"the test failed ({type(exc).__name__})"
    return outcome.ok, outcome.reason


def _transmit(destination: Destination, instance: Instance, data: bytes, address: str) -> Outcome:
    """``address``: the host's address that ``reach_check`` allowed (C-STORE connects to it)."""
    if destination.kind == Destination.Kind.DIMSE:
        return _c_store(destination, instance, data, address)
    return _stow(destination, data)


# --- queueing ----------------------------------------------------------------------------------


def _send_task(task: str, args: list, countdown: float | None = None) -> None:
    """Enqueue by name after commit; a broker that is down loses nothing: the row is due in the
    database and ``deliveries_reconcile`` sends it."""
    from celery import current_app

    try:
        current_app.send_task(task, args=args, queue=QUEUE, countdown=countdown)
    except Exception as exc:
        if not is_transient(exc):
            raise
        logger.warning("broker unavailable: %s %s waits for the reconcile sweep", task, args)


def _enqueue_on_commit(task: str, args: list, countdown: float | None = None) -> None:
    transaction.on_commit(lambda: _send_task(task, args, countdown), robust=True)


def deliveries_queue(pairs: Iterable[tuple[Instance, Destination]]) -> list[int]:
    """A pending delivery for each (object, destination) pair not yet queued, sent after commit.
    A pair that has its row already keeps it (sent stays sent: a second export sends nothing)."""
    pairs = list(pairs)
    if not pairs:
        return []
    now = timezone.now()
    Delivery.objects.bulk_create(
        [
            Delivery(tenant_id=instance.tenant_id, instance=instance, destination=destination, next_attempt_at=now)
            for instance, destination in pairs
        ],
        ignore_conflicts=True,
    )
    wanted = Q()
    for instance, destination in pairs:
        wanted |= Q(instance_id=instance.pk, destination_id=destination.pk)
    ids = list(
        Delivery.objects.filter(wanted, status=Status.PENDING, next_attempt_at__isnull=False).values_list(
            "id", flat=True
        )
    )
    for delivery_id in ids:
        _enqueue_on_commit(SEND_TASK, [delivery_id])
    return ids


# --- one send ----------------------------------------------------------------------------------


def _backoff(attempts: int) -> float:
    return float(settings.SIGHTLINE_DICOM_SEND_RETRY_SECONDS) * 2 ** max(0, attempts - 1)


def delivery_send(*, delivery_id: int) -> str:
    """Send one delivery if it is due; the status it ends in. Redelivery-safe: only the task that
    moves the row to "sending" sends. The claim and its "dicom.send_attempted" access-log entry
    are one transaction, committed before a byte leaves: a worker that dies mid-send still left
    the disclosure's entry (the outcome, "dicom.sent", follows when the peer has answered)."""
    now = timezone.now()
    with transaction.atomic():
        claimed = Delivery.objects.filter(
            pk=delivery_id,
            status__in=(Status.PENDING, Status.RETRYING),
            next_attempt_at__lte=now + timedelta(seconds=EARLY_SECONDS),
        ).update(status=Status.SENDING, updated=now)
        delivery = Delivery.objects.select_related("instance", "destination").filter(pk=delivery_id).first()
        if delivery is None:
            return "gone"
        if not claimed:
            return delivery.status
        destination, instance = delivery.destination, delivery.instance
        if not destination.is_active:
            Delivery.objects.filter(pk=delivery.pk, status=Status.SENDING).update(
                status=Status.PENDING,
                next_attempt_at=None,
                error="The destination is switched off; this is sent when it is switched on again.",
                updated=timezone.now(),
            )
            return Status.PENDING
        refusal = _refusal(delivery)
        if refusal:
            logger.warning("delivery %s is not sent: %s", delivery.pk, refusal)
            return _fail(delivery, refusal)
        try:
            addresses = reach_check(destination)
        except DestinationRefused as exc:
            logger.warning("delivery %s is not sent: %s", delivery.pk, exc.message)
            return _fail(delivery, exc.message)
        except HostUnresolvable:
            return _record(delivery, Outcome(False, _unresolvable(destination)), disclosed=False)
        _disclosure_record(delivery, "dicom.send_attempted", AccessEvent.Outcome.SUCCESS)
    try:
        with instance.file.open("rb") as stored:
            data = stored.read()
    except Exception as exc:
        if not is_transient(exc):
            logger.exception("delivery %s: the object could not be read", delivery.pk)
        return _record(delivery, Outcome(False, "the object could not be read from storage"), disclosed=False)
    try:
        outcome = _transmit(destination, instance, data, str(addresses[0]))
    except SecretUnreadable as exc:
        return _record(delivery, Outcome(False, str(exc)), disclosed=False)
    except Exception as exc:  # a peer's odd answer (an aborted PDU, a bad header) is one failed attempt
        logger.warning("delivery %s: %s", delivery.pk, type(exc).__name__)
        outcome = Outcome(False, f"the send to {_where(destination)} failed ({type(exc).__name__})")
    return _record(delivery, outcome, disclosed=True)


def _disclosure_record(delivery: Delivery, action: str, outcome: str) -> None:
    """The sender's access-log entry about one object to one destination (call in a transaction)."""
    access_event_record(
        action=action,
        outcome=outcome,
        username=f"{SENDER_LABEL} → {delivery.destination.name}",
        tenant=delivery.destination.tenant,
        target_type="dicom_instance",
        target_id=delivery.instance_id,
    )


def _refusal(delivery: Delivery) -> str:
    """Why this delivery may never be sent, in words; "" when it may. The object's stored key must
    be inside the delivery's own hospital's storage area (recognition/storage.py decides), and the
    object and destination that hospital's, before a byte of the file is read."""
    instance, destination = delivery.instance, delivery.destination
    if instance.tenant_id != delivery.tenant_id or destination.tenant_id != delivery.tenant_id:
        return "the object or destination belongs to another hospital; it is never sent"
    try:
        storage_key_for_tenant(tenant_id=delivery.tenant_id, key=instance.file.name or "")
    except ForeignStorageKey:
        return "the object's stored file is not in this hospital's storage; it is never sent"
    return ""


def _fail(delivery: Delivery, reason: str) -> str:
    """A permanent refusal: failed at once with its reason (no retry, nothing sent, nothing
    disclosed); a person's resend tries again."""
    with transaction.atomic():
        row = Delivery.objects.select_for_update().get(pk=delivery.pk)
        row.attempts += 1
        row.status, row.next_attempt_at, row.updated = Status.FAILED, None, timezone.now()
        row.error = reason[:REASON_LENGTH]
        row.save(update_fields=["status", "attempts", "error", "next_attempt_at", "updated"])
    return row.status


def _record(delivery: Delivery, outcome: Outcome, *, disclosed: bool) -> str:
    """The attempt's answer and, where bytes went out (or may have), its access-log entry, in one
    transaction; a retry is enqueued after commit with its back-off."""
    now = timezone.now()
    retry_in = None
    with transaction.atomic():
        row = Delivery.objects.select_for_update().get(pk=delivery.pk)
        row.attempts += 1
        row.updated = now
        if outcome.ok:
            row.status, row.error, row.sent_at, row.next_attempt_at = Status.SENT, "", now, None
        elif row.attempts >= settings.SIGHTLINE_DICOM_SEND_MAX_ATTEMPTS:
            row.status, row.next_attempt_at = Status.FAILED, None
            row.error = f"{outcome.reason} — gave up after {row.attempts} attempts"[:REASON_LENGTH]
        else:
            retry_in = _backoff(row.attempts)
            row.status, row.next_attempt_at = Status.RETRYING, now + timedelta(seconds=retry_in)
            row.error = outcome.reason[:REASON_LENGTH]
        row.save(update_fields=["status", "attempts", "error", "sent_at", "next_attempt_at", "updated"])
        if disclosed:
            outcome_label = AccessEvent.Outcome.SUCCESS if outcome.ok else AccessEvent.Outcome.FAILED
            _disclosure_record(delivery, "dicom.sent", outcome_label)
        if retry_in is not None:
            _enqueue_on_commit(SEND_TASK, [row.pk], countdown=retry_in)
    return row.status


# --- a person's resend -------------------------------------------------------------------------


def _require_resend(actor: Membership, request=None) -> None:
    """A clinician (on the study page) or a tenant admin (on the destinations page)."""
    if can(actor, Action.REVIEW_WRITE):
        return
    require(actor, Action.MEMBERS_MANAGE, request=request)


def delivery_resend(*, actor: Membership, delivery_id: int, request=None) -> Delivery:
    """Send it again now, attempts counted afresh: the same object, byte for byte."""
    _require_resend(actor, request=request)
    # outside the transaction: another hospital's id stays logged as denied though the 404 is raised
    found = tenant_object_get(
        Delivery.objects.all(),
        membership=actor,
        pk=delivery_id,
        request=request,
        action="dicom.resend",
        target_type="delivery",
        message="No such delivery.",
    )
    with transaction.atomic():
        delivery = Delivery.objects.select_for_update().select_related("destination", "instance").get(pk=found.pk)
        if delivery.status == Status.SENDING:
            raise Conflict("It is being sent right now.", code="sending")
        delivery.status, delivery.attempts, delivery.error = Status.PENDING, 0, ""
        delivery.next_attempt_at = delivery.updated = timezone.now()
        delivery.save(update_fields=["status", "attempts", "error", "next_attempt_at", "updated"])
        member_action_record(actor, "dicom.resend", request=request, target_type="delivery", target_id=delivery.pk)
        _enqueue_on_commit(SEND_TASK, [delivery.pk])
    return delivery


def destination_deliveries_wake(destination: Destination) -> None:
    """A destination switched on again: what waited for it is due now (call in its transaction)."""
    ids = list(
        Delivery.objects.filter(
            destination=destination, status=Status.PENDING, next_attempt_at__isnull=True
        ).values_list("id", flat=True)
    )
    Delivery.objects.filter(pk__in=ids).update(next_attempt_at=timezone.now(), error="")
    for delivery_id in ids:
        _enqueue_on_commit(SEND_TASK, [delivery_id])


# --- what to send: exports ---------------------------------------------------------------------


def _destinations(tenant_id: int, *, send_on: str | None = None) -> list[Destination]:
    found = Destination.objects.filter(tenant_id=tenant_id, is_active=True)
    return list(found.filter(send_on=send_on) if send_on else found)


def _from_dicom(image) -> bool:
    """Findings go back as DICOM only for images that came in as DICOM (their original kept; a
    PNG/JPEG upload keeps an original too, until it is rendered)."""
    return bool(image.is_dicom and image.original)


def results_export_on_commit(request_ids: list[int]) -> None:
    """workers/outcomes.py, in the transaction that stores results: after commit, each new result
    of a DICOM image whose hospital sends on every result is exported (one query per batch)."""
    if request_ids:
        transaction.on_commit(lambda: _results_export_queue(request_ids), robust=True)


def _results_export_queue(request_ids: list[int]) -> None:
    from recognition.models import Result

    senders = Destination.objects.filter(
        tenant_id=OuterRef("tenant_id"), is_active=True, send_on=Destination.SendOn.RESULT
    )
    ids = (
        Result.objects.filter(request_id__in=request_ids, request__shadow=False)  # a shadow read is never sent
        .filter(image__format="DICOM")
        .exclude(image__original="")
        .filter(Exists(senders))
        .values_list("id", flat=True)
    )
    for result_id in ids:
        _send_task(RESULT_EXPORT_TASK, [result_id])


def review_export_on_commit(review) -> None:
    """recognition/services/reviews.py, in the sign-off's transaction: after commit, the signed
    review of a DICOM image goes to its hospital's destinations."""
    review_id, tenant_id = review.pk, review.tenant_id
    transaction.on_commit(lambda: _review_export_queue(review_id, tenant_id), robust=True)


def _review_export_queue(review_id: int, tenant_id: int) -> None:
    if Destination.objects.filter(tenant_id=tenant_id, is_active=True).exists():
        _send_task(REVIEW_EXPORT_TASK, [review_id])


def result_export(*, result_id: int) -> list[int]:
    """The AI finding's SR to the destinations that send on every result, then its map once the
    heatmap is ready (``map_follow``). The deliveries queued."""
    from recognition.models import Result

    from . import objects

    result = Result.objects.select_related("image", "model_version").filter(pk=result_id).first()
    if result is None or not _from_dicom(result.image):
        return []
    destinations = _destinations(result.tenant_id, send_on=Destination.SendOn.RESULT)
    if not destinations:
        return []
    try:
        report = objects.ai_report_for(result)
    except DomainError as exc:  # not DICOM after all, or a source no SR can be made of: never, not later
        _export_refused(result.tenant, REFUSED_RESULT, result.pk, exc.code)
        return []
    except Exception as exc:  # a library's own error (its text may quote a patient's value): permanent too
        if is_transient(exc):
            raise
        _export_refused(result.tenant, REFUSED_RESULT, result.pk, type(exc).__name__)
        return []
    with transaction.atomic():
        queued = deliveries_queue((report, destination) for destination in destinations)
        _enqueue_on_commit(MAP_FOLLOW_TASK, [result.pk])
    return queued


def review_export(*, review_id: int) -> list[int]:
    """A signed review's SR to every destination; the AI SR (and its map, ``map_follow``) to those
    that have not had it (destinations that send only after sign-off)."""
    from recognition.models import Review

    from . import objects

    review = Review.objects.select_related("image", "result").filter(pk=review_id).first()
    if review is None or review.signed_off_at is None or not _from_dicom(review.image):
        return []
    destinations = _destinations(review.tenant_id)
    if not destinations:
        return []
    pairs = []
    try:
        if review.result is not None:
            ai_report = objects.ai_report_for(review.result)
            pairs += [(ai_report, destination) for destination in destinations]
        verdict = objects.review_report_for(review)
    except DomainError as exc:
        _export_refused(review.tenant, REFUSED_REVIEW, review.pk, exc.code)
        return []
    except Exception as exc:  # a library's own error (its text may quote a patient's value): permanent too
        if is_transient(exc):
            raise
        _export_refused(review.tenant, REFUSED_REVIEW, review.pk, type(exc).__name__)
        return []
    pairs += [(verdict, destination) for destination in destinations]
    with transaction.atomic():
        queued = deliveries_queue(pairs)
        if review.result_id is not None:
            _enqueue_on_commit(MAP_FOLLOW_TASK, [review.result_id])
    return queued


# a made object that can never be made (dicomnet/objects.py's Unprocessable or NotDicomSource: a
# source highdicom cannot copy, not DICOM after all): recorded once in the access log, as the
# sender, failed, and never asked again by the sweep
EXPORT_REFUSED = "dicom.export_refused"
REFUSED_RESULT, REFUSED_REVIEW, REFUSED_MAP = "result", "review", "result_map"


def _export_refused(tenant, target_type: str, target_id: int, code: str) -> None:
    """Logged with its code (or the exception's class) only, never its text nor a traceback (a
    value copied from the source may be in it), and one "dicom.export_refused" entry per object."""
    logger.warning("%s %s is not exported as DICOM: %s", target_type, target_id, code)
    with transaction.atomic():
        if _refusals(target_type).filter(tenant=tenant, target_id=str(target_id)).exists():
            return
        access_event_record(
            action=EXPORT_REFUSED,
            outcome=AccessEvent.Outcome.FAILED,
            username=SENDER_LABEL,
            tenant=tenant,
            target_type=target_type,
            target_id=target_id,
        )


def _refusals(target_type: str) -> QuerySet:
    return AccessEvent.objects.filter(action=EXPORT_REFUSED, target_type=target_type)


def _refused(target_type: str) -> QuerySet:
    """For the sweep: the outer row's refusal entry (an Exists() subquery on the access log's
    tenant/target index)."""
    return _refusals(target_type).filter(
        tenant_id=OuterRef("tenant_id"), target_id=Cast(OuterRef("pk"), output_field=CharField())
    )


class MapPending(Exception):
    """The heatmap is being computed; ask again in a moment."""


def map_follow(*, result_id: int) -> list[int]:
    """The heatmap as a DICOM object to every destination its AI SR went to, once the worker has
    computed it (asked for here). Raises ``MapPending`` while it is computing; [] when the model
    makes none or there is nowhere to send it."""
    from recognition.models import Result
    from recognition.services.heatmaps import HeatmapStatus, result_heatmap_request, result_heatmap_status

    from . import objects

    destination_ids = set(
        Delivery.objects.filter(instance__result_id=result_id, instance__kind="ai_sr").values_list(
            "destination_id", flat=True
        )
    )
    if not destination_ids:
        return []
    result = Result.objects.select_related("image", "model_version").filter(pk=result_id).first()
    if result is None:
        return []
    status = result_heatmap_status(result)
    if status in (HeatmapStatus.NONE, HeatmapStatus.COMPUTING):
        status = result_heatmap_request(result_id=result_id).status
    if status == HeatmapStatus.UNAVAILABLE:
        return []
    if status != HeatmapStatus.READY:
        raise MapPending(f"the heatmap of result {result_id} is being computed")
    try:
        heatmap = objects.heatmap_object_for(result)
    except DomainError as exc:  # the source cannot carry a map as DICOM: never, not later
        _export_refused(result.tenant, REFUSED_MAP, result.pk, exc.code)
        return []
    except Exception as exc:  # a library's own error (its text may quote a patient's value): permanent too
        if is_transient(exc):
            raise
        _export_refused(result.tenant, REFUSED_MAP, result.pk, type(exc).__name__)
        return []
    if heatmap is None:  # the heatmap is stored, the image's display copy not yet
        raise MapPending(f"the image of result {result_id} is not rendered yet")
    destinations = Destination.objects.filter(pk__in=destination_ids, is_active=True)
    with transaction.atomic():
        return deliveries_queue((heatmap, destination) for destination in destinations)


# --- the sweep ---------------------------------------------------------------------------------


def deliveries_reconcile() -> int:
    """Periodic (Celery beat): rows due whose message was lost are sent again; a row left
    "sending" by a worker that died is due again; results still awaiting their map are followed.
    The number of tasks enqueued."""
    now = timezone.now()
    stalled = now - timedelta(seconds=settings.SIGHTLINE_DICOM_SEND_STALL_SECONDS)
    taken_over = list(
        Delivery.objects.filter(status=Status.SENDING, updated__lt=stalled).values_list("id", flat=True)[
            :RECONCILE_BATCH
        ]
    )
    Delivery.objects.filter(pk__in=taken_over, status=Status.SENDING).update(
        status=Status.RETRYING, next_attempt_at=now, updated=now, error="the sender stopped mid-send; sent again"
    )
    # a row due for longer than a sweep's period has lost its message (or the broker was down)
    overdue = now - timedelta(seconds=settings.SIGHTLINE_DICOM_RECONCILE_SECONDS)
    due = list(
        Delivery.objects.filter(status__in=(Status.PENDING, Status.RETRYING), next_attempt_at__lte=overdue)
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:RECONCILE_BATCH]
    )
    for delivery_id in taken_over + due:
        _send_task(SEND_TASK, [delivery_id])
    awaiting = list(_results_awaiting_map(now - RECONCILE_LOOKBACK)[:RECONCILE_BATCH])
    for result_id in awaiting:
        _send_task(MAP_FOLLOW_TASK, [result_id])
    since, before = (
        now - RECONCILE_EXPORT_LOOKBACK,
        now - 2 * timedelta(seconds=settings.SIGHTLINE_DICOM_RECONCILE_SECONDS),
    )
    results = list(_results_not_exported(since, before)[:RECONCILE_BATCH])
    for result_id in results:
        _send_task(RESULT_EXPORT_TASK, [result_id])
    reviews = list(_reviews_not_exported(since, before)[:RECONCILE_BATCH])
    for review_id in reviews:
        _send_task(REVIEW_EXPORT_TASK, [review_id])
    return len(taken_over) + len(due) + len(awaiting) + len(results) + len(reviews)


def _recent_ids(model) -> QuerySet:
    senders = Destination.objects.filter(is_active=True).values("tenant_id")
    return model.objects.filter(tenant_id__in=senders).order_by("-id").values("id")[:RECONCILE_RECENT]


def _results_not_exported(since, before) -> QuerySet:
    """Results of DICOM images whose hospital sends on every result (a destination there before
    the result), with no AI SR queued anywhere."""
    from recognition.models import Result

    senders = Destination.objects.filter(
        tenant_id=OuterRef("tenant_id"),
        is_active=True,
        send_on=Destination.SendOn.RESULT,
        created__lte=OuterRef("created"),
    )
    exported = Instance.objects.filter(result_id=OuterRef("pk"), kind="ai_sr", deliveries__isnull=False)
    return (
        Result.objects.filter(pk__in=_recent_ids(Result), created__gte=since, created__lt=before)
        .filter(image__format="DICOM", request__shadow=False)
        .exclude(image__original="")
        .filter(Exists(senders))
        .exclude(Exists(exported))
        .exclude(Exists(_refused(REFUSED_RESULT)))
        .values_list("id", flat=True)
    )


def _reviews_not_exported(since, before) -> QuerySet:
    """Signed-off reviews of DICOM images whose hospital had a destination, with no SR queued."""
    from recognition.models import Review

    senders = Destination.objects.filter(
        tenant_id=OuterRef("tenant_id"), is_active=True, created__lte=OuterRef("signed_off_at")
    )
    exported = Instance.objects.filter(review_id=OuterRef("pk"), kind="review_sr", deliveries__isnull=False)
    return (
        Review.objects.filter(pk__in=_recent_ids(Review), signed_off_at__gte=since, signed_off_at__lt=before)
        .filter(image__format="DICOM", result__isnull=False)
        .exclude(image__original="")
        .filter(Exists(senders))
        .exclude(Exists(exported))
        .exclude(Exists(_refused(REFUSED_REVIEW)))
        .values_list("id", flat=True)
    )


def _results_awaiting_map(since) -> QuerySet:
    """Results whose AI SR was queued somewhere, whose model explains itself and whose map is not
    made yet (nor impossible)."""
    from recognition.models import Result

    sent_sr = Instance.objects.filter(result_id=OuterRef("pk"), kind="ai_sr", deliveries__isnull=False)
    made_map = Instance.objects.filter(result_id=OuterRef("pk"), kind="map")
    return (
        Result.objects.filter(pk__in=_recent_ids(Result), created__gte=since, heatmap_error="")
        .filter(Exists(sent_sr))
        .exclude(Exists(made_map))
        .exclude(Exists(_refused(REFUSED_MAP)))
        .exclude(model_version__manifest__gradcam_layer=None)
        .exclude(model_version__manifest__gradcam_layer="")
        .values_list("id", flat=True)
    )


# --- what the study page shows -----------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRow:
    delivery: Delivery
    kind_label: str


def study_deliveries(*, membership: Membership, image) -> list[DeliveryRow]:
    """The made objects of the image's study × destinations, with their status (the image was
    reached through ``image_get``: the member may see it). No query for an image that did not
    come in as DICOM."""
    if not _from_dicom(image):
        return []
    deliveries = (
        Delivery.objects.for_tenant(membership.tenant)
        .filter(instance__study_id=image.study_id)
        .select_related("instance", "destination")
        .order_by("instance__created", "instance_id", "destination__name")
    )
    return [DeliveryRow(d, KIND_LABELS.get(d.instance.kind, d.instance.kind or "object")) for d in deliveries]


def can_resend(membership: Membership) -> bool:
    return can(membership, Action.REVIEW_WRITE) or can(membership, Action.MEMBERS_MANAGE)


def destination_deliveries_unsent(*, destinations: QuerySet[Destination]) -> QuerySet[Delivery]:
    """The destinations page: what is not (yet) sent, newest first."""
    return (
        Delivery.objects.filter(destination__in=destinations)
        .exclude(status=Status.SENT)
        .select_related("instance", "destination")
        .order_by("-updated", "-id")
    )


REFUSED_LABELS = {
    REFUSED_RESULT: "AI finding (SR) of result",
    REFUSED_REVIEW: "sign-off (SR) of review",
    REFUSED_MAP: "heatmap of result",
}


def exports_refused(*, tenant) -> QuerySet[AccessEvent]:
    """The destinations page: what can never be made as DICOM (so never sent), newest first."""
    return AccessEvent.objects.filter(tenant=tenant, action=EXPORT_REFUSED).order_by("-created", "-id")
