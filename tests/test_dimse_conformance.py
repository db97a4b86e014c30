"""DIMSE conformance details checked against the standard's text: the final C-GET / C-MOVE
responses (PS3.4 C.4.2.1.6, C.4.3.1.5), a C-STORE on a presentation context of another SOP
Class (PS3.7 9.1.1.1.9, D.3.2), and a C-STORE whose data set is empty or never comes. An
A-RELEASE-RQ during an operation: test_dimse_release.py."""

from __future__ import annotations

import contextlib
import io
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    PEER,
    Archive,
    associate,
    identifier,
    in_thread,
    instance_count,
    requestor_store,
    scu,
    stow,
)
from tests.helpers import make_instance, to_bytes

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

GET, MOVE = StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove
C_GET_RSP, C_MOVE_RSP = 0x8010, 0x8021


# -- Final C-GET / C-MOVE responses ---------------------------------------------------------


def _responses(archive: Archive, idents: list[Dataset], get: bool) -> list[list[Dataset]]:
    """The command sets of the C-GET (or C-MOVE to PEER) responses to each of `idents`, as
    received, all sent on one association."""
    model = GET if get else MOVE
    ae = scu(model)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = [build_role(CTImageStorage, scp_role=True)] if get else []
    received: list[Dataset] = []

    def on_recv(event: Event) -> None:
        if event.message.command_set.CommandField in (C_GET_RSP, C_MOVE_RSP):
            received.append(event.message.command_set)

    handlers = [(evt.EVT_DIMSE_RECV, on_recv), requestor_store(lambda event: 0x0000)]
    assoc = associate(ae, archive, ext_neg=role, evt_handlers=handlers)
    out = []
    try:
        for ident in idents:
            received.clear()
            sent = assoc.send_c_get(ident, model) if get else assoc.send_c_move(ident, PEER, model)
            assert len(list(sent)) == len(received)
            out.append(list(received))
        return out
    finally:
        assoc.release()


@pytest.mark.parametrize("get", [True, False], ids=["c-get", "c-move"])
async def test_final_responses_carry_no_remaining_count(archive: Archive, get: bool) -> None:
    """PS3.4 C.4.2.1.6 / C.4.3.1.5: a response with a status of Pending shall contain the
    Number of Remaining Sub-operations, and one of Warning, Failure or Success shall not.
    pynetdicom's SCPs left the last pending response's 0 in the final one. Success (two
    instances), Warning (one of two unreadable), Failure (0xA702, every one unreadable), on
    one association after an identifier refused as a whole (final_failure wraps the same
    send and put back only pynetdicom's own)."""
    studies = {}
    for name in ("success", "warning", "failure"):
        study = make_instance().StudyInstanceUID
        instances = [make_instance(study=study) for _ in range(2)]
        await stow(archive, *instances)
        studies[name] = study
    for name, lost in (("warning", 1), ("failure", 2)):
        for inst in (await archive.services.index.locate(studies[name]))[:lost]:
            archive.services.blobs.local_path(inst.blob_key).unlink()
    idents = [identifier("FOO", StudyInstanceUID="1.2.3")]
    idents += [identifier("STUDY", StudyInstanceUID=studies[n]) for n in studies]
    refused, *answered = await in_thread(_responses, archive, idents, get)
    assert [int(r.Status) for r in refused] == [0xA900]
    assert "NumberOfRemainingSuboperations" not in refused[0]
    for rsps, final_status in zip(answered, (0x0000, 0xB000, 0xA702), strict=True):
        *pending, final = rsps
        assert int(final.Status) == final_status, final
        assert "NumberOfRemainingSuboperations" not in final, final
        assert final.NumberOfCompletedSuboperations + final.NumberOfFailedSuboperations == 2
        assert pending and all(int(p.Status) == 0xFF00 for p in pending)
        assert [int(p.NumberOfRemainingSuboperations) for p in pending] == [1, 0][: len(pending)]


# -- C-STORE requests refused before the ingest ---------------------------------------------


@contextlib.contextmanager
def _paused(assoc: Association) -> Iterator[None]:
    """pynetdicom's reactor paused, so that the archive's answers stay in the queue for
    _answer (it would take them otherwise)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _answer(assoc: Association, timeout_s: float = CLIENT_TIMEOUT_S) -> Any:
    """The next message the archive sends on `assoc` (reactor paused), None if none comes
    within `timeout_s` or the association ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and assoc.is_established:
        with contextlib.suppress(queue.Empty):
            return assoc.dimse.msg_queue.get(timeout=0.05)[1]
    return None


def _store_request(ds: Dataset, sop_class: str, data: bytes | None, message_id: int) -> C_STORE:
    """A C-STORE-RQ of `sop_class` carrying `data` as its data set: b"" announces one and
    sends no fragment of it (pynetdicom's encode_msg), None announces none (0101H)."""
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(data) if data is not None else None
    return req


