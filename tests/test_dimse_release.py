"""A requestor's A-RELEASE-RQ while an operation is under way (PS3.8 7.2.2: it can then send
nothing but an A-ABORT, and may still receive P-DATA): a C-GET whose C-STORE sub-operation
awaits its response, or whose data set is being sent, a C-MOVE, a C-FIND (release.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.config import Settings
from tests.dimse_support import (
    CLIENT_TIMEOUT_S,
    PEER,
    Archive,
    Closes,
    archive_with_peer,
    associate,
    audit_rows,
    audit_seq,
    identifier,
    in_thread,
    requestor_store,
    running_peer,
    scu,
    stow,
)
from tests.helpers import make_instance

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

GET, MOVE = StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove
FIND = StudyRootQueryRetrieveInformationModelFind
C_GET_RSP, C_MOVE_RSP, C_FIND_RSP = 0x8010, 0x8021, 0x8020
LARGE_MULTIFRAME = "generated/large/ect_24frames_512_explicit_le.dcm"  # 12.5 MB, 24 frames

# Seconds the requestor waits for the archive's A-RELEASE-RP (then aborts), and the most the
# archive may take to end the association once asked (it took the requestor's ACSE timeout).
REQUESTOR_ACSE_TIMEOUT_S = 20
PROMPT_S = 5
# Seconds the requestor's C-GET/C-MOVE waits for a next response once it has released (the
# final one may have come before it looks: pynetdicom's send_c_get then waits that long).
REQUESTOR_DIMSE_TIMEOUT_S = 5
# Seconds between two data set fragments the archive sends, in the test of a release that
# comes while they go (770 fragments: 4 s in all).
SLOW_FRAGMENT_S = 0.005


@dataclass
class _Released:
    took: float  # seconds until the release was answered, or the archive aborted
    released: bool  # the archive answered it (else it aborted, or nothing came)
    statuses: list[int]  # the C-GET responses the requestor received, in order


def _get_then_release(archive: Archive, study: str, sop_class: str, when: str) -> _Released:
    """A C-GET of `study` by a pynetdicom requestor that asks to release the association
    `when` the first C-STORE-RQ's "command" arrives, or once its "data set" has (its C-STORE
    handler then waits for the release to end: once asking, a requestor answers nothing,
    PS3.8 7.2.2; pynetdicom's own answer would fail in its state machine, Sta7)."""
    ae = scu(GET)
    ae.acse_timeout, ae.dimse_timeout = REQUESTOR_ACSE_TIMEOUT_S, REQUESTOR_DIMSE_TIMEOUT_S
    ae.maximum_pdu_size = 16382  # a large data set in many PDUs
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    asking, ended, statuses = threading.Event(), threading.Event(), []
    received: list[Path] = []  # the files C-STORE data sets were received into
    aborted: list[float] = []  # when the archive's A-ABORT came

    def on_store(event: Event) -> int:
        asking.set()
        ended.wait(CLIENT_TIMEOUT_S)
        return 0x0000

    def on_recv(event: Event) -> None:
        command = event.message.command_set
        if command.CommandField == C_GET_RSP:
            statuses.append(int(command.Status))
        spooled = getattr(event.message, "_data_set_path", None)
        if isinstance(spooled, Path):
            received.append(spooled)

    def on_pdu(event: Event) -> None:  # the first P-DATA-TF: a C-STORE-RQ's command
        if isinstance(event.pdu, P_DATA_TF) and when == "command":
            asking.set()
        if isinstance(event.pdu, A_ABORT_RQ):
            aborted.append(time.monotonic())

    handlers = [requestor_store(on_store), (evt.EVT_DIMSE_RECV, on_recv),
                (evt.EVT_PDU_RECV, on_pdu)]  # fmt: skip
    assoc = associate(ae, archive, ext_neg=[build_role(sop_class, scp_role=True)],
                      evt_handlers=handlers)  # fmt: skip
    ident = identifier("STUDY", StudyInstanceUID=study)
    getting = threading.Thread(target=lambda: list(assoc.send_c_get(ident, GET)), daemon=True)
    getting.start()
    try:
        assert asking.wait(CLIENT_TIMEOUT_S), "no C-STORE sub-operation came"
        began = time.monotonic()
        assoc.release()
        # Until the release is answered, or the archive aborts: pynetdicom's release() may
        # not see an A-ABORT its association's own thread took off the queue first, and
        # wait its whole ACSE timeout (1 run in 25).
        took = min([time.monotonic(), *aborted]) - began
        return _Released(took, assoc.is_released, statuses)
    finally:
        ended.set()
        getting.join(CLIENT_TIMEOUT_S)
        assoc.kill()
        # The files pynetdicom received a data set into and did not serve (a requestor
        # deletes only those it served, dimse_support.requestor_store): one cut short (an
        # A-ABORT came first), one whole that came as the association was released.
        spool = getattr(getattr(assoc.dimse, "message", None), "_data_set_file", None)
        if spool is not None:
            spool.close()
            Path(spool.name).unlink(missing_ok=True)
        for path in received:
            path.unlink(missing_ok=True)


