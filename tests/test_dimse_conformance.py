"""DIMSE conformance details checked against the standard's text: the final C-GET / C-MOVE
responses (PS3.4 C.4.2.1.6, C.4.3.1.5), a C-STORE on a presentation context of another SOP
Class (PS3.7 9.1.1.1.9, D.3.2), a C-STORE whose data set is empty or never comes, and an
A-RELEASE-RQ while a C-GET sub-operation is outstanding (PS3.8 7.2.2)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.dimse_support import (
    PEER,
    Archive,
    associate,
    identifier,
    in_thread,
    requestor_store,
    scu,
    stow,
)
from tests.helpers import make_instance

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
