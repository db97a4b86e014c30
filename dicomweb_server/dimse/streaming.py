"""A converted instance sent to a C-GET/C-MOVE peer while it is being converted: the
conversion writes its scratch file in a thread of its own (conversion.converted_for_peer),
and the association's thread sends what is written, a PDU at a time, as soon as the header
is (sending.py). A 1 GiB JPEG 2000 instance took 6 minutes to convert before its C-STORE
began, past the 30 s DIMSE timeout of a typical SCU.

pynetdicom cannot send such a file itself: given a path, it takes the file's size when it
begins (DIMSEMessage.encode_msg seeks to its end, counts the fragments, then reads that many),
so a file still growing would go cut short. The archive's sender knows only where the
written bytes end (Growing.end) and whether the conversion is over: the last P-DATA
fragment is flagged last (PS3.8 E.2), no length is needed before.

A byte once sent cannot be taken back: the conversion may fill in a value it wrote before
(the length of the Pixel Data, pixelwrite.write_native, which writes the same value first
where it can) only with the bytes already sent (Growing.write compares them), else it
fails. A conversion failing once the C-STORE request has gone cannot be told to the peer
other than by aborting the association (PS3.7 has no way to end a data set short or take a
message back): the peer must not store a data set cut short as a success. It is failed
cleanly, nothing sent, while the command has not gone (the first frame is decoded before
the header is written, so a decoder that cannot read the data fails there)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dicomweb_server.transcode.convert import Step

__all__ = ["Cancelled", "Growing", "StreamFailed"]

# Seconds between two looks at whether the peer still takes PDUs, while the sender waits for
# the conversion to write more.
_WAIT_POLL_S = 0.1
# The File Meta Information's group length is the value at bytes 140 to 144 of a Part-10
# file (128 bytes of preamble, "DICM", then (0002,0000) UL of 4 bytes, PS3.10 7.1).
_META_LENGTH_AT = 140


class Cancelled(Exception):
    """The conversion is no longer wanted (its sub-operation given up, the peer gone)."""


class StreamFailed(Exception):
    """The conversion of an instance being sent failed, or its bytes could not be read."""


class Growing:
    """The scratch file of one conversion for a peer as it is written: the conversion's
    Watch (pixelwrite.Watch), and the sender's reading of it (fragments)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self.end = 0  # bytes written to the file
        self.sent = 0  # bytes the sender has read to send (it reads nothing before)
        self.done = False  # the conversion is over (error None: the file is whole)
        self.error: BaseException | None = None
        self.started = False  # handed to the sender: the conversion may not begin again
        self.cancelled = False

    @classmethod
    def whole(cls, path: Path) -> Growing:
        """A file already whole (an instance sent as stored), to be sent as a growing one is:
        in fragments of a bounded size, whatever the peer's maximum PDU length."""
        made = cls(path)
        made.end = path.stat().st_size
        made.done = made.started = True
        return made

    # The conversion's side (pixelwrite.Watch), in its thread.

    def opening(self) -> None:
        with self._cond:
            self._check_cancelled()
            if self.started:  # decoded() retrying another decoder: the file begins again
                raise ValueError("its decoder failed once the converted file was being sent")
            self.end = 0

    def write(self, position: int, data: memoryview, write: Callable[[memoryview], int]) -> int:
        """New bytes written as they come; bytes written again (a value filled in) while
        the sender does not read, and only as they were where it has read them."""
        with self._cond:
            self._check_cancelled()
            again = position < self.end
            if again:
                upto = min(position + data.nbytes, self.sent)
                sent = self._read(position, upto - position) if upto > position else b""
                if sent != data[: len(sent)]:
                    raise ValueError(f"bytes {position} to {upto} changed after they were sent")
                written = write(data)
        if not again:  # past the end: the sender reads nothing there
            written = write(data)
        with self._cond:
            self.end = max(self.end, position + written)
            self._cond.notify_all()
        return written

    def _read(self, position: int, count: int) -> bytes:
        with open(self.path, "rb", buffering=0) as f:
            return os.pread(f.fileno(), count, position)

    def stepping(self, step: Step) -> Step:
        """`step` (a turn to decode a frame), the conversion stopped before it once
        cancelled: a sender gone does not leave it decoding the rest."""

        @contextlib.contextmanager
        def stepped() -> Iterator[None]:
            with self._cond:
                self._check_cancelled()
            with step():
                yield

        return stepped

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.done, self.error = True, error
            self._cond.notify_all()

    def _check_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("the converted instance is no longer to be sent")

    # The sender's side, in the association's thread.

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def wait_header(self) -> None:
        """Until the file holds its File Meta Information and the start of the data set
        (pynetdicom's split_dataset reads them to choose the context), or the conversion is
        over; its error raised if it failed. The file is the sender's from here on."""
        with self._cond:
            self._cond.wait_for(lambda: self.done or self._header_written())
            if self.error is not None:
                raise self.error
            self.started = True

    def wait_done(self, timeout: float | None = None) -> bool:
        """Until the conversion is over (False: `timeout` passed first); its error raised if
        it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                return False
            if self.error is not None:
                raise self.error
            return True

    def _header_written(self) -> bool:
        if self.end < _META_LENGTH_AT + 4:
            return False
        try:
            value = self._read(_META_LENGTH_AT, 4)
        except FileNotFoundError:  # removed as the conversion failed: told next
            return False
        # The data set begins after the group; its first element's tag, VR and length too.
        return self.end >= _META_LENGTH_AT + 4 + int.from_bytes(value, "little") + 8

    def failure(self) -> BaseException | None:
        """The conversion's error, once it has failed."""
        with self._cond:
            return self.error

    def _more(self, position: int, size: int) -> bool:
        return self.done or self.cancelled or self.end - position > size

    def fragments(
        self, offset: int, size: int, taking: Callable[[], bool]
    ) -> Iterator[tuple[bytes, bool]]:
        """The data set, from `offset` in the file, in fragments of `size` bytes as they are
        written, each with whether it is the last (the conversion over, nothing after it);
        none more once `taking()` is False (the peer gone). StreamFailed: the conversion
        failed (or was cancelled) before its end."""
        position = offset
        with open(self.path, "rb", buffering=0) as f:
            while taking():
                with self._cond:
                    self._cond.wait_for(functools.partial(self._more, position, size), _WAIT_POLL_S)
                    if self.error is not None or self.cancelled:
                        raise StreamFailed(str(self.error or "cancelled"))
                    if not self.done and self.end - position <= size:
                        continue  # the peer looked at again
                    last = self.done and self.end - position <= size
                    count = self.end - position if last else size
                    self.sent = position + count  # write compares what is written again
                    data = os.pread(f.fileno(), count, position)  # not while it is
                if len(data) != count:
                    raise StreamFailed(f"{count - len(data)} bytes short at {position}")
                yield data, last
                if last:
                    return
                position += count
