"""The worker side of intake: an archive's entries, or a prefix's files, become items, entry by
entry, so the web process never holds an archive in memory; claims keep two expanders apart, and
reconciliation finishes or refuses what a crash left. Safe to run again: a crash half-way is
finished by the next expansion, which skips the entries already made."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import Membership

from ...archive import ArchiveLimits, ArchiveRefused, read_archive
from ...models import ERROR_LENGTH, REASON_LENGTH, BatchItem, BatchJob, BatchUpload
from ...storage import ForeignStorageKey, storage_key_for_tenant
from . import intake
from .bookkeeping import batch_jobs_notify
from .intake import batch_file_items, batch_upload_abandon

logger = logging.getLogger(__name__)
Item, Job, Upload = BatchItem.Status, BatchJob.Status, BatchUpload.Status
SHOWN_NAME_CHARS = 80  # of an archive entry's name in a refusal
# Entries skipped (done before a restart) between heartbeats: a skip costs next to nothing, so the
# claim is renewed every so many rather than on each.
HOLD_EVERY_ENTRIES = 25
# A stored upload whose expansion has not started this long after it was stored lost its message
# (a broker outage at enqueue): reconciliation queues it again.
RECEIVED_GRACE = timedelta(seconds=30)


class _Entry(File):
    def __init__(self, data: bytes, size: int):
        super().__init__(ContentFile(data), name="entry")
        self.size = size


def _shown(name: str) -> str:
    # a listed name as the hospital's storage holds it, control characters escaped
    return ascii(name[:SHOWN_NAME_CHARS])


def _prefix_files(upload: BatchUpload, skip: set[int]) -> Iterator[tuple[int, bytes | None, str]]:
    """Every file under the prefix, depth first, in name order: (position, bytes, error); the
    positions in ``skip`` are not read (an earlier attempt made them).

    Every key the listing names is put to `storage_key_for_tenant` before it is listed further or
    read, so whatever the first check let through, a listing cannot lead out of the hospital's own
    imports: a key that fails is a failed entry, in words, and is never read. A missing or empty
    prefix, a listing that names a key twice, or more files than an archive may hold, refuse the
    upload in words."""

    def own(key: str) -> str:
        return storage_key_for_tenant(tenant_id=upload.tenant_id, key=key, under="imports")

    try:
        prefix = own(upload.source)
    except ForeignStorageKey as exc:
        raise ArchiveRefused("foreign_prefix", exc.message) from exc
    limit, max_bytes = settings.SIGHTLINE_ARCHIVE_MAX_ENTRIES, settings.SIGHTLINE_MAX_UPLOAD_BYTES
    seen: set[str] = set()
    position = 0

    def entry() -> int:
        nonlocal position
        if position >= limit:
            raise ArchiveRefused("too_many_entries", f"There are more than {limit} files under {prefix}.")
        position += 1
        return position

    def once(key: str) -> None:
        if key in seen:
            raise ArchiveRefused(
                "repeated_key", f"The storage listed {_shown(key)} twice, so its listing cannot be trusted."
            )
        seen.add(key)

    stack = [prefix]
    while stack:
        folder = stack.pop()
        try:
            folders, files = default_storage.listdir(folder)
        except FileNotFoundError:
            folders, files = [], []  # local files: a folder that is not there (the prefix, or one removed since)
        below = []
        for name in sorted(folders):
            key = f"{folder}{name}/"
            try:
                below.append(own(key))
            except ForeignStorageKey as exc:
                yield entry(), None, f"The folder {_shown(name)} was not read: {exc.message}"
                continue
            once(key)
        stack.extend(reversed(below))
        for name in sorted(files):
            at, key = entry(), f"{folder}{name}"
            try:
                own(key)
            except ForeignStorageKey as exc:
                yield at, None, f"The file {_shown(name)} was not read: {exc.message}"
                continue
            once(key)
            if at in skip:
                yield at, None, ""
                continue
            yield at, *_read_listed(key, max_bytes)
    if not position:
        raise ArchiveRefused("empty", f"There are no files under {prefix}.")


def _read_listed(key: str, max_bytes: int) -> tuple[bytes | None, str]:
    try:
        if default_storage.size(key) > max_bytes:
            return None, "the file is larger than the upload limit"
        with default_storage.open(key, "rb") as handle:
            data = handle.read(max_bytes + 1)  # bounded even if it grew since it was sized
    except FileNotFoundError:
        return None, "the file was removed before it could be read"
    if len(data) > max_bytes:
        return None, "the file is larger than the upload limit"
    return data, ""


def batch_upload_expand(*, upload_id: int) -> None:
    """Worker task: turn an archive's entries (or a prefix's files) into items. Safe to run
    again after a crash: entries already made are skipped, the upload completes once.

    An expander writes only while the claim it took is still the upload's and the job still open
    (`_hold`), so one taken for dead that wakes later adds nothing. An attempt that ends in an
    error is released for the next one; after SIGHTLINE_UPLOAD_MAX_ATTEMPTS in a row without a
    new item (crashes included: see `_uploads_give_up`) the upload is refused in words."""
    upload = BatchUpload.objects.select_related("job").filter(pk=upload_id).first()
    if upload is None:
        return
    claim = _claim_expansion(upload)
    if not claim:
        return  # finished, refused, still arriving, being expanded by a live worker, or given up now
    job = upload.job
    membership = Membership.objects.filter(user=job.created_by, tenant=job.tenant, is_active=True).first()
    if membership is None:
        _finish_upload(upload, claim, Upload.REFUSED, "the job's owner no longer has access to this hospital")
        return
    done = set(BatchItem.objects.filter(upload=upload).values_list("position", flat=True))
    entries = 0
    try:
        for position, data, error in _upload_entries(upload, done):
            entries += 1
            if position in done:
                if entries % HOLD_EVERY_ENTRIES == 0 and not _hold(upload, claim, made=False):  # alive, and still ours
                    return _lost(upload, claim)
                continue
            if not _add_entry(membership, job, upload, claim, position, data, error):
                return _lost(upload, claim)
    except ArchiveRefused as exc:
        _finish_upload(upload, claim, Upload.REFUSED, exc.message, entries)
        return
    except BaseException as exc:
        _release(upload, claim, exc)
        raise
    _finish_upload(upload, claim, Upload.COMPLETE, "", entries)


def _stalled_before():
    return timezone.now() - timedelta(seconds=settings.SIGHTLINE_UPLOAD_STALL_SECONDS)


def _claimable() -> Q:
    """Uploads an expander may take: received ones, and ones whose expander has shown no sign of
    life for the stall time (its worker died)."""
    stale = Q(status=Upload.EXPANDING) & (Q(touched_at__isnull=True) | Q(touched_at__lt=_stalled_before()))
    return Q(status=Upload.RECEIVED) | stale


def _claim_expansion(upload: BatchUpload) -> int:
    """Take the upload for expansion with one conditional UPDATE, so two never share it; the
    claim number it returns (0: not taken) is what the expander's writes are checked against.
    An upload whose attempts are spent is refused here instead."""
    with transaction.atomic():
        taken = BatchUpload.objects.filter(
            _claimable(), pk=upload.pk, attempts__lt=settings.SIGHTLINE_UPLOAD_MAX_ATTEMPTS
        ).update(
            status=Upload.EXPANDING,
            touched_at=timezone.now(),
            attempts=F("attempts") + 1,
            claim=F("claim") + 1,
            error="",  # what stops this attempt, if anything, is written when it stops
        )
        if taken:
            return BatchUpload.objects.filter(pk=upload.pk).values_list("claim", flat=True).get()
    _uploads_give_up(Q(pk=upload.pk))
    return 0


def _hold(upload: BatchUpload, claim: int, *, made: bool) -> bool:
    """In the entry's transaction: the claim is still ours and the job still open (PostgreSQL
    keeps the row locked until the entry commits, so no claim or start slips in between). An
    entry made counts as progress: the attempts in a row without one start again."""
    progress = {"attempts": 1} if made else {}
    return bool(
        BatchUpload.objects.filter(pk=upload.pk, status=Upload.EXPANDING, claim=claim, job__status=Job.OPEN).update(
            touched_at=timezone.now(), **progress
        )
    )


def _lost(upload: BatchUpload, claim: int) -> None:
    """The expander may not write any more: if only because the job was cancelled, the upload
    ends refused; if another expander holds it now, that one finishes it."""
    closed = BatchUpload.objects.filter(pk=upload.pk, status=Upload.EXPANDING, claim=claim).exclude(
        job__status=Job.OPEN
    )
    if closed.exists():
        _finish_upload(upload, claim, Upload.REFUSED, "the job was cancelled before this upload was unpacked")


def _release(upload: BatchUpload, claim: int, exc: BaseException) -> None:
    """An attempt that ended in an error: hand the upload back for the next attempt (Celery's retry
    or reconciliation), keeping why; or, with the attempts spent, refuse it now."""
    reason = f"the last attempt stopped on an error ({type(exc).__name__})"
    try:
        with transaction.atomic():
            BatchUpload.objects.filter(pk=upload.pk, status=Upload.EXPANDING, claim=claim).update(
                status=Upload.RECEIVED, touched_at=timezone.now(), error=reason
            )
        _uploads_give_up(Q(pk=upload.pk))
    except Exception:  # the database is away too: reconciliation takes it over after the stall time
        logger.exception("upload %s: could not hand it back after an error", upload.pk)


def _uploads_give_up(condition: Q) -> int:
    """Uploads waiting for another attempt that have had SIGHTLINE_UPLOAD_MAX_ATTEMPTS in a row
    without a new item are refused in words and their archives deleted. Returns how many."""
    cap = settings.SIGHTLINE_UPLOAD_MAX_ATTEMPTS
    spent = BatchUpload.objects.select_related("job").filter(condition & _claimable(), attempts__gte=cap)
    refused = 0
    for upload in spent:
        why = upload.error or "the worker stopped while unpacking it"
        message = f"Unpacking stopped {cap} times in a row without progress ({why}); the upload is refused."
        if upload.kind == "zip":
            message += " Check the archive and send it again."
        refused += _finish_upload(upload, upload.claim, Upload.REFUSED, message, status_was=upload.status)
    return refused


def _upload_entries(upload: BatchUpload, skip: set[int]) -> Iterator[tuple[int, bytes | None, str]]:
    if upload.kind == "prefix":
        yield from _prefix_files(upload, skip)
        return
    limits = ArchiveLimits(
        max_entries=settings.SIGHTLINE_ARCHIVE_MAX_ENTRIES,
        max_entry_bytes=settings.SIGHTLINE_MAX_UPLOAD_BYTES,
        max_total_bytes=settings.SIGHTLINE_ARCHIVE_MAX_BYTES,
        max_ratio=settings.SIGHTLINE_ARCHIVE_MAX_RATIO,
    )
    try:  # a key the server made, checked all the same before it is read
        source = storage_key_for_tenant(tenant_id=upload.tenant_id, key=upload.source, under="archives")
    except ForeignStorageKey as exc:
        raise ArchiveRefused("foreign_archive", exc.message) from exc
    try:
        archive = default_storage.open(source, "rb")
    except FileNotFoundError:
        raise ArchiveRefused("missing", "The stored archive is gone; send it again.") from None
    with archive:
        for item in read_archive(archive, limits):
            yield item.index + 1, item.data, item.error


def _add_entry(membership, job, upload, claim, position, data, error) -> bool:
    """One entry's items, in one transaction; False (nothing written) when the claim is lost."""
    with transaction.atomic():
        if not _hold(upload, claim, made=True):
            return False
        if error:
            BatchItem.objects.create(
                tenant=job.tenant,
                job=job,
                upload=upload,
                position=position,
                status=Item.FAILED,
                error=error[:ERROR_LENGTH],
            )
        else:
            batch_file_items(membership, job, upload, position, _Entry(data, len(data)))
    return True


