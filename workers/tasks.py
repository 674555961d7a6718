"""Thin tasks: ids in, a service does the work."""

from celery import shared_task

from workers.transient import TransientRetryTask

# a database, storage or broker that is briefly unreachable (a restart, a failover, throttling)
# must not strand the work this task was for: it tries again, backing off; the errors that count
# as transient are named once, in core/transient.py
RETRY_TRANSIENT = {"base": TransientRetryTask, "retry_backoff_max": 30, "max_retries": 8}


@shared_task(name="workers.tasks.infer", acks_late=True, **RETRY_TRANSIENT)
def infer(request_id: int) -> int:
    from workers.runner import inference_run

    return inference_run(request_id=request_id)


@shared_task(name="workers.tasks.audit_verify", acks_late=True)
def audit_verify() -> bool:
    """Periodic (Celery beat): verify every chain of the access log; a failure is an alert."""
    from accounts.audit import audit_verify_and_alert

    return audit_verify_and_alert()


@shared_task(name="workers.tasks.batch_expand", acks_late=True, **RETRY_TRANSIENT)
def batch_expand(upload_id: int) -> None:
    from recognition.services.jobs import batch_upload_expand

    batch_upload_expand(upload_id=upload_id)


@shared_task(name="workers.tasks.batch_reconcile", acks_late=True)
def batch_reconcile() -> int:
    """Periodic (Celery beat): requests stuck running past their time limit are requeued, queued
    ones whose wake-up was lost are woken, and stalled archive uploads are resumed or refused."""
    from recognition.services.jobs import batch_uploads_reconcile
    from workers.queue_policy import requests_reconcile_stuck

    return requests_reconcile_stuck() + batch_uploads_reconcile()


# a storage blip reading the original retries (core/transient.py names it); the attempt cap
# in the service ends an image that keeps failing (or keeps killing its worker)
@shared_task(name="workers.tasks.image_render", acks_late=True, **RETRY_TRANSIENT)
def image_render(image_ids: list[int]) -> int:
    """Render received images (one original's frames) for display and the model; queue their reads."""
    from recognition.services.images import images_render

    return images_render(image_ids=image_ids)


@shared_task(name="workers.tasks.image_render_reconcile", acks_late=True)
def image_render_reconcile() -> int:
    """Periodic (Celery beat): received images whose render wake-up was lost are woken again."""
    from recognition.services.images import images_render_reconcile

    return images_render_reconcile()


@shared_task(name="workers.tasks.heatmap_compute", acks_late=True, **RETRY_TRANSIENT)
def heatmap_compute(result_id: int) -> str:
    """One result's Grad-CAM heatmap, asked for by a viewer or an export (never by a read)."""
    from workers.heatmaps import heatmap_compute as compute

    return compute(result_id=result_id)


@shared_task(name="workers.tasks.model_validate", acks_late=True, bind=True, **RETRY_TRANSIENT)
def model_validate(self, version_id: int) -> str:
    """Registration's checks, off the web process; the version ends ready or refused."""
    from core.transient import is_transient, transient_reason
    from workers.registration import model_version_give_up, model_version_validate

    try:
        return model_version_validate(version_id=version_id).status
    except Exception as exc:
        if is_transient(exc) and self.request.retries >= self.max_retries:
            model_version_give_up(version_id=version_id, reason=f"{transient_reason(exc)}, on every attempt")
        raise


@shared_task(name="workers.tasks.model_validate_reconcile", acks_late=True)
def model_validate_reconcile() -> int:
    """Periodic (Celery beat): model versions whose validation message was lost are sent again."""
    from workers.registration import model_version_reconcile

    return model_version_reconcile()


@shared_task(name="workers.tasks.screened_negatives_promote", acks_late=True)
def screened_negatives_promote() -> int:
    """Periodic (Celery beat): screened negatives whose wait in the bulk lane is over move to the
    interactive lane, and a worker is woken for them."""
    from workers.queue_policy import screened_negatives_promote as promote

    return promote()
