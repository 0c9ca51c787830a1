"""Row ids in paths: `{run_id:int}` matches only the ids a row can have.

SQLite keeps integers in 64 bits, so an id above 2^63-1 cannot name a row; bound by the
converter's pattern, such a path matches no route and is a plain 404 (it used to reach the
database and fail there with OverflowError, a 500, on every route with an id). Registered under
the name "int" before any route is declared (app/web/views/__init__.py imports this module), so
every `{name:int}` path parameter of the app is bounded, including routes added later.

Ids and offsets in a query string (`?run=ID`, `?offset=N`) are declared with the types below:
beyond the same bound they are a 422 that names the parameter, never a 500.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Query
from starlette.convertors import IntegerConvertor, register_url_convertor

#: the largest integer SQLite stores
MAX_ROW_ID = 2**63 - 1


def at_most(limit: int) -> str:
    """A regular expression matching the decimal numbers from 0 to `limit` (leading zeros
    allowed, as Starlette's own int converter allows them)."""
    digits = str(limit)
    shorter = f"[0-9]{{1,{len(digits) - 1}}}" if len(digits) > 1 else None
    same_length = []
    for i, digit in enumerate(digits):
        if digit != "0":
            below = "0" if digit == "1" else f"[0-{int(digit) - 1}]"
            rest = len(digits) - i - 1
            same_length.append(digits[:i] + below + (f"[0-9]{{{rest}}}" if rest else ""))
    same_length.append(digits)
    return "0*(?:" + "|".join(filter(None, [shorter, *same_length])) + ")"


class RowIdConvertor(IntegerConvertor):
    regex = at_most(MAX_ROW_ID)


register_url_convertor("int", RowIdConvertor())


#: A row id in a query string, optional: `run: QueryId = None`.
QueryId = Annotated[int | None, Query(ge=0, le=MAX_ROW_ID)]
#: An offset into a list: `offset: Offset = 0`.
Offset = Annotated[int, Query(ge=0, le=MAX_ROW_ID)]
