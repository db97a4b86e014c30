"""Shared by the QIDO parsing tests (tests/test_query_sql*.py): a query of the level given and
the parameters named, as a search without UIDs in its path."""

from __future__ import annotations

from dicomweb_server.attributes import Level
from dicomweb_server.query import Query, parse


def q(level: Level = Level.STUDY, **params: str) -> Query:
    return parse(level, list(params.items()), {})
