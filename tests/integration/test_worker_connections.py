"""A worker keeps its database connection from one task to the next (Celery's Django fixup
closed it around every task unless told otherwise), under Django's own rules: one that errored
and is no longer usable is closed before the next task, as Django does between requests."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from celery.fixups.django import DjangoWorkerFixup
from celery.signals import task_postrun, task_prerun
from django.db import connection

from workers.celery import app

pytestmark = pytest.mark.django_db(transaction=True)  # a worker runs its tasks in autocommit


class Task:  # what the handlers read of a task: its name and whether it runs eagerly
    name = "workers.tasks.infer"
    request = SimpleNamespace(is_eager=False)


def run_a_task(fixup: DjangoWorkerFixup) -> None:
    """What the worker does around a task: the fixup's handlers and the platform's."""
    task = Task()
    fixup.on_task_prerun(sender=task)
    task_prerun.send(sender=task, task_id="t-1", task=task)
    task_postrun.send(sender=task, task_id="t-1", task=task, state="SUCCESS")
    fixup.on_task_postrun(sender=task)


def test_the_connection_is_kept_between_tasks(monkeypatch):
    closed: list[str] = []
    monkeypatch.setattr(connection, "close", lambda: closed.append(connection.alias))
    connection.ensure_connection()
    monkeypatch.setattr(connection, "close_at", time.monotonic() + 60)  # CONN_MAX_AGE 60, as deployed
    fixup = DjangoWorkerFixup(app)
    for _ in range(3):
        run_a_task(fixup)
    assert closed == []


def test_one_that_errored_and_is_unusable_is_closed_before_the_next_task(monkeypatch):
    closed: list[str] = []
    monkeypatch.setattr(connection, "close", lambda: closed.append(connection.alias))
    connection.ensure_connection()
    monkeypatch.setattr(connection, "is_usable", lambda: False)  # e.g. the server restarted
    monkeypatch.setattr(connection, "errors_occurred", True)
    run_a_task(DjangoWorkerFixup(app))
    assert closed
