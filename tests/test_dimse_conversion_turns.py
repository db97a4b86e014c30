"""Conversions for C-GET/C-MOVE peers (dimse.conversion.converted_for_peer): they take turns
a frame at a time, not an instance at a time; those under way hold a bounded number of
bytes between them; and the scratch file of one is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicomweb_server.dimse import conversion, sending
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.reservations import Reservations
from dicomweb_server.transcode import convert, pixelwrite
from dicomweb_server.transcode.codecs import TranscodeError
from tests.dimse_support import converted_whole
from tests.helpers import make_instance

_CT = "1.2.840.10008.5.1.4.1.1.2"


def _instance(path: Path, ts: str, frames: int, rows: int = 16) -> StoredInstance:
    """An instance of `frames` frames of rows x rows 16-bit pixels, stored in `ts`."""
    ds = make_instance(rows=rows, cols=rows, frames=frames)
    if ts == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian)
    return StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, _CT,
                          "0" * 32, ts, path.stat().st_size, frames, None, None, False,
                          rows=rows, columns=rows, samples_per_pixel=1,
                          bits_allocated=16)  # fmt: skip


class _SlowDecoder:
    """pydicom's decoder, each frame taking `delay` seconds more to decode, counted."""

    def __init__(self, real: Any, delay: float, decoded: list[str]) -> None:
        self.real, self.delay, self.decoded = real, delay, decoded

    def iter_array(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for item in self.real.iter_array(*args, **kwargs):
            time.sleep(self.delay)
            # Converted in a thread of its own, named after the one that asked.
            self.decoded.append(threading.current_thread().name.split("/")[0])
            yield item


def test_a_short_conversion_finishes_while_a_long_one_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second association's conversion of one frame finishes while a first one of 40
    slow frames is still going: the two take turns a frame at a time. One conversion at a
    time held the process for the whole instance (a 1 GiB JPEG 2000 one about 6 minutes)
    and the other waited past its SCU's 30 s DIMSE timeout."""
    decoded: list[str] = []
    real = convert.get_decoder  # type: ignore[attr-defined]
    monkeypatch.setattr(convert, "get_decoder",
                        lambda ts: _SlowDecoder(real(ts), 0.1, decoded))  # fmt: skip
    long = _instance(tmp_path / "long.dcm", RLELossless, 40)
    short = _instance(tmp_path / "short.dcm", RLELossless, 1)
    scratch = tmp_path / "scratch"
    made: dict[str, sending.StoredFile] = {}

    def convert_long() -> None:
        made["long"] = converted_whole(long, tmp_path / "long.dcm", ExplicitVRLittleEndian, scratch)

    first = threading.Thread(target=convert_long, name="long")
    first.start()
    try:
        deadline = time.monotonic() + 30
        while "long" not in decoded and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "long" in decoded
        sent = converted_whole(short, tmp_path / "short.dcm", ExplicitVRLittleEndian, scratch)
        assert first.is_alive(), "the short conversion waited for the whole long one"
        assert decoded.count("long") < 40
        assert (
            pydicom.dcmread(sent.stored_path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        )
        sending.remove_scratch(sent)
    finally:
        first.join(60)
    assert pydicom.dcmread(made["long"].stored_path).NumberOfFrames == 40
    sending.remove_scratch(made["long"])
    assert list(scratch.iterdir()) == []


class _Holder:
    """A thread holding a reservation of `size` bytes until told to leave."""

    def __init__(self, reserved: Any, size: int) -> None:
        self.got, self.leave = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(reserved, size))
        self.thread.start()

    def _hold(self, reserved: Any, size: int) -> None:
        with reserved.reserve(size):
            self.got.set()
            self.leave.wait(30)

    def end(self) -> None:
        self.leave.set()
        self.thread.join(10)


def test_conversions_under_way_hold_at_most_the_bytes_reserved() -> None:
    """Reservations of decoded_at_once bytes run together up to DIMSE_CONVERTING_MAX_BYTES
    between them, at its edge; one byte more waits until another ends; one alone larger than
    it waits only for those before it (it ran before, alone)."""
    assert conversion.DIMSE_CONVERTING_MAX_BYTES >= conversion.DIMSE_DECODE_MAX_BYTES
    reserved = Reservations(100)
    a = _Holder(reserved, 60)
    assert a.got.wait(10)
    b = _Holder(reserved, 40)  # 100: at the edge
    assert b.got.wait(10)
    c = _Holder(reserved, 1)  # 101
    assert not c.got.wait(0.3)
    a.end()
    assert c.got.wait(10)
    large = _Holder(reserved, 500)
    assert not large.got.wait(0.3)
    b.end()
    assert not large.got.wait(0.3)
    c.end()
    assert large.got.wait(10)
    large.end()
    assert reserved.held == 0


@pytest.mark.parametrize(
    ("stored", "target"),
    [(RLELossless, ExplicitVRLittleEndian), (ExplicitVRLittleEndian, ImplicitVRLittleEndian)],
)
def test_the_scratch_file_of_a_conversion_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str, target: str
) -> None:
    """DIMSE_CONVERTED_MAX_BYTES bounds the scratch file of one conversion, at its edge: a
    file of that many bytes is made, one byte fewer fails the sub-operation (a
    TranscodeError) and leaves no scratch file. Decoded frames and copied chunks alike."""
    src = tmp_path / "src.dcm"
    inst = _instance(src, stored, 4, rows=64)
    scratch = tmp_path / "scratch"
    sent = converted_whole(inst, src, target, scratch)
    size = sent.stored_path.stat().st_size
    whole = sent.stored_path.read_bytes()
    sending.remove_scratch(sent)
    monkeypatch.setattr(conversion, "DIMSE_CONVERTED_MAX_BYTES", size)
    sent = converted_whole(inst, src, target, scratch)
    assert sent.stored_path.read_bytes() == whole
    sending.remove_scratch(sent)
    monkeypatch.setattr(conversion, "DIMSE_CONVERTED_MAX_BYTES", size - 1)
    with pytest.raises(TranscodeError, match=f"more than {size - 1} bytes"):
        converted_whole(inst, src, target, scratch)
    assert list(scratch.iterdir()) == []


