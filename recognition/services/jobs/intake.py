"""What a job's items come from, on the web side: files sent with the request, a zip archive
(stored as it came, then expanded by a worker task: ``expansion.py``) or a storage prefix the
hospital owns. The archive's row is written before a byte is stored, so a crash half-way leaves
an upload that is visibly not complete."""

from __future__ import annotations

import logging

from django.core.files.base import File
from django.core.files.storage import default_storage
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from accounts.access import member_action_record
from accounts.models import AccessEvent, Membership
from core.errors import Conflict, DomainError

from ...enqueue import task_send
from ...models import ERROR_LENGTH, BatchItem, BatchJob, BatchUpload
from ...storage import ForeignStorageKey, archive_key, storage_key_for_tenant
from ..images import images_upload
from ..screening import Screen, screen_plan
from .bookkeeping import batch_jobs_notify
from .lifecycle import batch_job_open_for_items, batch_job_record

logger = logging.getLogger(__name__)
Item, Upload = BatchItem.Status, BatchUpload.Status


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


def _next_position(job: BatchJob) -> int:
    last = BatchItem.objects.filter(job=job, upload=None).order_by("-position").values_list("position", flat=True)
    return (last.first() or 0) + 1


def batch_items_add_files(
    *, membership: Membership, job_id: int, files: list, request=None, screen: Screen | None = None
) -> list[BatchItem]:
    """Files sent with the request: each becomes an item (a DICOM file, one per frame); a file
    that is not a usable image, or that its reader fails on, becomes a failed item that says why.
    The others go on.

    Each file is added in its own transaction that holds the job's row lock and sees the job still
    open, so a start that comes meanwhile waits for that file and queues it; the files after it are
    refused (409, saying how many were added), never left pending in a running job.

    ``screen``: the browser's screen of the one file sent (services/screening.py); its read goes
    first within the hospital's bulk turns when the screen calls it suspicious."""
    items: list[BatchItem] = []
    with transaction.atomic():
        job = batch_job_open_for_items(membership, job_id, request)  # 404 and 409 before anything is read
    screen_plan(tenant=membership.tenant, screen=screen)  # 422 before anything is stored, not a failed item
    for index, upload in enumerate(files):
        with transaction.atomic():
            try:
                job = batch_job_open_for_items(membership, job_id, request)
            except Conflict:
                if not index:
                    raise
                raise Conflict(
                    f"The job started while these files were being added: the first {index} of {len(files)} "
                    "were added and are being read; the others were not added.",
                    code="job_started",
                    detail={"added": index},
                ) from None
            items.extend(batch_file_items(membership, job, None, _next_position(job), upload, request, screen))
    batch_jobs_notify([job])
    return items


def batch_file_items(membership, job, upload, position, file, request=None, screen=None) -> list[BatchItem]:
    """The items one file becomes: its images (a DICOM file's frames follow the first, each with
    a place of its own), or one failed item that says why. Any error that is not the platform's
    (see TRANSIENT) is this file's alone: the reader failing on it fails it, not the upload."""
    try:
        with transaction.atomic():
            images = images_upload(membership=membership, upload=file, request=request, read=False, screen=screen)
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
        tenant=job.tenant, job=job, upload=upload, position=position, status=Item.FAILED, error=error[:ERROR_LENGTH]
    )
    return [failed]


def batch_upload_zip(*, membership: Membership, job_id: int, archive, request=None) -> BatchUpload:
    """Store the archive as it came (Django has spooled it to a temporary file, not memory) and
    queue its expansion; nothing of it counts until the expansion is complete.

    The upload row, with the key the archive will have, is written before a byte is stored: if
    the process dies while storing, reconciliation finds the row still "receiving", deletes
    whatever reached storage and refuses the upload in words. No orphan file, no silent loss."""
    with transaction.atomic():
        job = batch_job_open_for_items(membership, job_id, request)
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
            batch_job_record(membership, "batch.add_archive", job, request)
            transaction.on_commit(lambda: batch_upload_expand_enqueue(upload.pk), robust=True)
    except BaseException:
        batch_upload_abandon(upload, "the archive could not be stored; send it again")
        raise
    upload.refresh_from_db()
    return upload


def batch_upload_abandon(upload: BatchUpload, reason: str) -> None:
    """An archive that never finished arriving: what reached storage goes, the upload is refused."""
    default_storage.delete(upload.source)
    BatchUpload.objects.filter(pk=upload.pk, status=Upload.RECEIVING).update(
        status=Upload.REFUSED, error=reason, finished_at=timezone.now()
    )
    batch_jobs_notify([upload.job])


def batch_upload_prefix(*, membership: Membership, job_id: int, prefix: str, request=None) -> BatchUpload:
    """Import every file under a storage prefix the hospital owns (tenants/<id>/imports/…).

    The prefix must already be a plain key in that area (`storage_key_for_tenant`): nothing is
    normalised into something acceptable. Anything else is a 400 that lists and reads nothing,
    and the attempt is in the access log."""
    refused = None
    with transaction.atomic():
        job = batch_job_open_for_items(membership, job_id, request)
        folder = prefix if prefix.endswith("/") else prefix + "/"  # the one liberty: "…/night" means the folder
        try:
            folder = storage_key_for_tenant(tenant_id=job.tenant_id, key=folder, under="imports")
            if len(folder) > BatchUpload.SOURCE_MAX_LENGTH:
                raise ForeignStorageKey(f"The prefix is longer than {BatchUpload.SOURCE_MAX_LENGTH} characters.")
        except ForeignStorageKey as exc:
            refused = exc
        else:
            upload = BatchUpload.objects.create(tenant=job.tenant, job=job, kind="prefix", source=folder)
            batch_job_record(membership, "batch.add_prefix", job, request)
            transaction.on_commit(lambda: batch_upload_expand_enqueue(upload.pk), robust=True)
    if refused is not None:
        with transaction.atomic():
            member_action_record(
                membership,
                "batch.add_prefix",
                outcome=AccessEvent.Outcome.DENIED,
                request=request,
                target_type="batch_job",
                target_id=job_id,
            )
        raise refused
    return upload


def batch_upload_expand_enqueue(upload_id: int) -> None:
    # the broker down: the upload stays received and reconciliation enqueues it again
    task_send("workers.tasks.batch_expand", args=[upload_id], queue="maintenance")
