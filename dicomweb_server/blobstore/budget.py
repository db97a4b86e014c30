"""The memory of the chunks downloads hold, bounded over a process: DownloadBudget sizes each
chunk a download reads (reading.stream_path) from how many downloads are in flight and how
many of their bytes are held, so that their chunks never hold more than
DOWNLOAD_BUFFER_BUDGET_BYTES plus DOWNLOAD_CHUNK_MIN_BYTES per download, and no download
ever waits for another's memory. Bodies read or built whole (small instances read in one
call, responses up to routes.responses.INLINE_RESPONSE_BYTES) are held within it too, or
streamed when it has no room for them (hold)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DOWNLOADS",
    "DOWNLOAD_BUFFER_BUDGET_BYTES",
    "DOWNLOAD_CHUNK_MIN_BYTES",
    "DownloadBudget",
]

# Bytes the chunks of all the downloads of a process may hold between them (being read, read
# ahead, or handed to the server to send), beyond DOWNLOAD_CHUNK_MIN_BYTES each. A client
# that stops reading keeps its chunk until SEND_STALL_TIMEOUT_S drops it: chunks of
# READ_CHUNK_MAX_BYTES (4 MiB) made 200 stalled HTTP/1.1 downloads hold about 1 GB, and an
# HTTP/2 connection has 100 streams (docs/benchmarks.md, "Memory: stalled downloads").
# A fast download holds up to 16 MiB: the chunk being sent and the one being read (4 MiB
# each, the sizes that make it fast: docs/benchmarks.md, 2026-12-03d) and READ_AHEAD_BYTES
# (8 MiB) read ahead. 256 MiB lets 16 of them go at once at full speed, or 64 stalled ones
# keep 4 MiB chunks, and is four times the read-ahead all downloads share
# (reading.READ_AHEAD_TOTAL_BYTES), so chunks being sent have room when it is full.
DOWNLOAD_BUFFER_BUDGET_BYTES = 256 * 1024 * 1024
# The least a download reads at a time, whatever the budget: it always moves (a chunk it asks
# for is read at once, never waited for). The size of a transport's high-water mark
# (httpd.TRANSPORT_HIGH_WATER_BYTES) and of an HTTP/2 stream's initial window: a smaller
# chunk would not fill one write. Chunk sizes are multiples of it.
DOWNLOAD_CHUNK_MIN_BYTES = 64 * 1024


@dataclass
class DownloadBudget:
    """Downloads in flight and the bytes their chunks hold, and the size of the next chunk.

    A chunk read ahead (no sender waiting for it) is at most the download's share (the budget
    split among the downloads in flight) and is read only when it keeps `held` within
    `limit`. A chunk a sender waits for is at most the share and what the budget has left,
    but at least `least`: so `held` minus at most `least` per download (the one chunk each
    may have asked for past the budget, held until its sender asks again) never passes
    `limit`. A chunk counts from the moment its read starts until its sender asks for the
    next one (the layers that pass chunks on let go of one before asking for the next) or
    the download ends."""

    limit: int = DOWNLOAD_BUFFER_BUDGET_BYTES
    least: int = DOWNLOAD_CHUNK_MIN_BYTES
    active: int = 0  # downloads in flight (reading.stream_path generators begun, not ended)
    held: int = 0  # bytes of their chunks

    def share(self) -> int:
        """The largest chunk one download may read now: the budget over the downloads in
        flight, a multiple of `least`, at least `least`."""
        return max(self.least, self.limit // max(self.active, 1) // self.least * self.least)

    def ahead(self, want: int) -> int:
        """Bytes of a chunk to read ahead of its sender: `want` up to the share; 0 (none)
        when that would pass the budget."""
        n = min(want, self.share())
        return n if self.held + n <= self.limit else 0

    def asked(self, want: int) -> int:
        """Bytes of a chunk a sender waits for: `want` up to the share and what the budget
        has left, never less than `least` (or `want` when that is less)."""
        room = (self.limit - self.held) // self.least * self.least
        return min(want, max(self.least, min(self.share(), room)))

    def hold(self, n: int) -> bool:
        """Count `n` bytes of a body held whole (read in one piece, or built whole before it
        is sent) if they fit in the budget; False, nothing counted, if not: the body is then
        streamed in chunks the budget sizes instead."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        """`n` bytes held (hold) no longer are."""
        self.held -= n


# The process's downloads: one budget for all its event loops' streams (a serving process
# has one loop; the counts are only touched from it).
DOWNLOADS = DownloadBudget()