def test_uncompressed_pixel_data_past_its_length_fails_before_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATIVE_PIXEL_MAX_BYTES (a 32-bit length) is checked as each frame is written, at its
    edge: Pixel Data of that many bytes is written, one byte fewer fails before the frame
    that passes it is written (10,000 frames of 8 MB would have gone on to 80 GB first)."""
    src = tmp_path / "src.dcm"
    _instance(src, RLELossless, 4, rows=64)
    frame = 64 * 64 * 2
    monkeypatch.setattr(pixelwrite, "NATIVE_PIXEL_MAX_BYTES", 4 * frame)
    convert.to_transfer_syntax(src, tmp_path / "ok.dcm", ExplicitVRLittleEndian)
    assert len(pydicom.dcmread(tmp_path / "ok.dcm").PixelData) == 4 * frame
    monkeypatch.setattr(pixelwrite, "NATIVE_PIXEL_MAX_BYTES", 4 * frame - 1)
    written: list[int] = []
    real = pixelwrite.write_native

    def watched(out: Any, *args: Any, **kwargs: Any) -> None:
        try:
            real(out, *args, **kwargs)
        finally:
            written.append(out.tell())

    monkeypatch.setattr(convert, "write_native", watched)
    with pytest.raises(TranscodeError, match=f"more than {4 * frame - 1} bytes"):
        convert.to_transfer_syntax(src, tmp_path / "over.dcm", ExplicitVRLittleEndian)
    header = (tmp_path / "ok.dcm").stat().st_size - 4 * frame
    assert written == [header + 3 * frame]  # the fourth frame not written
