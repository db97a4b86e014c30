"""The admission of header parses (headersize.parsing): usual ones never wait behind a large
one under way (HEADER_PARSE_UNCOUNTED_BYTES), found by review."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dicomweb_server import headersize
from dicomweb_server.dicomfile import parse_file
from dicomweb_server.headersize import HeaderSize
from dicomweb_server.reservations import Reservations
from tests.helpers import make_instance, to_bytes

# Long enough for a parse that does not wait, however loaded the machine.
_PATIENCE_S = 10.0


def test_the_limit() -> None:
    assert headersize.HEADER_PARSE_UNCOUNTED_BYTES == 16 * 1024 * 1024
    # Every data set too small to be walked is taken at its worst under it.
    worst = headersize._UNWALKED_MAX_BYTES
    assert HeaderSize(worst, worst // 8, worst // 2).estimate < (
        headersize.HEADER_PARSE_UNCOUNTED_BYTES
    )


def test_a_usual_parse_does_not_wait_behind_a_large_one(tmp_path: Path) -> None:
    """A large parse under way (estimated past HEADER_PARSES_MEMORY_BYTES: it runs alone): a
    512 x 512 CT is parsed meanwhile. It waited until the large one ended, in the worker
    thread it parses in (2.2 s for 0.02, and a render waited as long for a thread)."""
    path = tmp_path / "ct.dcm"
    path.write_bytes(to_bytes(make_instance(rows=512, cols=512)))
    budget = headersize._BUDGET
    done = threading.Event()

    def usual() -> None:
        parse_file(path)
        done.set()

    with budget.reserve(budget.limit):  # the large one
        t = threading.Thread(target=usual)
        t.start()
        waited = not done.wait(_PATIENCE_S)
    t.join()
    assert not waited, "the usual parse waited for the large one"
    assert budget.held == 0


@pytest.mark.parametrize("over", [0, 1])
def test_uncounted_at_its_edge(monkeypatch: pytest.MonkeyPatch, over: int) -> None:
    """Estimated at HEADER_PARSE_UNCOUNTED_BYTES: no wait, nothing held. One byte more:
    it waits its turn as before, and holds its estimate while it parses."""
    size = HeaderSize(1000, 100, 10)
    monkeypatch.setattr(headersize, "HEADER_PARSE_UNCOUNTED_BYTES", size.estimate - over)
    budget = Reservations(2 * size.estimate)
    monkeypatch.setattr(headersize, "_BUDGET", budget)
    entered, leave = threading.Event(), threading.Event()
    held: list[int] = []

    def parse() -> None:
        with headersize.parsing(size):
            held.append(budget.held)
            entered.set()
            leave.wait(_PATIENCE_S)

    with budget.reserve(budget.limit):  # a large parse under way
        t = threading.Thread(target=parse)
        t.start()
        assert entered.wait(0.5 if over else _PATIENCE_S) is not bool(over)
    assert entered.wait(_PATIENCE_S)
    leave.set()
    t.join()
    # What was held while it parsed: its own estimate, or the large one's alone.
    assert held == [size.estimate if over else budget.limit] and budget.held == 0