async def test_release_awaiting_a_c_store_response_is_answered_at_once(
    archive: Archive,
) -> None:
    """The requestor asks to release once it has a C-STORE sub-operation's data set, which
    it will not answer: the archive waited the DIMSE timeout (120 s) for that response, and
    the requestor aborted after its ACSE timeout. Now that sub-operation fails at once, the
    next one is not sent, the final C-GET response goes (0xA702: all failed, PS3.4
    C.4.3.3.1) and the release is answered (PS3.8 7.2.2)."""
    study = make_instance().StudyInstanceUID
    await stow(archive, *(make_instance(study=study) for _ in range(2)))
    start = await audit_seq(archive)
    done = await in_thread(_get_then_release, archive, study, CTImageStorage, "data set")
    assert done.took < PROMPT_S, done
    assert done.released, done
    assert done.statuses[-1] == 0xA702, done
    (row,) = await audit_rows(archive, ("dimse_get", "dimse_abort"), start)
    assert (row["action"], row["outcome"]) == ("dimse_get", 0xA702)
    assert "matched=2 completed=0 warning=0 failed=2" in row["detail"]


async def test_release_read_as_the_last_fragment_is_about_to_go_fails_it_at_once(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request to release is read after the sender last looked for it and before it
    hands on the last fragment of a data set (a stored file: while it reads the fragment; a
    conversion: while it waits up to 0.1 s for the last bytes to be written). The fragment
    went, and the archive waited the DIMSE timeout for its response: the requestor aborted
    after its ACSE timeout. Now that sub-operation fails at once, as one sent before."""
    from dicomweb_server.dimse import streaming

    fragments = streaming.Growing.fragments
    server = cast(Any, archive.dimse).server

    def release_read_first(self: Any, *args: Any) -> Iterator[tuple[bytes, bool]]:
        for data, last in fragments(self, *args):
            deadline = time.monotonic() + CLIENT_TIMEOUT_S
            while last and not any(a.dul.releases.requested for a in server.active_associations):
                assert time.monotonic() < deadline, "no A-RELEASE-RQ read"
                time.sleep(0.01)
            yield data, last

    monkeypatch.setattr(streaming.Growing, "fragments", release_read_first)
    study = make_instance().StudyInstanceUID
    await stow(archive, *(make_instance(study=study) for _ in range(2)))
    start = await audit_seq(archive)
    done = await in_thread(_get_then_release, archive, study, CTImageStorage, "command")
    assert done.took < PROMPT_S, done
    assert done.released, done
    assert done.statuses[-1] == 0xA702, done
    (row,) = await audit_rows(archive, ("dimse_get", "dimse_abort"), start)
    assert (row["action"], row["outcome"]) == ("dimse_get", 0xA702)
    assert "matched=2 completed=0 warning=0 failed=2" in row["detail"]


async def test_release_while_a_data_set_is_sent_aborts_at_once(
    archive: Archive, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requestor asks to release as the first C-STORE-RQ of a 12.5 MB instance arrives
    (in 16 KB PDUs, each read from the file SLOW_FRAGMENT_S after the one before: the
    archive's DUL thread, which reads what the peer sends only when it has nothing left to
    send, then sees the request while the data set is being sent). The archive sent all of
    it, then waited for a response that could not come. Now it stops at the next fragment
    and aborts the association (a data set cannot end short, PS3.8 E.2; an A-ABORT may
    disrupt a release, PS3.8 7.2.2): at once, the sub-operation failed, most of the data
    set never sent."""
    from pydicom import dcmread

    from dicomweb_server.dimse import streaming

    fragments = streaming.Growing.fragments

    def slow_fragments(self: Any, *args: Any) -> Iterator[tuple[bytes, bool]]:
        for fragment in fragments(self, *args):
            time.sleep(SLOW_FRAGMENT_S)
            yield fragment

    monkeypatch.setattr(streaming.Growing, "fragments", slow_fragments)
    path = samples / LARGE_MULTIFRAME
    ds = dcmread(path)
    await stow(archive, ds)
    start = await audit_seq(archive)
    with Closes(archive) as closes:
        done = await in_thread(_get_then_release, archive, ds.StudyInstanceUID,
                               ds.SOPClassUID, "command")  # fmt: skip
        await closes.wait()
    assert done.took < PROMPT_S, done
    assert not done.released, done
    deadline = time.monotonic() + PROMPT_S  # audited as its handler ends, after the abort
    while not (rows := await audit_rows(archive, "dimse_get", start)):
        assert time.monotonic() < deadline, "the C-GET was not audited"
        await anyio.sleep(0.05)
    (get,) = rows
    assert get["outcome"] == 0xA702 and "failed=1" in get["detail"], get
    assert get["bytes"] < path.stat().st_size // 2, get
    (abort,) = await audit_rows(archive, "dimse_abort", start)
    assert "aborted by the archive" in abort["detail"], abort


async def test_release_during_a_c_move_ends_its_sub_operations_and_is_answered(
    settings: Settings, tmp_path: Path
) -> None:
    """The C-MOVE requestor asks to release after the first pending response, the
    destination taking a second over each C-STORE: pynetdicom's Move SCP took the request
    off the reactor's queue, stopped, and answered a final status that counted none of the
    sub-operations not sent; the release was never answered (the requestor aborted after
    its ACSE timeout). Now the sub-operations not begun fail, unsent, the final C-MOVE
    response counts them (0xB000), and the release is answered at once."""
    study = make_instance().StudyInstanceUID
    instances = [make_instance(study=study) for _ in range(3)]
    with running_peer(store_delay_s=1.0) as peer:
        async with archive_with_peer(settings, peer, tmp_path) as archive:
            await stow(archive, *instances)
            start = await audit_seq(archive)
            done = await in_thread(_move_then_release, archive, study)
            rows = await audit_rows(archive, "dimse_move", start)
        received = len(peer.received)
    assert done.took < PROMPT_S, done
    assert done.released, done
    assert done.statuses[-1] == 0xB000, done
    assert 1 <= received < 3
    ((row_outcome, detail),) = [(r["outcome"], r["detail"]) for r in rows]
    assert row_outcome == 0xB000
    assert f"completed={received} warning=0 failed={3 - received}" in detail


def _move_then_release(archive: Archive, study: str) -> _Released:
    """A C-MOVE of `study` to PEER, the association released at its first pending response."""
    ae = scu(MOVE)
    ae.acse_timeout, ae.dimse_timeout = REQUESTOR_ACSE_TIMEOUT_S, REQUESTOR_DIMSE_TIMEOUT_S
    pending, statuses = threading.Event(), []

    def on_recv(event: Event) -> None:
        command = event.message.command_set
        if command.CommandField == C_MOVE_RSP:
            statuses.append(int(command.Status))
            pending.set()

    assoc = associate(ae, archive, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    ident = identifier("STUDY", StudyInstanceUID=study)
    moving = threading.Thread(target=lambda: list(assoc.send_c_move(ident, PEER, MOVE)),
                              daemon=True)  # fmt: skip
    moving.start()
    try:
        assert pending.wait(CLIENT_TIMEOUT_S), "no pending C-MOVE response came"
        began = time.monotonic()
        assoc.release()
        return _Released(time.monotonic() - began, assoc.is_released, statuses)
    finally:
        moving.join(CLIENT_TIMEOUT_S)
        assoc.kill()


async def test_release_during_a_c_find_ends_it_with_cancel(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requestor asks to release after the first pending C-FIND response: pynetdicom's
    Find SCP took the request off the queue between two matches, stopped, and answered
    Success after the matches sent so far (audited as unfinished, one more counted than
    sent). Now the matches not sent are left out and the final response says so, 0xFE00
    (the requestor can send no C-CANCEL once it asked to release, PS3.8 7.2.2), the audit
    trail records that and the matches sent, and the release is answered at once."""
    from dicomweb_server.dimse import handlers

    study = make_instance().StudyInstanceUID
    await stow(archive, *(make_instance(study=study) for _ in range(FIND_MATCHES)))
    made = handlers.find_response  # type: ignore[attr-defined]

    def slower(*args: Any) -> Dataset:  # the release comes before the last match
        time.sleep(FIND_MATCH_S)
        return made(*args)

    monkeypatch.setattr(handlers, "find_response", slower)
    start = await audit_seq(archive)
    done = await in_thread(_find_then_release, archive, study)
    assert done.took < PROMPT_S, done
    assert done.released, done
    *pending, final = done.statuses
    assert final == 0xFE00, done
    assert 1 <= len(pending) < FIND_MATCHES and set(pending) == {0xFF00}, done
    (row,) = await audit_rows(archive, "dimse_find", start)
    assert row["outcome"] == 0xFE00
    assert row["detail"].endswith(f" matches={len(pending)}"), row


# Instances a C-FIND matches, and the seconds each match takes to answer, in the test of a
# release during a C-FIND (the whole C-FIND would take 2 s).
FIND_MATCHES = 20
FIND_MATCH_S = 0.1


def _find_then_release(archive: Archive, study: str) -> _Released:
    """A C-FIND of `study`'s instances, the association released at its first pending
    response."""
    ae = scu(FIND)
    ae.acse_timeout, ae.dimse_timeout = REQUESTOR_ACSE_TIMEOUT_S, REQUESTOR_DIMSE_TIMEOUT_S
    pending, statuses = threading.Event(), []

    def on_recv(event: Event) -> None:
        command = event.message.command_set
        if command.CommandField == C_FIND_RSP:
            statuses.append(int(command.Status))
            pending.set()

    assoc = associate(ae, archive, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    ident = identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID="")
    finding = threading.Thread(target=lambda: list(assoc.send_c_find(ident, FIND)), daemon=True)
    finding.start()
    try:
        assert pending.wait(CLIENT_TIMEOUT_S), "no pending C-FIND response came"
        began = time.monotonic()
        assoc.release()
        took = time.monotonic() - began
        finding.join(CLIENT_TIMEOUT_S)  # the responses received after the release's answer
        return _Released(took, assoc.is_released, statuses)
    finally:
        assoc.kill()
