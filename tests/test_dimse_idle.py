"""The network timeout (DIMSE_NETWORK_TIMEOUT_S) measures silence in both directions: an
association the archive serves a long C-MOVE on, sending pending responses while its
requestor waits in silence, is not idle (association.idle_both_ways); and a C-MOVE
sub-association is not aborted while the archive prepares the next instance
(association.never_idle). The timeout is made small here (the server's constant, read when
the AE is built)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.config import Settings
from dicomweb_server.dimse import handlers as dimse_handlers
from dicomweb_server.dimse import server as dimse_server
from tests.dimse_support import (
    PEER,
    Archive,
    archive_with_peer,
    associate,
    identifier,
    in_thread,
    running_archive,
    running_peer,
    scu,
    stow,
)
from tests.helpers import make_instance

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
NETWORK_S = 2


@pytest.fixture
def small_network_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse_server, "DIMSE_NETWORK_TIMEOUT_S", NETWORK_S)


def _move_twice_then_release(
    archive: Archive, study: str
) -> tuple[list[int], list[int], bool, float]:
    """Two C-MOVEs of `study` to PEER on one association, then an A-RELEASE: the final
    statuses, their completed counts, whether the release was answered (A-RELEASE-RP; not
    an A-ABORT), and the seconds the first C-MOVE took."""
    assoc = associate(scu(MOVE), archive)
    statuses: list[int] = []
    completed: list[int] = []
    took = 0.0
    try:
        for _ in range(2):
            began = time.monotonic()
            responses = list(assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study),
                                               PEER, MOVE))  # fmt: skip
            took = took or time.monotonic() - began
            final: Dataset = responses[-1][0]
            statuses.append(int(final.get("Status", -1)))
            completed.append(int(final.get("NumberOfCompletedSuboperations", -1)))
            if not assoc.is_established:
                break
        assoc.release()
        return statuses, completed, assoc.is_released, took
    finally:
        sock = getattr(assoc.dul.socket, "socket", None)
        if not assoc.is_released:
            assoc.abort()
        if sock is not None:
            sock.close()  # pynetdicom leaves it open when the archive closed first


@pytest.mark.usefixtures("small_network_timeout")
async def test_a_move_longer_than_the_network_timeout_keeps_its_association(
    settings: Settings, tmp_path: Path
) -> None:
    """5 instances to a destination answering each C-STORE in 1 s: the C-MOVE takes 5 s and
    more, the network timeout is 2 s, and its requestor sends nothing meanwhile. The final
    response comes, a second C-MOVE is served on the same association, and the A-RELEASE
    is answered. Before, the archive aborted the association right after the first final
    response (pynetdicom counted only what it received)."""
    study = "1.2.826.0.1.3680043.8.498.7721"
    with running_peer(store_delay_s=1.0) as peer:
        async with archive_with_peer(settings, peer, tmp_path) as archive:
            await stow(archive, *(make_instance(study=study) for _ in range(5)))
            statuses, completed, released, took = await in_thread(
                _move_twice_then_release, archive, study
            )
    assert took > 2 * NETWORK_S
    assert statuses == [0x0000, 0x0000]
    assert completed == [5, 5]
    assert released


@pytest.mark.usefixtures("small_network_timeout")
async def test_a_sub_association_waits_while_the_next_instance_is_prepared(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive takes longer than the network timeout to read or convert each instance
    (made slow here), the destination sending nothing meanwhile, as it should: the
    sub-association is not aborted, every sub-operation completes. Before, pynetdicom's
    requestor aborted it after the network timeout without a PDU received, and the
    sub-operations left failed."""
    study = "1.2.826.0.1.3680043.8.498.7722"
    to_send = dimse_handlers.Handlers._to_send

    def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.5 * NETWORK_S)
        return to_send(self, *args, **kwargs)

    monkeypatch.setattr(dimse_handlers.Handlers, "_to_send", slow)
    with running_peer() as peer:
        async with archive_with_peer(settings, peer, tmp_path) as archive:
            await stow(archive, *(make_instance(study=study) for _ in range(2)))

            def move() -> Dataset:
                assoc = associate(scu(MOVE), archive)
                try:
                    ident = identifier("STUDY", StudyInstanceUID=study)
                    return list(assoc.send_c_move(ident, PEER, MOVE))[-1][0]
                finally:
                    assoc.release()

            final = await in_thread(move)
    assert int(final.Status) == 0x0000
    assert int(final.NumberOfCompletedSuboperations) == 2
    assert len(peer.received) == 2


@pytest.mark.usefixtures("small_network_timeout")
async def test_a_find_longer_than_the_network_timeout_keeps_its_association(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-FIND whose 3 matches come 1 s apart (made slow here), the network timeout 2 s:
    the requestor, silent meanwhile, gets every match, then releases the association. Before,
    it was aborted right after the final response."""
    find_or_fail = dimse_handlers.Handlers._find_or_fail

    def slow(self: Any, event: Any) -> Any:
        for answer in find_or_fail(self, event):
            time.sleep(1.0)
            yield answer

    monkeypatch.setattr(dimse_handlers.Handlers, "_find_or_fail", slow)
    studies = [f"1.2.826.0.1.3680043.8.498.773{n}" for n in range(3)]
    async with running_archive(settings) as archive:
        await stow(archive, *(make_instance(study=study) for study in studies))

        def find() -> tuple[list[int], bool]:
            assoc = associate(scu(FIND), archive)
            try:
                statuses = [int(status.Status) for status, _ in assoc.send_c_find(
                    identifier("STUDY", StudyInstanceUID=""), FIND)]  # fmt: skip
                assoc.release()
                return statuses, assoc.is_released
            finally:
                if not assoc.is_released:
                    assoc.abort()

        statuses, released = await in_thread(find)
    assert statuses == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    assert released
