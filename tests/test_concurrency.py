"""Concurrent STOW against one app and one PostgreSQL: one copy per instance, exact aggregates."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from pydicom.uid import generate_uid
from starlette.applications import Starlette

from tests.helpers import (
    ROOT,
    make_instance,
    multipart_body,
    pending_reservations,
    stow_headers,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db


async def test_same_instances_from_eight_clients(
    app: Starlette, app_client: httpx.AsyncClient, pg_dsn: str
) -> None:
    files = [to_bytes(make_instance()) for _ in range(20)]

    async def client() -> int:
        r = await app_client.post(
            f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers()
        )
        return r.status_code

    statuses = await asyncio.gather(*(client() for _ in range(8)))
    assert statuses == [200] * 8
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM instance") == 20
        assert await pending_reservations(conn, app.state.services.index) == 0
    finally:
        await conn.close()


async def test_aggregates_under_concurrent_stow_to_one_study(app_client: httpx.AsyncClient) -> None:
    study = generate_uid()
    modalities = ["CT", "MR", "PT", "US"]
    series = {m: generate_uid() for m in modalities}

    async def send(i: int) -> int:
        m = modalities[i % 4]
        ds = make_instance(study=study, series=series[m], modality=m)
        r = await app_client.post(
            f"{ROOT}/studies/{study}",
            content=multipart_body([to_bytes(ds)]),
            headers=stow_headers(),
        )
        return r.status_code

    assert set(await asyncio.gather(*(send(i) for i in range(40)))) == {200}
    r = await app_client.get(f"{ROOT}/studies", params={"StudyInstanceUID": study})
    (doc,) = r.json()
    assert values(doc, "00201208") == [40]
    assert values(doc, "00201206") == [4]
    assert values(doc, "00080061") == sorted(modalities)
    r = await app_client.get(f"{ROOT}/studies/{study}/series")
    assert sorted(values(s, "00201209")[0] for s in r.json()) == [10, 10, 10, 10]  # type: ignore[type-var]
