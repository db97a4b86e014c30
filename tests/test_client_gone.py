"""Clients that leave before their answer, against a real server (hypercorn in a subprocess,
real sockets, HTTP/1.1 and HTTP/2): the whole-instance conversion made for them stops, and
one waiting for its turn never begins (departure.py). hypercorn does not cancel a handler
whose client went away: a conversion of minutes ran to its end, its turn and a core held."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import h2.config
import h2.connection
import h2.errors
import h2.settings
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import generate_uid

from dicomweb_server.retrieve.instances import WADO_CONVERSIONS_AT_ONCE
from tests.helpers import multipart_body, stow_headers, to_bytes
from tests.liveserver import ServerProcess, start

pytestmark = pytest.mark.db

_EXPLICIT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
# Frames of the large instance: 1024 x 1024 16-bit JPEG 2000, 2 MiB each converted. Its
# conversion takes 8 s or more here (0.04 s a frame on an idle core), minutes for a client
# gone once it runs to its end on a busy machine: what the tests measure is well inside it.
_FRAMES = 200
_CONVERTED_BYTES = _FRAMES * 1024 * 1024 * 2
# Seconds a conversion may take to stop once its client has gone: its next frame (0.04 s).
STOP_WITHIN_S = 5.0


def _large_instance(samples: Path) -> Dataset:
    """A JPEG 2000 instance of _FRAMES frames (one sample's codestream, repeated)."""
    ds = pydicom.dcmread(samples / "real/pydicom-data/MR2_J2KI.dcm")
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([frame] * _FRAMES)
    ds.NumberOfFrames = _FRAMES
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _path(ds: Dataset) -> str:
    return (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")  # fmt: skip


@contextlib.contextmanager
def _serving(tmp_path: Path, dsn: str, ds: Dataset) -> Iterator[ServerProcess]:
    server = start(tmp_path / "data", dsn)
    try:
        r = httpx.post(server.url + "/studies", content=multipart_body([to_bytes(ds)]),
                       headers=stow_headers(), timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=60)


def _port(server: ServerProcess) -> int:
    return int(server.url.split(":")[2].split("/")[0])


def _scratch(tmp_path: Path) -> dict[str, int]:
    """The conversions' scratch files (name: bytes written so far)."""
    found = {}
    for p in (tmp_path / "data" / "blobs" / "tmp").rglob("*.dcm"):
        with contextlib.suppress(FileNotFoundError):
            found[p.name] = p.stat().st_size
    return found


def _removed(tmp_path: Path, name: str) -> bool:
    return name not in _scratch(tmp_path)


def _cpu_s(server: ServerProcess) -> float:
    """CPU time the server process has used (user and system), seconds."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for(what: Callable[[], object], within_s: float, why: str) -> float:
    """Seconds until `what()` is true (AssertionError with `why` past `within_s`)."""
    began = time.monotonic()
    while not what():
        assert time.monotonic() - began < within_s, why
        time.sleep(0.02)
    return time.monotonic() - began


class _H1:
    """A GET over HTTP/1.1 on a socket of its own; `leave` closes the socket."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {_EXPLICIT}\r\n\r\n".encode()
        )

    def leave(self) -> None:
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


class _H2:
    """A GET over HTTP/2 (clear text, the client opening with the preface); `leave` resets
    its stream (RST_STREAM CANCEL), the connection kept open, or closes the connection.
    `empty_data`: the request ends with an empty DATA frame carrying END_STREAM after its
    HEADERS (RFC 9113 8.1 allows it), not with END_STREAM on the HEADERS."""

    def __init__(self, port: int, path: str, *, reset: bool, empty_data: bool = False) -> None:
        self.reset = reset
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        # Windows the response never fills: it flows without the client acknowledging it.
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        self.conn.increment_flow_control_window(2**30)
        head = [(":method", "GET"), (":path", path), (":scheme", "http"),
                (":authority", "127.0.0.1"), ("accept", _EXPLICIT)]  # fmt: skip
        self.conn.send_headers(1, head, end_stream=not empty_data)
        if empty_data:
            self.conn.send_data(1, b"", end_stream=True)
        self.sock.sendall(self.conn.data_to_send())

    def leave(self) -> None:
        if self.reset:
            self.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            self.sock.sendall(self.conn.data_to_send())
        else:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


_CLIENTS: dict[str, Callable[[int, str], _H1 | _H2]] = {
    "http/1.1 closed": lambda port, path: _H1(port, path),
    "h2 stream reset": lambda port, path: _H2(port, path, reset=True),
    "h2 connection closed": lambda port, path: _H2(port, path, reset=False),
    # Found by review: hypercorn relays the empty DATA frame as an empty body message that
    # is not the last, where the watcher stopped, and the conversion ran to its end.
    "h2 stream reset, ended by empty data": lambda port, path: _H2(
        port, path, reset=True, empty_data=True
    ),
}


async def _outcomes(dsn: str, sop: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT outcome FROM audit_log WHERE action = 'retrieve_instance'"
            " AND uids[1] LIKE '%/' || $1 ORDER BY seq",
            sop,
        )
    finally:
        await conn.close()
    return [int(r["outcome"]) for r in rows]


def _audited(dsn: str, sop: str, count: int) -> list[int]:
    """The audit outcomes of the retrieves of `sop`, once there are `count` (the audit trail
    is written in the background)."""
    import asyncio

    deadline = time.monotonic() + 10
    while len(got := asyncio.run(_outcomes(dsn, sop))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


@pytest.mark.parametrize("kind", list(_CLIENTS))
def test_a_conversion_stops_when_its_client_goes_before_the_answer(
    tmp_path: Path, clean_db: str, samples: Path, kind: str
) -> None:
    """A client asks for a large JPEG 2000 instance in Explicit VR Little Endian and goes
    while it is being converted, before the response starts: the conversion stops at its
    next frame, its scratch file removed and its turn given back, the server idle again; the
    request is audited and logged 499. It ran to its end (minutes for a large instance)."""
    ds = _large_instance(samples)
    with _serving(tmp_path, clean_db, ds) as server:
        client = _CLIENTS[kind](_port(server), _path(ds))
        try:
            _wait_for(lambda: sum(_scratch(tmp_path).values()) > 8 * 2**20, 60,
                      "the conversion did not begin")  # fmt: skip
            client.leave()
            left = time.monotonic()
            (written,) = _scratch(tmp_path).values()
            assert written < _CONVERTED_BYTES // 2, "converted whole before the client left"
            # Removed once the conversion's thread has returned, its turn given back.
            _wait_for(lambda: not _scratch(tmp_path), STOP_WITHIN_S,
                      f"the conversion went on after its client left ({kind})")  # fmt: skip
            stopped = time.monotonic() - left
            busy = _cpu_s(server)
            time.sleep(1.0)
            assert _cpu_s(server) - busy < 0.3, "the server still works for the client gone"
            print(f"{kind}: stopped {stopped:.2f} s after the client left, {written} bytes in")
        finally:
            client.close()
        log = server.log.read_text()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert _audited(clean_db, ds.SOPInstanceUID, 1) == [499]
    assert f'{_path(ds)} {"2" if kind.startswith("h2") else "1.1"}" 499 ' in log, log[-3000:]


def test_a_conversion_waiting_for_its_turn_never_begins_for_a_client_gone(
    tmp_path: Path, clean_db: str, samples: Path
) -> None:
    """With every turn (WADO_CONVERSIONS_AT_ONCE) taken by conversions under way, a third
    client asks for one and goes at once, over HTTP/1.1 and over HTTP/2: their conversions
    are dropped while they wait (their scratch files removed), the two under way going on,
    and once those are given up too nothing more is converted. They began once a turn came,
    each running to its end for nobody."""
    ds = _large_instance(samples)
    with _serving(tmp_path, clean_db, ds) as server, contextlib.ExitStack() as clients:
        port, path = _port(server), _path(ds)
        running = [_H1(port, path) for _ in range(WADO_CONVERSIONS_AT_ONCE)]
        for client in running:
            clients.callback(client.close)
        _wait_for(lambda: len([n for n in _scratch(tmp_path).values() if n]) == len(running),
                  60, "the conversions did not begin")  # fmt: skip
        under_way = set(_scratch(tmp_path))
        for kind in ("http/1.1 closed", "h2 stream reset"):
            waiting = _CLIENTS[kind](port, path)
            clients.callback(waiting.close)
            _wait_for(lambda: len(_scratch(tmp_path)) > len(under_way), 10,
                      "the request did not reach its conversion")  # fmt: skip
            (queued,) = set(_scratch(tmp_path)) - under_way
            assert _scratch(tmp_path)[queued] == 0  # waiting for its turn
            waiting.leave()
            _wait_for(functools.partial(_removed, tmp_path, queued), STOP_WITHIN_S,
                      "a conversion waiting for its turn stayed for a client gone")  # fmt: skip
        sizes = _scratch(tmp_path)
        assert set(sizes) == under_way, "the conversions under way stopped too"
        for client in running:
            client.leave()
        _wait_for(lambda: not _scratch(tmp_path), STOP_WITHIN_S, "conversions went on")
        busy = _cpu_s(server)
        time.sleep(1.5)  # a conversion for the clients gone would begin now, with its turn
        assert _cpu_s(server) - busy < 0.3, "a conversion began for a client gone"
        assert not _scratch(tmp_path)
        log = server.log.read_text()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert _audited(clean_db, ds.SOPInstanceUID, 4) == [499] * 4


async def _series_outcomes(dsn: str, series: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT outcome FROM audit_log WHERE action = 'retrieve_series'"
            " AND uids[1] LIKE '%/' || $1 ORDER BY seq",
            series,
        )
    finally:
        await conn.close()
    return [int(r["outcome"]) for r in rows]


@pytest.mark.parametrize("kind", ["http/1.1 closed", "h2 stream reset"])
def test_a_stream_left_while_a_later_instance_converts(
    tmp_path: Path, clean_db: str, samples: Path, kind: str
) -> None:
    """A series of two instances to convert: the first before the response starts, the
    second while the body streams, where Starlette's StreamingResponse listens for the
    disconnect itself (and cancels the body). The client goes during the second conversion:
    it stops, the stream ends as one cut by its client (audited 499 once), and nothing is
    logged as an error (no exception group, no traceback)."""
    import asyncio

    second = _large_instance(samples)
    first = _large_instance(samples)
    frames = generate_fragmented_frames(first.PixelData, number_of_frames=_FRAMES)
    first.PixelData, first.NumberOfFrames = encapsulate([b"".join(next(frames))]), 1
    first.InstanceNumber, second.InstanceNumber = 1, 2
    series = f"/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    with _serving(tmp_path, clean_db, first) as server:
        r = httpx.post(server.url + "/studies", content=multipart_body([to_bytes(second)]),
                       headers=stow_headers(), timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        # The audit trail outlives the tables truncated between tests; the series is the
        # sample's, retrieved by other tests too.
        before = len(asyncio.run(_series_outcomes(clean_db, first.SeriesInstanceUID)))
        client = _CLIENTS[kind](_port(server), series)
        try:
            client.sock.settimeout(0.05)
            began = time.monotonic()
            while sum(_scratch(tmp_path).values()) < 8 * 2**20:  # the second one converting
                assert time.monotonic() - began < 60, "the second conversion did not begin"
                with contextlib.suppress(TimeoutError):
                    assert client.sock.recv(1 << 20), "the response ended"
            client.leave()
            _wait_for(lambda: not _scratch(tmp_path), STOP_WITHIN_S,
                      f"the conversion went on after its client left ({kind})")  # fmt: skip
            time.sleep(0.5)
        finally:
            client.close()
        log = server.log.read_text()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    deadline = time.monotonic() + 10
    while len(asyncio.run(_series_outcomes(clean_db, first.SeriesInstanceUID))) == before:
        assert time.monotonic() < deadline, "not audited"
        time.sleep(0.1)
    time.sleep(0.5)
    assert asyncio.run(_series_outcomes(clean_db, first.SeriesInstanceUID))[before:] == [499]
