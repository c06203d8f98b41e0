"""Statements that read the same on both engines."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


def insert_or_ignore(conn: AsyncConnection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT DO NOTHING on either engine."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


class unit_tokens(FunctionElement[int]):  # noqa: N801 (an SQL function, named as one)
    """The counts of one direction (0 input, 1 output) of an event's units, summed: events.units
    holds {unit type: [input, output]}, read by each engine's JSON functions."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "unit_tokens"

    def __init__(self, units: sa.ColumnElement[Any], direction: int) -> None:
        super().__init__(units, sa.literal_column(str(int(direction))))


@compiles(unit_tokens, "sqlite")
def _unit_tokens_sqlite(element: unit_tokens, compiler: SQLCompiler, **kw: Any) -> str:
    units, direction = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(SELECT coalesce(sum(json_extract(value, '$[{direction}]')), 0) FROM json_each({units}))"


@compiles(unit_tokens, "postgresql")
def _unit_tokens_postgresql(element: unit_tokens, compiler: SQLCompiler, **kw: Any) -> str:
    units, direction = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(SELECT coalesce(sum((value->>{direction})::bigint), 0) FROM json_each({units}))"
