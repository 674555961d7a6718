"""Bulk jobs: create (idempotently), add files, a zip or a storage prefix, start, cancel, retry.

Archives and prefixes are expanded by a worker task, entry by entry, so the web process never
holds an archive in memory and a crash half-way leaves an upload that is visibly not complete
(and is finished by the next expansion, which skips the entries already made). Starting a job
creates one bulk-priority request per item; the engine claims bulk work round-robin across
hospitals and always after interactive work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.storage import default_storage
from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from accounts.events import send_many_on_commit, tenant_group
from accounts.models import AccessEvent, Membership
from accounts.permissions import Action
from accounts.services import access_event_record, require
from config.errors import Conflict, DomainError, Invalid, NotFound
from config.spreadsheet import spreadsheet_safe
from core.bulk import rows_update

from ..archive import ArchiveLimits, ArchiveRefused, read_archive
from ..enqueue import task_send
from ..models import AIModel, BatchItem, BatchJob, BatchUpload, InferenceRequest, ModelAlias, ModelPin, ModelVersion
from ..selectors import not_found_recorded
from ..storage import ForeignStorageKey, archive_key, storage_key_for_tenant
from .images import images_upload
from .inference import inference_enqueue

logger = logging.getLogger(__name__)
Item, Job, Upload = BatchItem.Status, BatchJob.Status, BatchUpload.Status


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Failures of the platform, not of an entry: the database or the object store briefly away.
    They end the attempt (the upload is unpacked again, up to the cap), never fail one entry."""
    errors: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no S3 support installed
        return errors
    return (*errors, BotoCoreError)


TRANSIENT = _transient_errors()


def _job_version(*, tenant, model: str, alias: str, version: str) -> ModelVersion:
    name = model or settings.SIGHTLINE_DEFAULT_MODEL
    family = AIModel.objects.filter(name=name).first()
    if family is None:
        raise NotFound(f"There is no model called {name!r}.", code="unknown_model")
    if version:
        found = ModelVersion.objects.filter(model=family, version=version).first()
        if found is None:
            raise NotFound(f"{name} has no version {version!r}.", code="unknown_version")
        from .registry import model_version_require_ready  # registry imports this module's neighbours

        model_version_require_ready(version=found)  # 409 for a version still validating or refused
        return found
    if not alias:  # the hospital's pin wins over the production alias, as for single uploads
        pin = ModelPin.objects.for_tenant(tenant).filter(model=family).select_related("version").first()
        if pin is not None:
            return pin.version
    row = ModelAlias.objects.filter(model=family, name=alias or ModelAlias.Name.PRODUCTION).first()
    if row is None:
        raise NotFound(f"{name} has no {alias or 'production'} alias.", code="unknown_alias")
    return row.version


def batch_job_create(
    *,
    membership: Membership,
    name: str,
    model: str = "",
    alias: str = "",
    version: str = "",
    idempotency_key: str = "",
    request=None,
) -> tuple[BatchJob, bool]:
    """A new open job, or — for a repeated Idempotency-Key — the job that key made. (job, created)"""
    require(membership, Action.BATCH_SUBMIT, request=request)
    name = name.strip()[:200]
    if not name:
        raise Invalid("Give the job a name.", code="name_required")
    if len(idempotency_key) > 128:
        raise Invalid("The Idempotency-Key is longer than 128 characters.", code="bad_idempotency_key")
    chosen = _job_version(tenant=membership.tenant, model=model, alias=alias, version=version)
    with transaction.atomic():
        if idempotency_key:
            existing = (
                BatchJob.objects.for_tenant(membership.tenant)
                .select_for_update()
                .filter(created_by=membership.user, idempotency_key=idempotency_key)
                .first()
            )
            if existing is not None:
                if (existing.name, existing.model_version_id) != (name, chosen.pk):
                    raise Conflict(
                        "This Idempotency-Key was used for a different job; use a new key.", code="idempotency_mismatch"
                    )
                return existing, False
        try:
            with transaction.atomic():  # a savepoint: a concurrent create with the same key may win
                job = BatchJob.objects.create(
                    tenant=membership.tenant,
                    name=name,
                    model_version=chosen,
                    created_by=membership.user,
                    idempotency_key=idempotency_key,
                )
        except IntegrityError:
            # the unique key: another request with this key committed its job while this one
            # inserted (PostgreSQL makes the insert wait for it), so that job is the answer
            existing = (
                BatchJob.objects.for_tenant(membership.tenant)
                .filter(created_by=membership.user, idempotency_key=idempotency_key)
                .first()
                if idempotency_key
                else None
            )
            if existing is None:
                raise
            if (existing.name, existing.model_version_id) != (name, chosen.pk):
                raise Conflict(
                    "This Idempotency-Key was used for a different job; use a new key.", code="idempotency_mismatch"
                ) from None
            return existing, False
        _record(membership, "batch.create", job, request)
    return job, True


