"""The QIDO-RS pipeline: Query -> SQL -> rows -> DICOM JSON results."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from dicomweb_server.index.database import Index
from dicomweb_server.query import Query
from dicomweb_server.sql import (
    compile_search,
    compile_search_keys,
    compile_search_rows,
    iter_rendered,
    render_rows,
)

__all__ = ["QIDO_FETCH_ROWS", "Matches", "search", "search_matches"]

# Rows of a QIDO-RS page read from the database at a time, and so held in memory at a time
# (a row with `includefield=all` at the instance level is its whole metadata: 2.7 KB for a
# small CT). A page of at most this many (the default limit, 100; OHIF's study list, 101)
# is one statement, as it always was; a longer one (up to QIDO_MAX_LIMIT, 1000) is fetched
# and sent this many rows at a time: 1000 instances with `includefield=all` took 29 MB
# while their response was built whole.
QIDO_FETCH_ROWS = 200


@dataclass(frozen=True)
class Matches:
    """One page of results: `first`, its first QIDO_FETCH_ROWS at most (rendered as they
    are iterated), then `rest`, None when the page was read whole, else the following
    batches, each read when it is asked for; `more`: results exist beyond the page."""

    first: Iterator[dict[str, Any]]
    rest: AsyncIterator[Iterator[dict[str, Any]]] | None
    more: bool


async def search(index: Index, q: Query, base_url: str) -> tuple[list[dict[str, Any]], bool]:
    """Results of one page, and whether more results exist beyond it."""
    sql_text, args = compile_search(q)
    rows = await index.search(sql_text, args)
    more = len(rows) > q.limit
    return render_rows(q, rows[: q.limit], base_url), more


async def search_matches(index: Index, q: Query, base_url: str) -> Matches:
    """A page of results read QIDO_FETCH_ROWS rows at a time (not of the patient level).

    Its first statement reads the first QIDO_FETCH_ROWS + 1 rows at most. When the page
    goes beyond them, the primary keys of the rest of the page (one more than it holds: is
    there more?) are read next, in the order of the rows (their keys), after the last row
    read: whether more results exist is known before the response starts (its Warning), and
    the rows follow in batches, each its own statement. No connection is held between
    batches, nor while a client reads what was sent of them."""
    first_limit = min(q.limit, QIDO_FETCH_ROWS)
    sql_text, args = compile_search(replace(q, limit=first_limit))
    rows = await index.search(sql_text, args)
    if len(rows) <= first_limit or q.limit <= QIDO_FETCH_ROWS:
        return Matches(iter_rendered(q, rows[:first_limit], base_url), None, len(rows) > q.limit)
    rows = rows[:first_limit]
    left = q.limit - first_limit
    sql_text, args = compile_search_keys(q, rows[-1]["pk"], left + 1)
    keys = await index.search_keys(sql_text, args)
    rest = _batches(index, q, base_url, keys[:left])
    return Matches(iter_rendered(q, rows, base_url), rest, len(keys) > left)


async def _batches(
    index: Index, q: Query, base_url: str, keys: list[int]
) -> AsyncIterator[Iterator[dict[str, Any]]]:
    for at in range(0, len(keys), QIDO_FETCH_ROWS):
        sql_text, args = compile_search_rows(q, keys[at : at + QIDO_FETCH_ROWS])
        yield iter_rendered(q, await index.search(sql_text, args), base_url)
