"""Thin tasks for sending findings back to the hospital's PACS: ids in, dicomnet/sending.py does
the work. Routed to the housekeeping lane (config/settings/base.py, "DICOM networking")."""

from celery import shared_task
from django.conf import settings

from workers.tasks import RETRY_TRANSIENT


@shared_task(name="dicomnet.tasks.delivery_send", acks_late=True, **RETRY_TRANSIENT)
def delivery_send(delivery_id: int) -> str:
    """One delivery, if due: sent, or retrying with its reason, or failed at the cap."""
    from dicomnet.sending import delivery_send as send

    return send(delivery_id=delivery_id)


@shared_task(name="dicomnet.tasks.result_export", acks_late=True, **RETRY_TRANSIENT)
def result_export(result_id: int) -> int:
    """An AI result of a DICOM image: its SR to the destinations that send on every result."""
    from dicomnet.sending import result_export as export

    return len(export(result_id=result_id))


@shared_task(name="dicomnet.tasks.review_export", acks_late=True, **RETRY_TRANSIENT)
def review_export(review_id: int) -> int:
    """A signed-off review: its SR (and the AI SR where not yet sent) to every destination."""
    from dicomnet.sending import review_export as export

    return len(export(review_id=review_id))


@shared_task(name="dicomnet.tasks.map_follow", acks_late=True, bind=True)
def map_follow(self, result_id: int) -> int:
    """The heatmap as a DICOM object, once the worker has computed it: asks again every
    SIGHTLINE_DICOM_MAP_WAIT_SECONDS, at most SIGHTLINE_DICOM_MAP_WAIT_TRIES times (then the
    reconcile sweep follows it)."""
    from core.transient import is_transient
    from dicomnet.sending import MapPending
    from dicomnet.sending import map_follow as follow

    try:
        return len(follow(result_id=result_id))
    except MapPending as exc:
        wait, tries = settings.SIGHTLINE_DICOM_MAP_WAIT_SECONDS, settings.SIGHTLINE_DICOM_MAP_WAIT_TRIES
        raise self.retry(exc=exc, countdown=wait, max_retries=tries) from None
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise self.retry(exc=exc, countdown=settings.SIGHTLINE_DICOM_MAP_WAIT_SECONDS, max_retries=8) from None


@shared_task(name="dicomnet.tasks.deliveries_reconcile", acks_late=True)
def deliveries_reconcile() -> int:
    """Periodic (Celery beat): due deliveries whose message was lost, stalled sends, awaited maps."""
    from dicomnet.sending import deliveries_reconcile as reconcile

    return reconcile()
