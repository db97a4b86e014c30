"""Review of the HTTP/2 repairs (httpd._H2Protocol): the count of a connection's running
handlers on paths that start none, the idle timer after a stalled stream is reset, and a
response the server cut short reset."""

from __future__ import annotations

import time
from pathlib import Path

import h2.errors
import h2.events
import h2.settings
import pydicom
import pytest

from dicomweb_server.httpd import H2_MAX_HANDLERS, KEEP_ALIVE_TIMEOUT_S
from tests.helpers import make_instance, to_bytes
from tests.test_http2_hostile import RETRIEVE, Client, _store
from tests.test_slow_clients import clean_log, port_of, serving

pytestmark = pytest.mark.db


def test_http2_connect_requests_refused_without_a_handler_do_not_count(
    tmp_path: Path, clean_db: str
) -> None:
    """CONNECT requests hypercorn answers itself (no WebSocket handshake: no handler
    started) are not counted as handlers at work: a connection that sent H2_MAX_HANDLERS
    of them still has its next request answered, not refused."""
    with serving(tmp_path, clean_db) as server:
        client = Client(port_of(server))
        with client.sock:
            for _ in range(H2_MAX_HANDLERS + 5):
                stream_id = client.conn.get_next_available_stream_id()
                head = [(":method", "CONNECT"), (":protocol", "websocket"), (":path", "/"),
                        (":scheme", "http"), (":authority", "127.0.0.1")]  # fmt: skip
                client.conn.send_headers(stream_id, head, end_stream=True)
                client.flush()
                client.events(0.02)
            stream = client.request("/dicom-web/studies")
            client.flush()
            events = client.events(3)
            assert None not in events, "the server closed the connection"
            refused = [e for e in events if isinstance(e, h2.events.StreamReset)
                       and e.stream_id == stream]  # fmt: skip
            assert refused == [], "the request was refused"
            (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)
                           and e.stream_id == stream]  # fmt: skip
            assert (b":status", b"204") in response.headers
        clean_log(server)


def test_http2_connection_whose_last_stream_stalled_is_closed_idle(
    tmp_path: Path, clean_db: str
) -> None:
    """A client that grants no window and then sends nothing: its download is reset after
    SEND_STALL_TIMEOUT_S and the connection, left with no stream, is closed after
    KEEP_ALIVE_TIMEOUT_S, as one whose client reset its streams is."""
    with serving(tmp_path, clean_db, DICOMWEB_SEND_STALL_TIMEOUT_S="1") as server:
        path = _store(server, to_bytes(make_instance(rows=1024, cols=1024)))
        client = Client(port_of(server), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        with client.sock:
            stream = client.request(path, RETRIEVE)
            client.flush()
            events = client.events(3)
            reset = [e for e in events if isinstance(e, h2.events.StreamReset)]
            assert [e.stream_id for e in reset] == [stream], events
            began = time.monotonic()
            events = client.events(KEEP_ALIVE_TIMEOUT_S + 5)
            assert events[-1:] == [None], "the connection is still open"
            assert time.monotonic() - began < KEEP_ALIVE_TIMEOUT_S + 1.5
        clean_log(server)


def test_http2_response_cut_by_a_lost_file_is_reset(tmp_path: Path, clean_db: str) -> None:
    """A study response whose second file is found lost once its body started can only be
    cut (blobstore.lost.LostBlobError, app._CatchAllMiddleware). Over HTTP/1.1 the server
    closes the connection; over HTTP/2 its stream is reset (RST_STREAM INTERNAL_ERROR, RFC
    9113 5.4.2), the connection kept for the client's other requests. Found by review: the
    stream was neither ended nor reset, and its client waited for the rest for as long as
    it kept the connection busy (a viewer loading other frames on it: for ever)."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    first, second = (make_instance(study=study, series=series, rows=1024, cols=1024,
                                   InstanceNumber=n) for n in (1, 2))  # fmt: skip
    with serving(tmp_path, clean_db) as server:
        _store(server, to_bytes(first))
        before = _blob_files(tmp_path / "data" / "blobs")
        _store(server, to_bytes(second))
        (lost,) = _blob_files(tmp_path / "data" / "blobs") - before
        lost.unlink()
        client = Client(port_of(server), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        with client.sock:
            client.conn.increment_flow_control_window(2**30)
            stream = client.request(f"/dicom-web/studies/{study}", _STUDY)
            client.flush()
            events: list[h2.events.Event | None] = []
            for _ in range(4):  # the client keeps the connection busy meanwhile
                events += client.events(1.5)
                client.request("/health", "*/*")
                client.flush()
            assert None not in events, "the server closed the connection"
            ours = [e for e in events if getattr(e, "stream_id", None) == stream]
            assert any(isinstance(e, h2.events.ResponseReceived) for e in ours)
            assert not any(isinstance(e, h2.events.StreamEnded) for e in ours)
            (reset,) = [e for e in ours if isinstance(e, h2.events.StreamReset)]
            assert reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            # The connection still serves: each /health answered.
            ended = [e for e in events if isinstance(e, h2.events.StreamEnded)]
            assert len(ended) >= 3
        assert "Traceback" not in server.log.read_text()


# A study retrieved as stored.
_STUDY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _blob_files(root: Path) -> set[Path]:
    """Placed blobs (spool files under tmp/ aside)."""
    return {p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "tmp"}