def _record(membership: Membership, action: str, job: BatchJob, request) -> None:
    access_event_record(
        action=action,
        request=request,
        user=membership.user,
        tenant=membership.tenant,
        target_type="batch_job",
        target_id=job.pk,
    )


def batch_job_get(*, membership: Membership, job_id: int, request=None, for_update: bool = False) -> BatchJob:
    """One job of the member's hospital (another hospital's is a 404, and logged)."""
    require(membership, Action.IMAGE_VIEW, request=request)
    jobs = BatchJob.objects.for_tenant(membership.tenant).select_related("model_version__model")
    job = (jobs.select_for_update() if for_update else jobs).filter(pk=job_id).first()
    if job is None:
        raise not_found_recorded(
            membership=membership,
            request=request,
            action="batch.view",
            target_type="batch_job",
            target_id=job_id,
            message="No such job.",
        )
    return job


def _open_job(membership: Membership, job_id: int, request) -> BatchJob:
    require(membership, Action.BATCH_SUBMIT, request=request)
    job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
    if job.status != Job.OPEN:
        raise Conflict("Items can be added only before the job starts.", code="job_started")
    return job


def _next_position(job: BatchJob) -> int:
    last = BatchItem.objects.filter(job=job, upload=None).order_by("-position").values_list("position", flat=True)
    return (last.first() or 0) + 1


def batch_items_add_files(*, membership: Membership, job_id: int, files: list, request=None) -> list[BatchItem]:
    """Files sent with the request: each becomes an item (a DICOM file, one per frame); a file
    that is not a usable image, or that its reader fails on, becomes a failed item that says why.
    The others go on.

    Each file is added in its own transaction that holds the job's row lock and sees the job still
    open, so a start that comes meanwhile waits for that file and queues it; the files after it are
    refused (409, saying how many were added), never left pending in a running job."""
    items: list[BatchItem] = []
    with transaction.atomic():
        job = _open_job(membership, job_id, request)  # 404 and 409 before anything is read
    for index, upload in enumerate(files):
        with transaction.atomic():
            try:
                job = _open_job(membership, job_id, request)
            except Conflict:
                if not index:
                    raise
                raise Conflict(
                    f"The job started while these files were being added: the first {index} of {len(files)} "
                    "were added and are being read; the others were not added.",
                    code="job_started",
                    detail={"added": index},
                ) from None
            items.extend(_file_items(membership, job, None, _next_position(job), upload, request))
    _notify([job])
    return items


