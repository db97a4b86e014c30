"""The QIDO-RS pipeline: Query -> SQL -> rows -> DICOM JSON results."""

from __future__ import annotations

from typing import Any

from dicomweb_server.index.database import Index
from dicomweb_server.query import Query
from dicomweb_server.sql import compile_search, render_rows

__all__ = ["search"]


async def search(index: Index, q: Query, base_url: str) -> tuple[list[dict[str, Any]], bool]:
    """Results of one page, and whether more results exist beyond it."""
    sql_text, args = compile_search(q)
    rows = await index.search(sql_text, args)
    more = len(rows) > q.limit
    return render_rows(q, rows[: q.limit], base_url), more