def _finish_upload(
    upload: BatchUpload, claim: int, status: str, error: str, entries: int = 0, *, status_was: str = Upload.EXPANDING
) -> int:
    """End the upload, if the claim is still the one given; the archive goes (its entries are
    images now, or failed items). Returns 1 when it was ended here."""
    ended = BatchUpload.objects.filter(pk=upload.pk, status=status_was, claim=claim).update(
        status=status, error=error[:REASON_LENGTH], entries=entries, finished_at=timezone.now()
    )
    if ended:
        if upload.kind == "zip":
            default_storage.delete(upload.source)
        batch_jobs_notify([upload.job])
    return ended


def batch_uploads_reconcile() -> int:
    """Archives that stopped arriving are removed and refused; received ones whose expansion
    message was lost, and expansions whose worker died, are queued again (expansion resumes
    where it stopped), unless their attempts are spent: those are refused in words. Returns how
    many uploads were touched."""
    stalled = _stalled_before()
    abandoned = list(BatchUpload.objects.select_related("job").filter(status=Upload.RECEIVING, touched_at__lt=stalled))
    for upload in abandoned:
        batch_upload_abandon(upload, "the upload did not finish (the server stopped while storing it); send it again")
    overdue = Q(status=Upload.RECEIVED, touched_at__lt=timezone.now() - RECEIVED_GRACE) | (
        Q(status=Upload.EXPANDING) & (Q(touched_at__isnull=True) | Q(touched_at__lt=stalled))
    )
    given_up = _uploads_give_up(overdue)
    waiting = list(BatchUpload.objects.filter(overdue).values_list("pk", flat=True))
    for upload_id in waiting:
        intake.batch_upload_expand_enqueue(upload_id)  # through the module: tests replace it there
    if abandoned or waiting or given_up:
        logger.warning(
            "reconciled uploads: %d abandoned, %d given up, %d queued again", len(abandoned), given_up, len(waiting)
        )
    return len(abandoned) + given_up + len(waiting)