def _file_items(membership, job, upload, position, file, request=None) -> list[BatchItem]:
    """The items one file becomes: its images (a DICOM file's frames follow the first, each with
    a place of its own), or one failed item that says why. Any error that is not the platform's
    (see TRANSIENT) is this file's alone: the reader failing on it fails it, not the upload."""
    try:
        with transaction.atomic():
            images = images_upload(membership=membership, upload=file, request=request, read=False)
    except DomainError as exc:
        error = exc.message
    except TRANSIENT:
        raise
    except Exception as exc:
        logger.exception("job %s: the reader failed on an entry at position %s", job.pk, position)
        error = f"This file could not be read: its reader failed on it ({type(exc).__name__}). The other files go on."
    else:
        first = BatchItem.objects.create(tenant=job.tenant, job=job, upload=upload, position=position, image=images[0])
        items = [first]
        for image in images[1:]:
            items.append(
                BatchItem.objects.create(tenant=job.tenant, job=job, position=_next_position(job), image=image)
            )
        return items
    failed = BatchItem.objects.create(
        tenant=job.tenant, job=job, upload=upload, position=position, status=Item.FAILED, error=error[:500]
    )
    return [failed]


def batch_upload_zip(*, membership: Membership, job_id: int, archive, request=None) -> BatchUpload:
    """Store the archive as it came (Django has spooled it to a temporary file, not memory) and
    queue its expansion; nothing of it counts until the expansion is complete.

    The upload row, with the key the archive will have, is written before a byte is stored: if
    the process dies while storing, reconciliation finds the row still "receiving", deletes
    whatever reached storage and refuses the upload in words. No orphan file, no silent loss."""
    with transaction.atomic():
        job = _open_job(membership, job_id, request)
        upload = BatchUpload.objects.create(
            tenant=job.tenant,
            job=job,
            kind="zip",
            source=archive_key(tenant_id=job.tenant_id),
            status=Upload.RECEIVING,
            touched_at=timezone.now(),
        )
    try:
        stored = default_storage.save(upload.source, File(archive))
        if stored != upload.source:  # a storage that renamed it: keep the two in step
            BatchUpload.objects.filter(pk=upload.pk).update(source=stored)
        with transaction.atomic():
            BatchUpload.objects.filter(pk=upload.pk).update(status=Upload.RECEIVED, touched_at=timezone.now())
            _record(membership, "batch.add_archive", job, request)
            transaction.on_commit(lambda: _enqueue_expand(upload.pk), robust=True)
    except BaseException:
        _abandon_receiving(upload, "the archive could not be stored; send it again")
        raise
    upload.refresh_from_db()
    return upload


def _abandon_receiving(upload: BatchUpload, reason: str) -> None:
    """An archive that never finished arriving: what reached storage goes, the upload is refused."""
    default_storage.delete(upload.source)
    BatchUpload.objects.filter(pk=upload.pk, status=Upload.RECEIVING).update(
        status=Upload.REFUSED, error=reason, finished_at=timezone.now()
    )
    _notify([upload.job])


def batch_upload_prefix(*, membership: Membership, job_id: int, prefix: str, request=None) -> BatchUpload:
    """Import every file under a storage prefix the hospital owns (tenants/<id>/imports/…).

    The prefix must already be a plain key in that area (`storage_key_for_tenant`): nothing is
    normalised into something acceptable. Anything else is a 400 that lists and reads nothing,
    and the attempt is in the access log."""
    refused = None
    with transaction.atomic():
        job = _open_job(membership, job_id, request)
        folder = prefix if prefix.endswith("/") else prefix + "/"  # the one liberty: "…/night" means the folder
        try:
            folder = storage_key_for_tenant(tenant_id=job.tenant_id, key=folder, under="imports")
            if len(folder) > BatchUpload.SOURCE_MAX_LENGTH:
                raise ForeignStorageKey(f"The prefix is longer than {BatchUpload.SOURCE_MAX_LENGTH} characters.")
        except ForeignStorageKey as exc:
            refused = exc
        else:
            upload = BatchUpload.objects.create(tenant=job.tenant, job=job, kind="prefix", source=folder)
            _record(membership, "batch.add_prefix", job, request)
            transaction.on_commit(lambda: _enqueue_expand(upload.pk), robust=True)
    if refused is not None:
        with transaction.atomic():
            access_event_record(
                action="batch.add_prefix",
                outcome=AccessEvent.Outcome.DENIED,
                request=request,
                user=membership.user,
                tenant=membership.tenant,
                target_type="batch_job",
                target_id=job_id,
            )
        raise refused
    return upload


