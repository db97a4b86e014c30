"""A bare HTTP/1.1 responder that sends one file with sendfile(2): the reference for what a
server with no user-space copy sends over loopback on this machine (`vs_orthanc.py`, large
retrieve). It reads no index, checks nothing and copies nothing in user space. It is not a
ceiling: at 201 MB our server, which reads ahead in threads while it sends, has matched or
beaten it (docs/benchmarks.md, 2026-12-03d).

    python -m benchmarks.sendfile_server FILE PORT

Prints "ready" once it listens on 127.0.0.1:PORT; answers every request with the file.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.liveserver import free_port


def _serve(path: Path, port: int) -> None:
    """One connection at a time, blocking: read the request head, send the response head,
    then the file with socket.sendfile (os.sendfile until done: no event loop, no copy)."""
    size = path.stat().st_size
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size
    )
    listener = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, path.open("rb") as fh, contextlib.suppress(OSError):  # a client gone
            request = b""
            while b"\r\n\r\n" not in request and (data := conn.recv(65536)):
                request += data
            conn.sendall(head)
            conn.sendfile(fh)


@contextlib.contextmanager
def sendfile_server(path: Path) -> Iterator[str]:
    """The URL of a bare sendfile server for `path`, in its own process (not this one's GIL),
    stopped on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.sendfile_server", str(path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
