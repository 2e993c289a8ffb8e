"""Plain-SQL row updates for the hot paths (the audit log's session row, the queue worker's
marks and outcomes): the ORM's ``filter(...).update(...)`` compiles its query again on
every call, most of the cost of an UPDATE of a few rows."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from django.db import connections

__all__ = ["update_row", "update_rows"]

_Key = tuple[str, Any, tuple[str, ...], tuple[str, ...], int]
_STATEMENTS: dict[_Key, tuple[str, list[Any]]] = {}
_STATEMENTS_MAX = 256


def update_row(
    alias: str,
    model: Any,
    pk: Any,
    values: Mapping[str, Any],
    *,
    where: Mapping[str, Any] | None = None,
) -> int:
    """:func:`update_rows` of the one row whose primary key is ``pk``."""
    return update_rows(alias, model, (pk,), values, where=where)


def update_rows(
    alias: str,
    model: Any,
    pks: Collection[Any],
    values: Mapping[str, Any],
    *,
    where: Mapping[str, Any] | None = None,
) -> int:
    """``UPDATE`` the rows of ``model`` whose primary key is in ``pks`` (and whose fields
    also equal ``where``, when given) to ``values`` (by field name; plain values, no
    expressions), each value prepared by its field as the ORM's ``update()`` prepares it;
    return the number of rows changed.  The statement is made once per kind of database,
    model, field names and number of keys."""
    if not pks:
        return 0
    connection = connections[alias]
    where = where or {}
    key = (connection.vendor, model, tuple(values), tuple(where), len(pks))
    made = _STATEMENTS.get(key)
    if made is None:
        quote = connection.ops.quote_name
        meta = model._meta
        fields = [meta.get_field(name) for name in (*values, *where)]
        assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields[: len(values)])
        conditions = "".join(f" AND {quote(f.column)} = %s" for f in fields[len(values) :])
        keys = ", ".join(["%s"] * len(pks))
        sql = (
            f"UPDATE {quote(meta.db_table)} SET {assignments} "  # noqa: S608 - names from the model, values bound
            f"WHERE {quote(meta.pk.column)} IN ({keys}){conditions}"
        )
        if len(_STATEMENTS) >= _STATEMENTS_MAX:
            _STATEMENTS.clear()
        made = _STATEMENTS[key] = (sql, fields)
    sql, fields = made
    given = (*values.values(), *where.values())
    params = [f.get_db_prep_save(v, connection) for f, v in zip(fields, given, strict=True)]
    params[len(values) : len(values)] = list(pks)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)
