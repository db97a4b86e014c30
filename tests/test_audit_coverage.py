"""What the audit trail records of requests that do not simply succeed (found by an audit
coverage review, each checked against a real server first): a response cut mid-body by its
client or by the archive, a HEAD, a method a path does not take, a STOW whose client went
away after instances were stored; and the bytes a C-FIND, C-MOVE and C-GET sent."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from starlette.applications import Starlette

from dicomweb_server.app import create_app
from dicomweb_server.auth import create_api_key
from dicomweb_server.config import Settings
from tests.dimse_support import (
    PEER,
    Archive,
    associate,
    audit_rows,
    audit_seq,
    identifier,
    in_thread,
    requestor_store,
    scu,
    stow,
)
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes
from tests.test_audit import empty_audit  # noqa: F401  (a fixture)

pytestmark = pytest.mark.db

# The outcomes of a response cut mid-body (guard.CUT_BY_CLIENT, CUT_BY_SERVER).
CUT_BY_CLIENT, CUT_BY_SERVER = 499, 500

# Rows and columns of an instance whose retrieval is streamed in several body messages
# (2 MiB of 16-bit pixels: past routes.responses.INLINE_RESPONSE_BYTES and READ_CHUNK_BYTES).
_LARGE = 1024
_AS_STORED = b'multipart/related; type="application/dicom"; transfer-syntax=*'


@pytest.fixture
async def keyed(
    settings: Settings,
    empty_audit: str,  # noqa: F811  (the fixture imported above)
) -> AsyncIterator[tuple[Starlette, dict[str, str]]]:
    """The app with API keys on, an empty audit trail, and Authorization headers of a
    `read` and a `write` key."""
    app = create_app(dataclasses.replace(settings, auth="apikey"))
    async with app.router.lifespan_context(app):
        index = app.state.services.index
        creds = {}
        for role in ("read", "write"):
            key_id, token = await create_api_key(index, role)
            creds[role], creds[role + "_id"] = f"Bearer {token}", key_id
        yield app, creds


async def _rows(app: Starlette, action: str) -> list[dict[str, Any]]:
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT caller, client, action, uids, outcome, bytes, detail FROM audit_log"
        " WHERE action = $1 ORDER BY seq",
        action,
    )
    return [dict(r) for r in rows]


def _scope(method: str, path: str, auth: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.1"},  # hypercorn's
        "http_version": "1.1", "method": method, "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", auth.encode()), *headers],
        "client": ("192.0.2.8", 40000), "server": ("testserver", 80),
    }  # fmt: skip


async def _call(
    app: Starlette, scope: dict[str, Any], body: bytes = b"", *,
    cut: bool = False, send_fails_at: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Drive the app as hypercorn does: the request `body`, complete or `cut` (the client
    gone: a disconnect next); the response body message `send_fails_at` (0: the first)
    raises as a server's send to a closed connection does. The messages sent."""
    messages = [{"type": "http.request", "body": body, "more_body": cut}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if not cut:  # still there: a streamed response's listener waits until it ends
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        if message["type"] == "http.response.body" and len(bodies) == send_fails_at:
            raise OSError("connection closed")
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


async def _large_study(app: Starlette, write: str, count: int) -> tuple[str, list[Any]]:
    study = "1.2.826.0.1.3680043.8.498.7001"
    instances = [
        make_instance(study=study, series=study + ".1", rows=_LARGE, cols=_LARGE)
        for _ in range(count)
    ]
    async with _client(app) as client:
        r = await client.post(f"{ROOT}/studies", content=multipart_body(map(to_bytes, instances)),
                              headers=stow_headers() | {"Authorization": write})  # fmt: skip
        assert r.status_code == 200, r.text
    return study, instances


def _client(app: Starlette) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_a_download_its_client_left_is_not_a_complete_transfer(
    keyed: tuple[Starlette, dict[str, str]],
) -> None:
    """The client went away after the first body message: the row said 200, a complete
    transfer (EventOutcomeIndicator 0), with bytes it never took. Now 499, and the bytes
    handed on before the send failed."""
    app, creds = keyed
    study, _ = await _large_study(app, creds["write"], 1)
    scope = _scope("GET", f"{ROOT}/studies/{study}", creds["read"], (b"accept", _AS_STORED))
    sent = await _call(app, scope, send_fails_at=1)
    assert sent[0]["status"] == 200
    first = len(sent[1]["body"])
    (row,) = await _rows(app, "retrieve_study")
    assert (row["outcome"], row["bytes"], row["uids"]) == (CUT_BY_CLIENT, first, [study])
    assert row["caller"] == f"apikey:{creds['read_id']}" and row["client"] == "192.0.2.8"


async def test_a_download_the_archive_broke_off_is_its_failure(
    keyed: tuple[Starlette, dict[str, str]],
) -> None:
    """The second instance's file is damaged (shorter than recorded): the response, started
    200 with the first, breaks off there. The row said 200; now 500 (the archive failed).
    The lost file is not raised on to the server (app._CatchAllMiddleware logs it, no
    traceback): the response is left unfinished, and the server ends it so."""
    app, creds = keyed
    study, _ = await _large_study(app, creds["write"], 2)
    svc = app.state.services
    last = (await svc.index.locate(study))[-1]  # the second sent
    os.truncate(svc.blobs.local_path(last.blob_key), last.size_bytes // 2)
    scope = _scope("GET", f"{ROOT}/studies/{study}", creds["read"], (b"accept", _AS_STORED))
    sent = await _call(app, scope)
    assert sent[0]["status"] == 200 and sent[-1]["more_body"]  # never finished
    (row,) = await _rows(app, "retrieve_study")
    assert row["outcome"] == CUT_BY_SERVER and row["bytes"] > 0


async def test_a_head_sends_no_bytes(keyed: tuple[Starlette, dict[str, str]]) -> None:
    """A HEAD's body never goes on the wire (RFC 9110 9.3.2; hypercorn drops it): its row
    counted the body the app made, as if it had been sent."""
    app, creds = keyed
    study, _ = await _large_study(app, creds["write"], 1)
    async with _client(app) as client:
        for method in ("HEAD", "GET"):
            r = await client.request(method, f"{ROOT}/studies/{study}/metadata",
                                     headers={"Authorization": creds["read"]})  # fmt: skip
            assert r.status_code == 200
        r = await client.head(f"{ROOT}/studies?StudyInstanceUID={study}",
                              headers={"Authorization": creds["read"]})  # fmt: skip
        assert r.status_code == 200
    head, get = await _rows(app, "retrieve_study_metadata")
    assert head["bytes"] == 0 and get["bytes"] > 0
    ((search),) = await _rows(app, "search_for_studies")
    assert search["bytes"] == 0 and search["detail"] == f"StudyInstanceUID={study}"


async def test_a_method_a_path_does_not_take_is_audited_as_sent(
    keyed: tuple[Starlette, dict[str, str]],
) -> None:
    """A DELETE of a study (refused: the route of that path taking POST needs `write`) was
    recorded as `store_study_instances`, a STOW attempt. Now the method and path as sent,
    the study still named."""
    app, creds = keyed
    study = "1.2.826.0.1.3680043.8.498.7002"
    async with _client(app) as client:
        r = await client.delete(f"{ROOT}/studies/{study}", headers={"Authorization": creds["read"]})
    assert r.status_code == 403
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT action, uids, outcome FROM audit_log WHERE action LIKE 'DELETE %'"
    )
    assert [dict(r) for r in rows] == [
        {"action": f"DELETE {ROOT}/studies/{study}", "uids": [study], "outcome": 403}
    ]
    assert not await _rows(app, "store_study_instances")


async def test_a_stow_its_client_left_names_what_it_stored(
    keyed: tuple[Starlette, dict[str, str]],
) -> None:
    """Two instances whole, then the client gone mid-way through a third: the two stay in
    the archive, and the row (499) named none of them."""
    app, creds = keyed
    instances = [make_instance(study="1.2.826.0.1.3680043.8.498.7003") for _ in range(3)]
    body = multipart_body(map(to_bytes, instances))
    cut = body.index(to_bytes(instances[2])) + 100
    ctype = stow_headers()["Content-Type"].encode()
    scope = _scope("POST", f"{ROOT}/studies", creds["write"], (b"content-type", ctype))
    sent = await _call(app, scope, body[:cut], cut=True)
    assert sent == [] or sent[0]["status"] == CUT_BY_CLIENT
    (row,) = await _rows(app, "store_instances")
    stored = [f"{i.StudyInstanceUID}/{i.SeriesInstanceUID}/{i.SOPInstanceUID}"
              for i in instances[:2]]  # fmt: skip
    assert row["outcome"] == CUT_BY_CLIENT and sorted(row["uids"]) == sorted(stored)
    assert row["bytes"] == cut


async def test_dimse_retrievals_and_queries_count_the_bytes_they_sent(archive: Archive) -> None:
    """Every C-FIND, C-MOVE and C-GET was recorded with 0 bytes, whatever it disclosed. Now
    the data set bytes of the DIMSE messages sent: C-FIND identifiers, the C-STORE
    sub-operations' data sets (at least the pixels of each instance sent)."""
    study = "1.2.826.0.1.3680043.8.498.7004"
    instances = [make_instance(study=study, series=study + ".1", rows=64, cols=64)
                 for _ in range(2)]  # fmt: skip
    await stow(archive, *instances)
    pixels = 2 * 64 * 64 * 2

    def find() -> None:
        ae = scu(StudyRootQueryRetrieveInformationModelFind)
        assoc = associate(ae, archive)
        try:
            ident = identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID="")
            statuses = [
                st.Status
                for st, _ in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind)
            ]
            assert statuses[-1] == 0
        finally:
            assoc.release()

    def get() -> None:
        ae = scu(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        on_store = requestor_store(lambda _event: 0x0000)
        ext_neg = [build_role(CTImageStorage, scp_role=True)]
        assoc = associate(ae, archive, ext_neg=ext_neg, evt_handlers=[on_store])
        try:
            ident = identifier("STUDY", StudyInstanceUID=study)
            model = StudyRootQueryRetrieveInformationModelGet
            assert [st for st, _ in assoc.send_c_get(ident, model)][-1].Status == 0
        finally:
            assoc.release()

    def move() -> None:
        ae = scu(StudyRootQueryRetrieveInformationModelMove)
        assoc = associate(ae, archive)
        try:
            ident = identifier("STUDY", StudyInstanceUID=study)
            model = StudyRootQueryRetrieveInformationModelMove
            assert [st for st, _ in assoc.send_c_move(ident, PEER, model)][-1].Status == 0
        finally:
            assoc.release()

    start = await audit_seq(archive)
    for operation in (find, get, move):
        await in_thread(operation)
    (found,) = await audit_rows(archive, "dimse_find", start)
    assert found["detail"].endswith("matches=2") and found["bytes"] > 2 * len(study)
    for action in ("dimse_get", "dimse_move"):
        (row,) = await audit_rows(archive, action, start)
        assert len(row["uids"]) == 2 and pixels < row["bytes"] < pixels + 4096, row