def _enqueue_expand(upload_id: int) -> None:
    # the broker down: the upload stays received and reconciliation enqueues it again
    task_send("workers.tasks.batch_expand", args=[upload_id], queue="maintenance")


class _Entry(File):
    def __init__(self, data: bytes, size: int):
        super().__init__(ContentFile(data), name="entry")
        self.size = size


def _shown(name: str) -> str:
    return ascii(name[:80])  # a listed name as the hospital's storage holds it, control characters escaped


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
                if entries % 25 == 0 and not _hold(upload, claim, made=False):  # alive, and still ours
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
                tenant=job.tenant, job=job, upload=upload, position=position, status=Item.FAILED, error=error[:500]
            )
        else:
            _file_items(membership, job, upload, position, _Entry(data, len(data)))
    return True


def _finish_upload(
    upload: BatchUpload, claim: int, status: str, error: str, entries: int = 0, *, status_was: str = Upload.EXPANDING
) -> int:
    """End the upload, if the claim is still the one given; the archive goes (its entries are
    images now, or failed items). Returns 1 when it was ended here."""
    ended = BatchUpload.objects.filter(pk=upload.pk, status=status_was, claim=claim).update(
        status=status, error=error[:300], entries=entries, finished_at=timezone.now()
    )
    if ended:
        if upload.kind == "zip":
            default_storage.delete(upload.source)
        _notify([upload.job])
    return ended


