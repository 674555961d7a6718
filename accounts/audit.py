"""The access log's hash chains: append under the chain's lock, verify, prune.

Each hospital's entries (and the platform's own, for events outside any hospital) form a chain:
entry n stores the hash of entry n-1 and its own hash over that and its canonical content.
Appending locks the chain's head row, so concurrent writers queue instead of forking the chain;
the unique (chain, sequence) constraint would refuse a fork even so. Changing or deleting an
entry afterwards is refused by database triggers, and if someone disables them, the chain no
longer verifies from that entry on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, timedelta

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from .models import AccessEvent, AuditChain, AuditPrunePermit, Tenant

PLATFORM_CHAIN = "platform"
VERIFY_CHUNK_ROWS = 2000  # entries read per query while a chain is verified (memory stays flat)
_HASHED_FIELDS = (
    "chain",
    "sequence",
    "tenant_id",
    "actor_id",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "ip_address",
    "user_agent",
    "request_id",
)


def chain_key(tenant_id: int | None) -> str:
    return f"tenant-{tenant_id}" if tenant_id else PLATFORM_CHAIN


def entry_hash(event: AccessEvent) -> str:
    """sha256 over the previous entry's hash and this entry's canonical JSON."""
    content = {name: getattr(event, name) for name in _HASHED_FIELDS}
    content["created"] = event.created.astimezone(UTC).isoformat(timespec="microseconds")
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{event.previous_hash}\n{canonical}".encode()).hexdigest()


def _locked_head(key: str) -> AuditChain:
    try:
        return AuditChain.objects.select_for_update().get(key=key)
    except AuditChain.DoesNotExist:
        try:
            with transaction.atomic():
                AuditChain.objects.create(key=key)
        except IntegrityError:  # another writer created it first
            pass
        return AuditChain.objects.select_for_update().get(key=key)


def chain_append(event: AccessEvent) -> AccessEvent:
    """Give the event its place in its chain and insert it, in the caller's transaction (or in a
    transaction of its own): the entry and the action commit together or not at all. No
    savepoint inside the action's transaction (two statements fewer per entry): an append that
    fails fails the action with it."""
    with transaction.atomic(savepoint=False):
        event.chain = chain_key(event.tenant_id)
        head = _locked_head(event.chain)
        event.sequence, event.previous_hash = head.sequence + 1, head.head_hash
        event.created = timezone.now()  # under the lock: time runs with the sequence
        event.entry_hash = entry_hash(event)
        event.save(force_insert=True)
        AuditChain.objects.filter(pk=head.pk).update(sequence=event.sequence, head_hash=event.entry_hash)
    return event


@dataclass(frozen=True)
class ChainReport:
    chain: str
    checked: int
    ok: bool
    first_bad_sequence: int | None = None
    first_bad_id: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"{self.chain}: {self.checked} entries verify"
        where = f"entry {self.first_bad_sequence}" + (f" (id {self.first_bad_id})" if self.first_bad_id else "")
        return f"{self.chain}: {where} does not verify: {self.reason}"


def chain_verify(key: str) -> ChainReport:
    """Walk one chain from its first kept entry; name the first entry that does not verify."""
    head = AuditChain.objects.filter(key=key).first()
    if head is None:
        return ChainReport(key, 0, False, reason="no such chain")
    expected, previous, checked = head.first_sequence, head.anchor_hash, 0
    entries = AccessEvent.objects.filter(chain=key).order_by("sequence")
    for event in entries.iterator(chunk_size=VERIFY_CHUNK_ROWS):
        if event.sequence < head.first_sequence:
            return ChainReport(key, checked, False, event.sequence, event.pk, "an entry before the first kept one")
        if event.sequence != expected:
            return ChainReport(
                key, checked, False, expected, None, f"missing (deleted?); the next entry present is {event.sequence}"
            )
        if event.previous_hash != previous:
            return ChainReport(key, checked, False, event.sequence, event.pk, "it does not follow the entry before it")
        if entry_hash(event) != event.entry_hash:
            return ChainReport(key, checked, False, event.sequence, event.pk, "its content was changed")
        previous, expected, checked = event.entry_hash, expected + 1, checked + 1
    if expected - 1 != head.sequence:
        return ChainReport(key, checked, False, expected, None, f"missing; the chain's head is at {head.sequence}")
    return ChainReport(key, checked, True)


def chains_verify(tenant: Tenant | None = None) -> list[ChainReport]:
    keys = [chain_key(tenant.pk)] if tenant else list(AuditChain.objects.order_by("key").values_list("key", flat=True))
    return [chain_verify(key) for key in keys]


@dataclass(frozen=True)
class PruneReport:
    chain: str
    pruned: int
    first_kept: int


def chain_prune(tenant: Tenant, *, now=None) -> PruneReport | None:
    """Delete a hospital's entries older than its retention, oldest first, keeping the chain
    verifiable from the first kept entry; the pruning itself is recorded in the chain."""
    if not tenant.audit_retention_days:
        return None
    cutoff = (now or timezone.now()) - timedelta(days=tenant.audit_retention_days)
    key = chain_key(tenant.pk)
    with transaction.atomic():
        head = _locked_head(key)
        old = AccessEvent.objects.filter(chain=key, sequence__gte=head.first_sequence, created__lt=cutoff)
        last = old.order_by("-sequence").values_list("sequence", "entry_hash").first()
        if last is None:
            return PruneReport(key, 0, head.first_sequence)
        last_sequence, last_hash = last
        first = head.first_sequence
        permit = AuditPrunePermit.objects.create()
        with connection.cursor() as cursor:  # the model refuses deletes: this is the one sanctioned path
            cursor.execute(
                f"DELETE FROM {AccessEvent._meta.db_table} WHERE chain = %s AND sequence <= %s",  # noqa: S608
                [key, last_sequence],
            )
            pruned = cursor.rowcount
        permit.delete()
        AuditChain.objects.filter(pk=head.pk).update(first_sequence=last_sequence + 1, anchor_hash=last_hash)
        chain_append(
            AccessEvent(
                tenant=tenant,
                action="audit.prune",
                outcome=AccessEvent.Outcome.SUCCESS,
                actor_label="prune_audit_log",
                target_type="audit_entries",
                target_id=f"{first}-{last_sequence}",
            )
        )
    return PruneReport(key, pruned, last_sequence + 1)


def audit_verify_and_alert() -> bool:
    """Verify every chain; for each that fails, log an error and record an ``audit.tampered``
    security event in the platform's chain (naming the chain and the first bad entry); when all
    verify, record ``audit.verified`` there (``sightline_audit_verified_last_timestamp_seconds``)."""
    import logging

    failed = [report for report in chains_verify() if not report.ok]
    for report in failed:
        logging.getLogger(__name__).error("access log does not verify: %s", report)
        chain_append(
            AccessEvent(
                action="audit.tampered",
                outcome=AccessEvent.Outcome.FAILED,
                actor_label="verify_audit_log",
                target_type="audit_chain",
                target_id=f"{report.chain}#{report.first_bad_sequence}",
            )
        )
    if not failed:  # the run's own trace: /metrics exports the newest (an alert when they stop)
        chain_append(
            AccessEvent(
                action="audit.verified",
                outcome=AccessEvent.Outcome.SUCCESS,
                actor_label="verify_audit_log",
                target_type="audit_chain",
                target_id="all",
            )
        )
    return not failed
