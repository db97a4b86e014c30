"""A bare HTTP/1.1 responder that sends one file with sendfile(2): the reference for what any
server can send over loopback on this machine (`vs_orthanc.py`, large retrieve). It reads no
index, checks nothing and copies nothing in user space; whatever a real server adds, it does not.

    python -m benchmarks.sendfile_server FILE PORT

Prints "ready" once it listens on 127.0.0.1:PORT; answers every request with the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.liveserver import free_port


async def _serve(path: Path, port: int) -> None:
    size = path.stat().st_size
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % size
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            with path.open("rb") as fh:
                await asyncio.get_running_loop().sendfile(writer.transport, fh)
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def sendfile_server(path: Path) -> Iterator[str]:
    """The URL of a bare sendfile server for `path`, in its own process (not this one's GIL),
    stopped on exit. asyncio's own loop: uvloop has no sendfile."""
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


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1]), int(sys.argv[2])))
