"""Upgrade rules (README, "Upgrades"): a new release's migrations run while the old release still
serves, and the old release's workers still drain the queues, so

1. every Celery task name is stable: the names below are the contract between releases. A task
   renamed or removed fails here; keep the old name registered (an alias calling the new task)
   for one release, and list it under RETIRED_TASKS with the release that may drop it;
2. a migration never removes or renames a column or a table in the release that stops using it
   ("expand", then "contract" a release later): RemoveField, DeleteModel, RenameField,
   RenameModel, AlterModelTable and raw SQL that drops or renames are allowed only in a migration
   listed in CONTRACT_MIGRATIONS, with the reason and the release whose code no longer reads it;
3. a column added after the first release that old code does not know must not refuse old code's
   inserts: null=True or a db_default, never a NOT NULL column with only a Python default.

Migrations of the first release (RELEASED_MIGRATIONS) predate every deployment: nothing older can
be serving beside them.
"""

from __future__ import annotations

import re

from django.db import migrations, models
from django.db.migrations import operations
from django.db.migrations.loader import MigrationLoader

# -- 1. task names ---------------------------------------------------------------------------------
TASK_NAMES = {
    "dicomnet.tasks.deliveries_reconcile",
    "dicomnet.tasks.delivery_send",
    "dicomnet.tasks.map_follow",
    "dicomnet.tasks.result_export",
    "dicomnet.tasks.review_export",
    "protocols.tasks.tensor_read",
    "workers.tasks.audit_verify",
    "workers.tasks.batch_expand",
    "workers.tasks.batch_reconcile",
    "workers.tasks.heatmap_compute",
    "workers.tasks.image_render",
    "workers.tasks.image_render_reconcile",
    "workers.tasks.infer",
    "workers.tasks.model_validate",
    "workers.tasks.model_validate_reconcile",
    "workers.tasks.screened_negatives_promote",
}
# a name no longer registered: {name: "the release that dropped it, one release after its rename"}
RETIRED_TASKS: dict[str, str] = {}

# -- 2. and 3. migrations --------------------------------------------------------------------------
PROJECT_APPS = {"accounts", "recognition", "workers", "audit", "protocols", "dicomnet"}
RELEASED_MIGRATIONS = {  # release 1 (issue 16's deployment): the baseline no running code predates
    ("accounts", "0001_initial"),
    ("accounts", "0002_invitations_and_two_factor"),
    ("accounts", "0003_audit_hash_chain"),
    ("accounts", "0004_auth_second_factor_and_account_limit"),
    ("accounts", "0004_workers_platform_auditors_group"),
    ("accounts", "0005_svcacct_service_accounts"),
    ("accounts", "0006_merge_workers"),
    ("accounts", "0007_protocols_optimised_rollout"),
    ("dicomnet", "0001_initial"),
    ("recognition", "0001_initial"),
    ("recognition", "0002_registry_splits_pins_priority"),
    ("recognition", "0003_model_package_checksum"),
    ("recognition", "0004_request_timings"),
    ("recognition", "0005_workspace_dicom_reviews"),
    ("recognition", "0006_batch_jobs"),
    ("recognition", "0007_batch_job_resumed_at"),
    ("recognition", "0008_batch_upload_receiving"),
    ("recognition", "0009_decode_image_state_upload_keys"),
    ("recognition", "0009_intake_upload_attempts"),
    ("recognition", "0009_workers_model_status_transient_retries"),
    ("recognition", "0010_merge_decode_intake"),
    ("recognition", "0011_merge_workers"),
    ("recognition", "0012_result_heatmap_on_request"),
    ("recognition", "0013_protocols_optimised_rollout"),
}
# {(app, migration): "why, and the release whose code stopped reading what it drops"}
CONTRACT_MIGRATIONS: dict[tuple[str, str], str] = {}

DESTRUCTIVE = (
    operations.RemoveField,
    operations.DeleteModel,
    operations.RenameField,
    operations.RenameModel,
    operations.AlterModelTable,
)
DESTRUCTIVE_SQL = re.compile(r"\b(DROP\s+(TABLE|COLUMN)|RENAME\s+(TO|COLUMN))\b", re.IGNORECASE)