def batch_job_start(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """Queue every pending item at bulk priority, in chunks the worker batches."""
    with transaction.atomic():
        job = _open_job(membership, job_id, request)
        if _uploads_pending(job).exists():
            raise Conflict("An archive is still being unpacked; start the job when it is done.", code="expanding")
        job.status, job.started_at = Job.RUNNING, timezone.now()
        job.resumed_at = job.started_at
        job.save(update_fields=["status", "started_at", "resumed_at"])
        _queue(job, BatchItem.objects.filter(job=job, status=Item.PENDING, image__isnull=False))
        _record(membership, "batch.start", job, request)
        _notify([job])
    return job


def _queue(job: BatchJob, items) -> None:
    """One bulk request per item, created in bulk; wake-ups go out after commit, one per chunk."""
    chunk = job.model_version.manifest.get("max_batch_size") or settings.SIGHTLINE_MAX_BATCH_SIZE
    pending = list(items.values_list("id", "image_id"))
    for start in range(0, len(pending), 1000):
        part = pending[start : start + 1000]
        requests = InferenceRequest.objects.bulk_create(
            [
                InferenceRequest(
                    tenant_id=job.tenant_id,
                    image_id=image_id,
                    model_version_id=job.model_version_id,
                    priority=InferenceRequest.Priority.BULK,
                )
                for _, image_id in part
            ]
        )
        rows = [
            BatchItem(pk=item_id, request_id=r.pk, status=Item.QUEUED)
            for (item_id, _), r in zip(part, requests, strict=True)
        ]
        rows_update(rows, ["request_id", "status"])
        first_ids = [r.pk for r in requests[::chunk]]
        transaction.on_commit(partial(_wake, first_ids), robust=True)


def _wake(request_ids: list[int]) -> None:
    for request_id in request_ids:
        inference_enqueue(request_id, InferenceRequest.Priority.BULK)


def batch_job_cancel(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """Items that have not started stop; running ones finish."""
    require(membership, Action.BATCH_SUBMIT, request=request)
    with transaction.atomic():
        job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
        if job.status == Job.CANCELLED:
            return job
        if job.status == Job.RUNNING and not _unfinished(job):
            raise Conflict("The job has finished: there is nothing left to cancel.", code="finished")
        waiting = BatchItem.objects.filter(job=job, status__in=[Item.PENDING, Item.QUEUED])
        InferenceRequest.objects.filter(
            id__in=waiting.exclude(request=None).values("request_id"), status=InferenceRequest.Status.QUEUED
        ).update(status=InferenceRequest.Status.CANCELLED, finished_at=timezone.now())
        # a queued item whose request a worker claimed meanwhile runs to its end
        waiting.exclude(request__status=InferenceRequest.Status.RUNNING).update(
            status=Item.CANCELLED, finished_at=timezone.now()
        )
        job.status, job.cancelled_at = Job.CANCELLED, timezone.now()
        job.save(update_fields=["status", "cancelled_at"])
        _record(membership, "batch.cancel", job, request)
        _notify([job])
    return job


def _uploads_pending(job: BatchJob):
    """Archives still arriving or being unpacked: until they are done the job cannot start."""
    return job.uploads.exclude(status__in=[Upload.COMPLETE, Upload.REFUSED])


def _unfinished(job: BatchJob) -> bool:
    return (
        BatchItem.objects.filter(job=job, status__in=[Item.PENDING, Item.QUEUED, Item.RUNNING]).exists()
        or _uploads_pending(job).exists()
    )


def batch_job_retry(*, membership: Membership, job_id: int, request=None) -> int:
    """Failed items that have an image get a fresh request; returns how many."""
    require(membership, Action.BATCH_SUBMIT, request=request)
    with transaction.atomic():
        job = batch_job_get(membership=membership, job_id=job_id, request=request, for_update=True)
        if job.status != Job.RUNNING:
            raise Conflict("Only a started, not cancelled job retries its failed items.", code="not_running")
        failed = BatchItem.objects.filter(job=job, status=Item.FAILED, image__isnull=False)
        count = failed.count()
        if count:
            job.resumed_at = timezone.now()
            job.save(update_fields=["resumed_at"])
        _queue(job, failed)
        _record(membership, "batch.retry", job, request)
        _notify([job])
    return count


@dataclass(frozen=True)
class JobProgress:
    counts: dict[str, int]
    total: int
    finished: int
    state: str  # open, running, finished, cancelled
    images_per_s: float | None
    eta_s: float | None
    uploads_pending: int
    refused: tuple[str, ...] = ()  # each refused archive or prefix, and why, in words


def batch_job_progress(job: BatchJob) -> JobProgress:
    counts = dict.fromkeys(Item.values, 0)
    counts.update(dict(BatchItem.objects.filter(job=job).values_list("status").annotate(n=Count("id"))))
    total = sum(counts.values())
    finished = counts[Item.DONE] + counts[Item.FAILED] + counts[Item.CANCELLED]
    uploads_pending = _uploads_pending(job).count()
    state = job.status
    if job.status == Job.RUNNING and finished == total and not uploads_pending:
        state = "finished"
    rate = eta = None
    since = job.resumed_at or job.started_at
    if since:  # the pace of the latest run (a retry starts a new one), not of the job's whole life
        read = BatchItem.objects.filter(
            job=job, status__in=[Item.DONE, Item.FAILED], request__isnull=False, finished_at__gte=since
        )
        last = read.order_by("-finished_at").values_list("finished_at", flat=True).first()
        count = read.count()
        end = timezone.now() if state == Job.RUNNING else (last or timezone.now())
        elapsed = (end - since).total_seconds()
        if count and elapsed > 0:
            rate = round(count / elapsed, 2)
            remaining = counts[Item.QUEUED] + counts[Item.RUNNING]
            eta = round(remaining / rate, 1) if state == Job.RUNNING else 0.0
    refused = tuple(
        f"{'The archive' if kind == 'zip' else 'The storage prefix ' + source} was refused: {error}"
        for kind, source, error in job.uploads.filter(status=Upload.REFUSED)
        .order_by("id")
        .values_list("kind", "source", "error")
    )
    return JobProgress(counts, total, finished, state, rate, eta, uploads_pending, refused)


def batch_items_on_outcome(request_ids_by_status: dict[str, list[int]], now) -> None:
    """Called where the worker stores outcomes: the items follow their requests, and each job
    touched gets one progress notification after commit."""
    touched: set[tuple[int, int]] = set()
    for status, ids in request_ids_by_status.items():
        if not ids:
            continue
        items = BatchItem.objects.filter(request_id__in=ids).exclude(status=Item.CANCELLED)
        touched.update(items.values_list("job_id", "tenant_id"))
        items.update(status=status, finished_at=now)
    if touched:
        send_many_on_commit(
            [(tenant_group(tenant_id), {"type": "job.progress", "job": job_id}) for job_id, tenant_id in touched]
        )


def _notify(jobs: list[BatchJob]) -> None:
    send_many_on_commit([(tenant_group(job.tenant_id), {"type": "job.progress", "job": job.pk}) for job in jobs])


def batch_uploads_reconcile() -> int:
    """Archives that stopped arriving are removed and refused; received ones whose expansion
    message was lost, and expansions whose worker died, are queued again (expansion resumes
    where it stopped), unless their attempts are spent: those are refused in words. Returns how
    many uploads were touched."""
    stalled = _stalled_before()
    abandoned = list(BatchUpload.objects.select_related("job").filter(status=Upload.RECEIVING, touched_at__lt=stalled))
    for upload in abandoned:
        _abandon_receiving(upload, "the upload did not finish (the server stopped while storing it); send it again")
    overdue = Q(status=Upload.RECEIVED, touched_at__lt=timezone.now() - timedelta(seconds=30)) | (
        Q(status=Upload.EXPANDING) & (Q(touched_at__isnull=True) | Q(touched_at__lt=stalled))
    )
    given_up = _uploads_give_up(overdue)
    waiting = list(BatchUpload.objects.filter(overdue).values_list("pk", flat=True))
    for upload_id in waiting:
        _enqueue_expand(upload_id)
    if abandoned or waiting or given_up:
        logger.warning(
            "reconciled uploads: %d abandoned, %d given up, %d queued again", len(abandoned), given_up, len(waiting)
        )
    return len(abandoned) + given_up + len(waiting)


def batch_results(job: BatchJob) -> Iterator[dict]:
    """One row per item, in order, with the finding or the error in words."""
    items = (
        BatchItem.objects.filter(job=job)
        .select_related("request__result", "request__model_version__model")  # the version's name, in one query
        .order_by("id")
    )
    for item in items.iterator(chunk_size=1000):
        request = item.request
        result = getattr(request, "result", None) if request else None
        error = item.error or (request.error if request and item.status == Item.FAILED else "")
        yield {
            "item": item.pk,
            "position": item.position,
            "image": item.image_id,
            "status": item.status,
            "top_label": result.top_label if result else "",
            "probability": result.top_probability if result else None,
            "model_version": str(request.model_version) if request else "",
            "error": error,
        }


def batch_job_list(*, membership: Membership, request=None) -> QuerySet[BatchJob]:
    """The hospital's jobs, newest first; the API pages through them, the jobs page shows the newest."""
    require(membership, Action.IMAGE_VIEW, request=request)
    return (
        BatchJob.objects.for_tenant(membership.tenant)
        .select_related("model_version__model")
        .order_by("-created", "-id")
    )


def batch_results_open(*, membership: Membership, job_id: int, request=None) -> BatchJob:
    """The job whose results are being downloaded; the download is recorded before it streams."""
    job = batch_job_get(membership=membership, job_id=job_id, request=request)
    _record(membership, "batch.results", job, request)
    return job


def results_csv(job: BatchJob) -> Iterator[str]:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = ["item", "position", "image", "status", "top_label", "probability", "model_version", "error"]
    writer.writerow(columns)
    for row in batch_results(job):
        writer.writerow([spreadsheet_safe(row[column]) for column in columns])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()


def results_json(job: BatchJob) -> Iterator[str]:
    import json

    yield f'{{"job": {job.pk}, "results": ['
    for index, row in enumerate(batch_results(job)):
        yield ("," if index else "") + json.dumps(row)
    yield "]}"
