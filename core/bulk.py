"""Writing many rows' own values in one statement, cheaply.

Django's ``bulk_update`` builds a ``CASE WHEN pk = … THEN …`` expression per field and row and
resolves each through the ORM: measured on the worker's outcome write, 2.0 ms for one row of 7
fields and 19.3 ms for 16 rows, against 0.2 ms for a plain UPDATE — on two cores that was a
tenth of the platform's whole per-image budget. ``rows_update`` sends one parameterised
``UPDATE … WHERE pk = %s`` through ``executemany`` instead: one statement (PostgreSQL's driver
pipelines the rows), values prepared by each field as the ORM would save them.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import connections, router
from django.db.models import Model


def rows_update(objs: Sequence[Model], fields: Sequence[str]) -> None:
    """Save ``fields`` of each of ``objs`` (instances of one model, with primary keys). No
    signals, no ``auto_now``: as with ``bulk_update``, the caller sets every value."""
    if not objs:
        return
    model = type(objs[0])
    meta = model._meta
    using = router.db_for_write(model)
    connection = connections[using]
    concrete = [meta.get_field(name) for name in fields]
    if any(not field.concrete or field.many_to_many or field.primary_key for field in concrete):
        raise ValueError(f"rows_update writes concrete, non-key columns only, not {list(fields)}")
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in concrete)
    # names from the model's own metadata, quoted; every value is a parameter
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    params = [
        [field.get_db_prep_save(getattr(obj, field.attname), connection) for field in concrete]
        + [meta.pk.get_db_prep_save(obj.pk, connection)]
        for obj in objs
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