def registered_task_names() -> set[str]:
    import dicomnet.tasks  # noqa: F401  the app's include list, imported as a worker does
    import protocols.tasks  # noqa: F401
    import workers.tasks  # noqa: F401
    from workers.celery import app

    # celery's own, and the probes the suite registers for itself (tests/lane_probe.py), are no contract
    return {name for name in app.tasks if not name.startswith(("celery.", "tests."))}


def test_every_registered_task_name_is_in_the_committed_list():
    new = registered_task_names() - TASK_NAMES
    assert not new, f"new task names {sorted(new)}: add them to TASK_NAMES (a contract from now on)"


def test_no_task_name_of_the_list_went_away_without_retiring():
    gone = TASK_NAMES - registered_task_names() - set(RETIRED_TASKS)
    assert not gone, (
        f"{sorted(gone)} no longer registered: a worker of the next release would drop messages the old "
        "release queued under that name. Keep the old name as an alias for one release."
    )


def test_the_beat_schedule_names_only_registered_tasks(settings):
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert scheduled <= registered_task_names()


def _project_migrations():
    loader = MigrationLoader(None, ignore_no_migrations=True, load=True)
    return sorted((key, migration) for key, migration in loader.disk_migrations.items() if key[0] in PROJECT_APPS)


def _flattened(operation_list):
    for operation in operation_list:
        if isinstance(operation, operations.SeparateDatabaseAndState):
            yield from operation.database_operations  # what the database sees
        else:
            yield operation


def _destructive(operation) -> str:
    if isinstance(operation, DESTRUCTIVE):
        return type(operation).__name__
    if isinstance(operation, operations.RunSQL):
        sql = operation.sql if isinstance(operation.sql, str) else " ".join(map(str, operation.sql))
        if DESTRUCTIVE_SQL.search(sql):
            return "RunSQL that drops or renames"
    return ""


def _refuses_old_inserts(operation) -> bool:
    if not isinstance(operation, operations.AddField):
        return False
    field = operation.field
    if field.null or field.many_to_many or field.primary_key:
        return False
    return field.db_default is models.NOT_PROVIDED


def test_no_migration_drops_or_renames_unless_it_is_a_listed_contract():
    offending = []
    for key, migration in _project_migrations():
        if key in RELEASED_MIGRATIONS or key in CONTRACT_MIGRATIONS:
            continue
        for operation in _flattened(migration.operations):
            if what := _destructive(operation):
                offending.append(f"{key[0]}.{key[1]}: {what} ({operation.describe()})")
    assert not offending, "a release drops or renames what the release before it still reads: " + "; ".join(offending)


def _created_in(migration) -> set[str]:
    """Tables this migration creates: no old release inserts into them, whatever their columns."""
    return {op.name_lower for op in _flattened(migration.operations) if isinstance(op, operations.CreateModel)}


def test_a_column_added_after_the_first_release_does_not_refuse_the_old_releases_inserts():
    offending = [
        f"{key[0]}.{key[1]}: {operation.describe()}"
        for key, migration in _project_migrations()
        if key not in RELEASED_MIGRATIONS
        for operation in _flattened(migration.operations)
        if _refuses_old_inserts(operation)
        and getattr(operation, "model_name_lower", None) not in _created_in(migration)
    ]
    assert not offending, "NOT NULL without a db_default (old code's INSERTs fail): " + "; ".join(offending)


def test_the_checks_see_what_they_should():
    """The rules catch what they are for (a renamed column, a raw DROP, a NOT NULL column)."""
    assert _destructive(operations.RenameField("image", "key", "object_key")) == "RenameField"
    assert _destructive(operations.RunSQL("ALTER TABLE x DROP COLUMN y")) == "RunSQL that drops or renames"
    assert not _destructive(operations.RunSQL("CREATE INDEX CONCURRENTLY i ON x (y)"))
    assert _refuses_old_inserts(operations.AddField("image", "flag", models.BooleanField(default=False)))
    assert not _refuses_old_inserts(
        operations.AddField("image", "flag", models.BooleanField(default=False, db_default=False))
    )
    assert not _refuses_old_inserts(operations.AddField("image", "note", models.TextField(null=True)))
    created = migrations.Migration("0099_new", "recognition")
    created.operations = [operations.CreateModel("Note", [("id", models.AutoField(primary_key=True))])]
    assert _created_in(created) == {"note"}
    assert set(RELEASED_MIGRATIONS) <= {key for key, _ in _project_migrations()}, "a released migration vanished"