def _data_set_fragment(cx: int, data: bytes) -> P_DATA:
    """A P-DATA of one last data set fragment (PS3.8 E.2: message control header 02H)."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((cx, b"\x02" + data))
    return pdata


def _encoded(ds: Dataset) -> bytes:
    return cast(bytes, encode(ds, False, True))


@pytest.mark.parametrize("sop_class", [MRImageStorage, Verification, "1.2.3.4"])
async def test_store_of_another_sop_class_than_its_context_is_refused(
    archive: Archive, sop_class: str
) -> None:
    """A C-STORE naming a SOP Class other than its presentation context's abstract syntax:
    0x0122, Refused: SOP Class not supported (PS3.7 9.1.1.1.9; each SOP Class goes over a
    context of its own, PS3.7 D.3.2, PS3.4 B.3), nothing stored, and the association goes on.
    It was stored (an MR data set on a CT context), answered with a C-ECHO-RSP (pynetdicom
    serves a request by its Affected SOP Class UID: Verification), or the association
    aborted (a UID pynetdicom has no service for)."""
    ds = make_instance()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> tuple[Any, int]:
        assoc = associate(ae, archive)
        try:
            (cx,) = assoc.accepted_contexts
            with _paused(assoc):
                request = _store_request(ds, sop_class, _encoded(ds), 1)
                assoc.dimse.send_msg(request, cast(int, cx.context_id))
                refused = _answer(assoc)
            return refused, int(assoc.send_c_store(make_instance()).Status)
        finally:
            assoc.release()

    refused, then = await in_thread(send)
    assert isinstance(refused, C_STORE), refused
    assert refused.Status == 0x0122
    assert refused.ErrorComment == f"SOP Class {sop_class} not negotiated on context 1"
    assert then == 0x0000  # the association still serves
    assert await instance_count(archive) == 1


@pytest.mark.parametrize("data", [None, b""], ids=["0101H", "0-bytes"])
async def test_store_without_a_data_set_is_refused_at_once(
    archive: Archive, data: bytes | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE-RQ announcing no data set (Command Data Set Type 0101H; PS3.7 9.3.1.1 gives
    it one), or one of 0 bytes (a last fragment of none): 0xA900 naming it, nothing stored.
    The first had pynetdicom answer 0xC211 with no Error Comment (the handler raised), the
    second "SOPClassUID is missing"."""
    from pynetdicom import _config

    ds = make_instance()
    if data is None:
        request: Any = _store_request(ds, CTImageStorage, None, 1)
    else:  # a Part-10 file of no data set, sent from the file: one fragment of 0 bytes
        path = tmp_path / "empty.dcm"
        path.write_bytes(to_bytes(ds)[: -len(_encoded(ds))])
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        request = path
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> Any:
        assoc = associate(ae, archive)
        try:
            if isinstance(request, Path):
                return assoc.send_c_store(request)
            (cx,) = assoc.accepted_contexts
            with _paused(assoc):
                assoc.dimse.send_msg(request, cast(int, cx.context_id))
                return _answer(assoc)
        finally:
            assoc.release()

    rsp = await in_thread(send)
    assert rsp.Status == 0xA900
    expected = "no data set: Command Data Set Type 0101H" if data is None else "empty (0 bytes)"
    assert expected in rsp.ErrorComment
    assert await instance_count(archive) == 0


# Seconds the tests give a data set to begin (stores.DIMSE_DATA_SET_WAIT_S), and what one
# that begins in time takes to (well within it, on a loaded machine too).
DATA_SET_WAIT_S = 2.0
IN_TIME_S = 0.5


async def test_store_whose_data_set_never_comes_is_refused_and_the_association_goes_on(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-STORE-RQ announcing a data set and sending none of it (pynetdicom's send_msg of
    an empty one) waited for the archive's network timeout (60 s), which aborted the
    association. Now, nothing received within DIMSE_DATA_SET_WAIT_S of its command, it is
    answered 0xA900 naming that; the data set sent after is dropped, and the association
    serves the next C-STOREs: one whose data set begins within the wait is stored."""
    from dicomweb_server.dimse import stores

    monkeypatch.setattr(stores, "DIMSE_DATA_SET_WAIT_S", DATA_SET_WAIT_S)
    late, in_time, after = make_instance(), make_instance(), make_instance()
    ae = scu()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

    def send() -> tuple[Any, float, Any, int]:
        assoc = associate(ae, archive)
        try:
            (cx,) = assoc.accepted_contexts
            cx_id = cast(int, cx.context_id)
            with _paused(assoc):
                began = time.monotonic()
                assoc.dimse.send_msg(_store_request(late, CTImageStorage, b"", 1), cx_id)
                refused = _answer(assoc, DATA_SET_WAIT_S + 10)
                took = time.monotonic() - began
                assoc.dul.send_pdu(_data_set_fragment(cx_id, _encoded(late)))  # too late
                assoc.dimse.send_msg(_store_request(in_time, CTImageStorage, b"", 2), cx_id)
                time.sleep(IN_TIME_S)
                assoc.dul.send_pdu(_data_set_fragment(cx_id, _encoded(in_time)))
                stored = _answer(assoc)
            return refused, took, stored, int(assoc.send_c_store(after).Status)
        finally:
            assoc.release()

    refused, took, stored, then = await in_thread(send)
    assert isinstance(refused, C_STORE), "no answer"
    assert refused.Status == 0xA900
    assert refused.ErrorComment == f"no data set within {DATA_SET_WAIT_S} s of the command"
    assert DATA_SET_WAIT_S <= took < DATA_SET_WAIT_S + 5
    assert isinstance(stored, C_STORE) and stored.Status == 0x0000, stored
    assert stored.MessageIDBeingRespondedTo == 2
    assert then == 0x0000
    locate = archive.services.index.locate
    assert await locate(late.StudyInstanceUID) == []
    for ds in (in_time, after):
        assert [i.sop_instance_uid for i in await locate(ds.StudyInstanceUID)] == [
            ds.SOPInstanceUID
        ]
