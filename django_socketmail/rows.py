"""Plain-SQL row updates for the hot paths (the audit log's session row, the queue worker's
outcome of each message): the ORM's ``filter(...).update(...)`` compiles its query again
on every call, most of the cost of a one-row UPDATE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import connections

__all__ = ["update_row"]

_STATEMENTS: dict[tuple[str, Any, tuple[str, ...], tuple[str, ...]], tuple[str, list[Any]]] = {}


def update_row(
    alias: str,
    model: Any,
    pk: Any,
    values: Mapping[str, Any],
    *,
    where: Mapping[str, Any] | None = None,
) -> int:
    """``UPDATE`` the row of ``model`` whose primary key is ``pk`` (and whose fields also
    equal ``where``, when given) to ``values`` (by field name; plain values, no
    expressions), each value prepared by its field as the ORM's ``update()`` prepares it;
    return the number of rows changed (0 or 1).  The statement is made once per kind of
    database, model and set of field names."""
    connection = connections[alias]
    where = where or {}
    key = (connection.vendor, model, tuple(values), tuple(where))
    made = _STATEMENTS.get(key)
    if made is None:
        quote = connection.ops.quote_name
        meta = model._meta
        fields = [meta.get_field(name) for name in (*values, *where)]
        assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields[: len(values)])
        conditions = "".join(f" AND {quote(f.column)} = %s" for f in fields[len(values) :])
        sql = (
            f"UPDATE {quote(meta.db_table)} SET {assignments} "  # noqa: S608 - names from the model, values bound
            f"WHERE {quote(meta.pk.column)} = %s{conditions}"
        )
        made = _STATEMENTS[key] = (sql, fields)
    sql, fields = made
    given = (*values.values(), *where.values())
    params = [f.get_db_prep_save(v, connection) for f, v in zip(fields, given, strict=True)]
    params.insert(len(values), pk)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)
