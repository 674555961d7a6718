# Load the Celery app with Django, so tasks queued from web requests use its broker settings.
from workers.celery import app as celery_app

__all__ = ["celery_app"]
