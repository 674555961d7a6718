"""Thin tasks: ids in, a service does the work."""

from celery import shared_task


@shared_task(name="workers.tasks.infer", acks_late=True)
def infer(request_id: int) -> int:
    from recognition.services.inference import inference_run

    return inference_run(request_id=request_id)
