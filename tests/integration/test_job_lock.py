"""Locking a job locks the job's row only (accounts/access.py, ``select_for_update(of=("self",))``):
never the model version (and model) rows ``batch_job_get`` joins, which every hospital's uploads
share. Before, a job's start held the model version row and deadlocked against an upload
committing its request (the multi-host drill).

PostgreSQL shows it with two real transactions: while one holds the job's lock, another locks
the model version row ``FOR UPDATE NOWAIT`` at once, and cannot lock the job's row. SQLite has no
row locks (``select_for_update`` is a no-op there): it shows the SQL names no lock at all."""

import threading

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext

from recognition.job_selectors import batch_job_get
from recognition.models import AIModel, BatchJob, ModelVersion
from recognition.services.jobs.lifecycle import batch_job_create

MODEL_VERSION_TABLE = ModelVersion._meta.db_table
JOB_TABLE = BatchJob._meta.db_table


def _locking_sql(captured) -> str:
    (sql,) = [q["sql"] for q in captured.captured_queries if JOB_TABLE in q["sql"] and "SELECT" in q["sql"]]
    return sql


@pytest.mark.django_db
def test_the_job_lock_names_the_jobs_table_only(clinician_a, demo_model):
    job, _ = batch_job_create(membership=clinician_a, name="chest films")
    with transaction.atomic(), CaptureQueriesContext(connection) as captured:
        locked = batch_job_get(membership=clinician_a, job_id=job.pk, for_update=True)
    assert locked.model_version.pk == demo_model.pk  # the version is still joined, just not locked
    sql = _locking_sql(captured)
    assert MODEL_VERSION_TABLE in sql  # the join
    if connection.vendor == "postgresql":
        assert sql.endswith(f'FOR UPDATE OF "{JOB_TABLE}"')
    else:
        assert "FOR UPDATE" not in sql  # SQLite: no row locks; IMMEDIATE transactions serialize writers
    lock_clause = sql.partition("FOR UPDATE")[2]  # "" where nothing is locked
    assert MODEL_VERSION_TABLE not in lock_clause and AIModel._meta.db_table not in lock_clause


def _in_another_transaction(statement: str, pk: int) -> str:
    """Runs ``statement`` (a NOWAIT lock of row ``pk``) on a connection of its own, in its own
    transaction; 'locked' or the error it met."""
    outcome = []

    def run():
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(statement, [pk])
                outcome.append("locked" if cursor.fetchall() else "no row")
        except DatabaseError as error:
            outcome.append(type(error).__name__ + ": " + str(error).splitlines()[0])
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert outcome, "the other transaction did not finish"
    return outcome[0]


@pytest.mark.heavy_drill  # CI's PostgreSQL pass: two real transactions, row locks
@pytest.mark.django_db(transaction=True)
def test_while_a_job_is_locked_another_transaction_can_lock_its_model_version(clinician_a, demo_model):
    job, _ = batch_job_create(membership=clinician_a, name="chest films")
    lock_version = f'SELECT id FROM "{MODEL_VERSION_TABLE}" WHERE id = %s FOR UPDATE NOWAIT'
    lock_job = f'SELECT id FROM "{JOB_TABLE}" WHERE id = %s FOR UPDATE NOWAIT'
    with transaction.atomic(), CaptureQueriesContext(connection) as captured:
        batch_job_get(membership=clinician_a, job_id=job.pk, for_update=True)
        if connection.vendor != "postgresql":
            assert "FOR UPDATE" not in _locking_sql(captured)  # SQLite: nothing is row-locked
            return
        assert _in_another_transaction(lock_version, demo_model.pk) == "locked"
        # the job's own row is held: the lock is real, the version is left out of it
        assert _in_another_transaction(lock_job, job.pk).startswith("OperationalError: could not obtain lock")

    # what it did before the fix, for contrast: a plain FOR UPDATE over the join holds the version too
    with transaction.atomic():
        BatchJob.objects.select_related("model_version__model").select_for_update().filter(pk=job.pk).first()
        assert _in_another_transaction(lock_version, demo_model.pk).startswith("OperationalError: could not obtain")
    assert _in_another_transaction(lock_version, demo_model.pk) == "locked"  # committed: free again
