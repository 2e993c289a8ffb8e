"""Plain-SQL row writes for the hot paths (the audit log's rows, the queue worker's marks
and outcomes): the ORM compiles its query again on every call, most of the cost of an
INSERT or an UPDATE of a few rows.  Each statement is made once and kept."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from django.db import connections

__all__ = ["insert_many", "update_row", "update_rows"]

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


def insert_many(
    alias: str, model: Any, names: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> int | None:
    """INSERT plain rows (values ready for the database, in the order of the field
    ``names``) with one ``executemany``: the ORM's per-object and per-value preparation
    would be most of the audit log's cost.
    Returns the new row's id when one row went to a database that tells it (SQLite,
    MySQL), else None."""
    if not rows:
        return None
    connection = connections[alias]
    sql = _insert_sql(connection, model, names)
    with connection.cursor() as cursor:
        if len(rows) == 1 and connection.vendor in ("sqlite", "mysql"):
            cursor.execute(sql, rows[0])
            return int(cursor.lastrowid)
        cursor.executemany(sql, rows)
    return None


_INSERTS: dict[tuple[str, Any, tuple[str, ...]], str] = {}


def _insert_sql(connection: Any, model: Any, names: tuple[str, ...]) -> str:
    """The INSERT statement of :func:`insert_many`, made once per kind of database."""
    key = (connection.vendor, model, names)
    sql = _INSERTS.get(key)
    if sql is None:
        quote = connection.ops.quote_name
        columns = ", ".join(quote(model._meta.get_field(name).column) for name in names)
        placeholders = ", ".join(["%s"] * len(names))
        table = quote(model._meta.db_table)
        sql = _INSERTS[key] = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"  # noqa: S608 - names from the model, values bound
    return sql
