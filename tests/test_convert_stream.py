"""Whole instances converted to another transfer syntax (WADO-RS instance retrieve) are written
as they are made, a frame at a time: the same bytes as the conversion in memory, in a fraction
of the memory. And no decode makes more than DECODE_MAX_BYTES, whatever the file claims."""

from __future__ import annotations

import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from dicomweb_server.transcode import convert, pixelwrite
from dicomweb_server.transcode.codecs import ENCODERS, PixelInfo, TranscodeError
from dicomweb_server.transcode.convert import (
    CONVERT_COPY_BYTES,
    converted_dataset,
    one_bit_pixel_data,
    to_transfer_syntax,
)
from dicomweb_server.transcode.frames import DECODE_MAX_BYTES, _check_decoded_size, decode_frames
from tests.helpers import (
    ROOT,
    float_map,
    inst_url,
    multipart_body,
    split_multipart,
    stow_headers,
)

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# One sample of each kind the conversion treats apart, with its stored syntax: native little
# endian (implicit VR), big endian (16-bit, 8-bit OW words, odd length, palette, multi-frame
# RGB), and compressed (JPEG-LS, JPEG 2000, RLE, JPEG Baseline in YBR_FULL_422, multi-frame).
SAMPLES = {
    "real/pydicom/MR_small_implicit.dcm": ImplicitVRLittleEndian,
    "real/pydicom/SC_rgb_jpeg_dcmd.dcm": ImplicitVRLittleEndian,
    "generated/coverage/cr_mono1_explicit_be.dcm": ExplicitVRBigEndian,
    "real/pydicom/SC_rgb_small_odd_big_endian.dcm": ExplicitVRBigEndian,
    "real/pydicom-data/OBXXXX1A_expb_2frame.dcm": ExplicitVRBigEndian,
    "real/pydicom-data/SC_rgb_expb_16bit_2frame.dcm": ExplicitVRBigEndian,
    "generated/coverage/ect_15frames_jpegls_lossless.dcm": JPEGLSLossless,
    "generated/coverage/ct_j2k_lossless_signed.dcm": "1.2.840.10008.1.2.4.90",
    "generated/coverage/mr_jpegls_near_lossless.dcm": "1.2.840.10008.1.2.4.81",
    "real/pydicom/SC_rgb_rle_2frame.dcm": RLELossless,
    "real/pydicom/SC_rgb_dcmtk_+eb+cy+n2.dcm": JPEG_BASELINE,
    "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm": JPEG_BASELINE,
}
# Each sample to each target but its own syntax (sent as stored, never converted).
CONVERSIONS = [
    (name, target)
    for name, stored in SAMPLES.items()
    for target in (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless)
    if target != stored
]


def _in_memory(src: Path, dst: Path, target: str) -> None:
    """The conversion as it was made before it was streamed: the whole data set in memory."""
    converted_dataset(src, target).save_as(
        dst, implicit_vr=False, little_endian=True, enforce_file_format=True
    )


def _streamed(src: Path, dst: Path, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """to_transfer_syntax with the in-memory conversion out of reach, so that the streamed
    one is what is measured."""

    def refused(*_: object) -> Dataset:
        raise AssertionError("converted in memory")

    with monkeypatch.context() as m:
        m.setattr(convert, "converted_dataset", refused)
        to_transfer_syntax(src, dst, target)


@pytest.mark.parametrize(("name", "target"), CONVERSIONS)
def test_streamed_conversion_is_the_in_memory_one(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: str
) -> None:
    src = samples / name
    assert (
        pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID == (SAMPLES[name])
    )
    try:
        _in_memory(src, tmp_path / "whole.dcm", target)
    except TranscodeError:  # pixels the codec does not take (odd sizes for JPEG-LS, say)
        with pytest.raises(TranscodeError):
            _streamed(src, tmp_path / "streamed.dcm", target, monkeypatch)
        return
    _streamed(src, tmp_path / "streamed.dcm", target, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()


@pytest.mark.parametrize("name", [n for n, ts in SAMPLES.items() if ts != ImplicitVRLittleEndian])
def test_streamed_to_implicit_vr_is_the_in_memory_one(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Implicit VR Little Endian, for a DIMSE peer that accepted only that for an instance
    converted for it (dimse.conversion.target_syntax): the Explicit VR Little Endian
    conversion written without VRs, streamed as well."""
    src = samples / name
    ds = converted_dataset(src, ExplicitVRLittleEndian)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "whole.dcm", implicit_vr=True, little_endian=True,
               enforce_file_format=True)  # fmt: skip
    _streamed(src, tmp_path / "streamed.dcm", ImplicitVRLittleEndian, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, pydicom.dcmread(src).pixel_array)


@pytest.mark.parametrize("target", [HTJ2K_LOSSLESS, JPEG_BASELINE])
def test_streamed_to_htj2k_and_jpeg_baseline(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    src = samples / "real/pydicom-data/SC_rgb_expb_2frame.dcm"
    _in_memory(src, tmp_path / "whole.dcm", target)
    _streamed(src, tmp_path / "streamed.dcm", target, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()


@pytest.mark.parametrize(
    "name", ["real/pydicom/MR_small_implicit.dcm", "real/pydicom/MR_small_bigendian.dcm"]
)
def test_elements_after_the_pixel_data_follow_it(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Data Set Trailing Padding (FFFC,FFFC) and a private element after the Pixel Data are
    written after it, re-encoded as the rest of the data set."""
    ds = pydicom.dcmread(samples / name)
    ds.add_new(0x7FE10010, "LO", "CREATOR")
    ds.add_new(0x7FE11001, "US", [1, 513])
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)
    src = tmp_path / "trailing.dcm"
    ds.save_as(src)  # in its own transfer syntax
    _in_memory(src, tmp_path / "whole.dcm", ExplicitVRLittleEndian)
    _streamed(src, tmp_path / "streamed.dcm", ExplicitVRLittleEndian, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    assert list(got.keys())[-3:] == [0x7FE10010, 0x7FE11001, 0xFFFCFFFC]
    # Implicit VR: an unknown private element is UN (its bytes); big endian: its numbers.
    assert got[0x7FE11001].value in ([1, 513], b"\x01\x00\x01\x02")
    assert np.array_equal(got.pixel_array, pydicom.dcmread(src).pixel_array)


def test_big_endian_bytes_past_the_pixels_are_swapped_both_ways(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big endian Pixel Data longer than its pixels: its words swapped whole, in memory (DIMSE)
    as streamed (WADO-RS); the in-memory conversion decoded the pixels and dropped the rest."""
    ds = pydicom.dcmread(samples / "real/pydicom/MR_small_bigendian.dcm")
    pixels = ds.pixel_array
    ds.PixelData = bytes(ds.PixelData) + b"\x12\x34\x56\x78"
    src = tmp_path / "longer.dcm"
    ds.save_as(src)
    _in_memory(src, tmp_path / "whole.dcm", ExplicitVRLittleEndian)
    _streamed(src, tmp_path / "streamed.dcm", ExplicitVRLittleEndian, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    assert bytes(got.PixelData)[-4:] == b"\x34\x12\x78\x56"
    assert np.array_equal(got.pixel_array, pixels)


def _multiframe(path: Path, syntax: str, frames: int, rows: int, columns: int) -> None:
    """A 16-bit monochrome instance of `frames` gradient frames in `syntax`."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ramp = (np.arange(rows * columns, dtype=np.uint32) % 4096).astype("<u2")
    pixels = np.stack([np.roll(ramp, k).reshape(rows, columns) for k in range(frames)])
    ds.PixelData = pixels.tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if syntax == ImplicitVRLittleEndian:
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, JPEGLSLossless])
def test_memory_holds_a_frame_not_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str
) -> None:
    """32 frames of 1024 x 1024 16-bit pixels (64 MiB decoded) to Explicit VR Little Endian:
    the conversion's peak allocation stays within a few frames (2 MiB each), where the
    conversion in memory held the instance, and again its copy."""
    src = tmp_path / "big.dcm"
    _multiframe(src, syntax, 32, 1024, 1024)
    frame = 1024 * 1024 * 2
    # A frame decoded, its bytes, the decoder's own buffers; copy buffers for native data.
    bound = 8 * max(frame, CONVERT_COPY_BYTES)
    tracemalloc.start()
    try:
        _streamed(src, tmp_path / "streamed.dcm", ExplicitVRLittleEndian, monkeypatch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bound, f"peak {peak} bytes"
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, pydicom.dcmread(src).pixel_array)
    # The bound above would not have held for the conversion in memory.
    tracemalloc.start()
    try:
        _in_memory(src, tmp_path / "whole.dcm", ExplicitVRLittleEndian)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole_peak > 32 * frame


def test_the_first_decoded_frame_is_let_go_of_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compressed to native, each decoded frame is released once written, the first too: an
    itertools.chain of it before the rest held it to the end of the conversion (a frame
    more of memory for every conversion, up to the decode bound)."""
    src = tmp_path / "jls.dcm"
    _multiframe(src, JPEGLSLossless, 5, 64, 64)
    refs: list[weakref.ref[np.ndarray]] = []
    first_alive: list[bool] = []  # as each frame after the second comes to be written
    real = pixelwrite.as_bytes

    def watched(arrays: Iterator[np.ndarray]) -> Iterator[bytes | memoryview]:
        def each() -> Iterator[np.ndarray]:
            for arr in arrays:
                if len(refs) >= 2:  # the one before may still be being written
                    first_alive.append(refs[0]() is not None)
                refs.append(weakref.ref(arr))
                yield arr

        return real(each())

    monkeypatch.setattr(convert, "as_bytes", watched)
    _streamed(src, tmp_path / "out.dcm", ExplicitVRLittleEndian, monkeypatch)
    assert len(refs) == 5 and first_alive == [False] * 3
    got = pydicom.dcmread(tmp_path / "out.dcm")
    assert np.array_equal(got.pixel_array, pydicom.dcmread(src).pixel_array)


def test_a_short_pixel_data_is_refused_not_padded(tmp_path: Path) -> None:
    """Native Pixel Data whose file ends before its stated length: a TranscodeError (406 with
    a reason), and no half-made file is taken for the instance."""
    src = tmp_path / "short.dcm"
    _multiframe(src, ImplicitVRLittleEndian, 4, 64, 64)
    data = src.read_bytes()
    src.write_bytes(data[:-100])
    with pytest.raises(TranscodeError):
        to_transfer_syntax(src, tmp_path / "out.dcm", ExplicitVRLittleEndian)


def test_decode_size_bound_at_its_edge() -> None:
    side = int(DECODE_MAX_BYTES**0.5)
    assert side * side == DECODE_MAX_BYTES
    _check_decoded_size(side, side, 1, 8, 1)  # exactly the bound: decoded
    with pytest.raises(ValueError, match="at most"):
        _check_decoded_size(side, side + 1, 1, 8, 1)
    with pytest.raises(ValueError, match="at most"):  # 1-bit pixels decode to a byte each
        _check_decoded_size(side, side, 1, 1, 2)


def _claiming(src: Path, dst: Path, rows: int, columns: int) -> Path:
    """`src` with Rows and Columns rewritten: its Pixel Data as small as it was."""
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(dst)
    return dst


@pytest.mark.parametrize(
    "name",
    ["real/pydicom/MR_small_RLE.dcm", "generated/coverage/ect_15frames_jpegls_lossless.dcm"],
)
def test_a_small_file_claiming_huge_frames_is_not_decoded(
    samples: Path, tmp_path: Path, name: str
) -> None:
    """RLE frames are decoded into a buffer sized by Rows x Columns before the codestream is
    read: 40000 x 40000 16-bit pixels (3.2 GB) from a file of kilobytes. Refused, 406 with
    its reason, before anything is allocated."""
    src = _claiming(samples / name, tmp_path / "huge.dcm", 40000, 40000)
    tracemalloc.start()
    try:
        with pytest.raises(TranscodeError, match="at most"):
            decode_frames(src, [1])
        with pytest.raises(TranscodeError, match="at most"):
            to_transfer_syntax(src, tmp_path / "out.dcm", ExplicitVRLittleEndian)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024


def test_one_bit_pixel_data_decoded_whole_is_bounded(samples: Path, tmp_path: Path) -> None:
    """1-bit Pixel Data stored compressed is decoded whole (its frames share bytes): a byte
    per pixel, so 40000 x 40000 is refused."""
    name = next(
        r.split("\t")[0]
        for r in (samples / "MANIFEST.tsv").read_text().splitlines()[1:]
        if r.split("\t")[11] == "1" and r.split("\t")[6] == RLELossless
    )
    src = _claiming(samples / name, tmp_path / "huge.dcm", 40000, 40000)
    with pytest.raises(TranscodeError, match="at most"):
        one_bit_pixel_data(src)


async def test_a_converted_part_closed_unread_removes_its_scratch_file(tmp_path: Path) -> None:
    """A part's body closed before its first chunk (a response cut after the part's headers,
    a range that skips the part) removes the scratch file all the same; read to its end, too."""
    from dicomweb_server.retrieve.instances import _StreamAndRemove

    unread, read = tmp_path / "unread.dcm", tmp_path / "read.dcm"
    unread.write_bytes(b"x" * 10)
    read.write_bytes(b"y" * 10)
    await _StreamAndRemove(unread).aclose()
    assert not unread.exists()
    assert b"".join([c async for c in _StreamAndRemove(read)]) == b"y" * 10
    assert not read.exists()


@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, JPEGLSLossless])
def test_the_stored_extended_offset_table_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """An Extended Offset Table (PS3.3 C.7.6.3.1.8) gives the stored fragments' offsets: kept
    in a converted instance, it described fragments that are no longer there, and pydicom,
    which reads frames by it, could not decode the JPEG-LS made (native Pixel Data may not
    have one at all)."""
    from pydicom.encaps import encapsulate_extended

    src = tmp_path / "eot.dcm"
    _multiframe(src, ImplicitVRLittleEndian, 3, 16, 16)
    ds = pydicom.dcmread(src)
    expected = ds.pixel_array
    info = PixelInfo.of(ds)
    encode = ENCODERS[RLELossless].encode
    assert encode is not None
    ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
        [encode(frame, info) for frame in expected]
    )
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(src, implicit_vr=False, little_endian=True, enforce_file_format=True)
    _in_memory(src, tmp_path / "whole.dcm", target)
    _streamed(src, tmp_path / "streamed.dcm", target, monkeypatch)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    assert "ExtendedOffsetTable" not in got and "ExtendedOffsetTableLengths" not in got
    assert np.array_equal(got.pixel_array, expected)


def test_native_pixel_data_of_undefined_length_is_refused_with_its_reason(
    tmp_path: Path,
) -> None:
    """Implicit VR Pixel Data of undefined length (items and a delimiter, as if encapsulated):
    a 406 saying so; it said the Pixel Data ended 4294966767 bytes early."""
    import struct

    src = tmp_path / "undefined.dcm"
    _multiframe(src, ImplicitVRLittleEndian, 1, 16, 16)
    raw = src.read_bytes()
    at = raw.rfind(struct.pack("<HHI", 0x7FE0, 0x0010, 16 * 16 * 2))
    value = raw[at + 8 :]
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(value)) + value
    src.write_bytes(
        raw[:at]
        + struct.pack("<HHI", 0x7FE0, 0x0010, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    with pytest.raises(TranscodeError, match="undefined length"):
        to_transfer_syntax(src, tmp_path / "out.dcm", ExplicitVRLittleEndian)


def _implicit_body(ds: Dataset, transfer_syntax_uid: str, path: Path) -> None:
    """`ds` written in Implicit VR Little Endian under File Meta Information naming
    `transfer_syntax_uid` (an explicit VR syntax): pydicom reads such a file as it finds it,
    its elements without VRs, while saying the data set is explicit VR."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax_uid)
    with path.open("wb") as f:
        fp = DicomFileLike(f)
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)


@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, JPEGLSLossless])
def test_a_data_set_read_as_implicit_vr_under_an_explicit_syntax_converts(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    """pydicom's SC_rgb_jpeg.dcm says JPEG Baseline (explicit VR) and holds an implicit VR
    data set; its frames decoded, its conversions were a 406 ("With tag (0008,0008) got
    exception: encoding without a string argument" and pydicom's traceback): the writer
    copied its elements as read, with no VR to write. Found by differential testing against
    dcmtk. Here too a nested sequence and values long enough to be left deferred."""
    from tests.helpers import make_instance

    ds = make_instance(rows=16, cols=16)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "121322", "Source image"
    ds.DerivationCodeSequence = [item]
    ds.TextValue = "c" * (100 * 1024)  # UT, longer than the conversion's defer size
    ds.compress(RLELossless)
    expected = ds.pixel_array
    src = tmp_path / "implicit_body.dcm"
    _implicit_body(ds, RLELossless, src)
    for path in (src, samples / "real/pydicom/SC_rgb_jpeg.dcm"):
        _in_memory(path, tmp_path / "whole.dcm", target)
        _streamed(path, tmp_path / "streamed.dcm", target, monkeypatch)
        assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
        got = pydicom.dcmread(tmp_path / "streamed.dcm")
        assert got["ImageType"].VR == "CS" and got.ImageType[0] == "DERIVED", path
        assert np.array_equal(got.pixel_array, pydicom.dcmread(path).pixel_array), path
        if path == src:
            assert np.array_equal(got.pixel_array, expected)
            assert got.DerivationCodeSequence[0]["CodeMeaning"].VR == "LO"
            assert got["TextValue"].VR == "UT" and got.TextValue == ds.TextValue


def test_a_failure_reason_sent_leaves_out_pydicoms_traceback() -> None:
    """pydicom's writer re-raises a failing element with its tag and the formatted traceback
    (tag_in_exception); the 406 of such a conversion carried that traceback, the server's
    file paths with it, in its body (seen converting SC_rgb_jpeg.dcm before the fix above)."""
    from pydicom.tag import Tag, tag_in_exception

    from dicomweb_server.transcode.frames import cannot

    with pytest.raises(TypeError) as raised, tag_in_exception(Tag(0x00080008)):
        raise TypeError("encoding without a string argument")
    assert "Traceback" in str(raised.value)  # pydicom's form, as the writer raises it
    message = cannot(None, "convert JPEG Baseline", raised.value).message
    assert message == (
        "cannot convert JPEG Baseline: With tag (0008,0008) got exception: encoding without a"
        " string argument; ask for transfer-syntax=* for the stored bytes"
    )


def _whole(src: Path, dst: Path, target: str) -> None:
    """to_transfer_syntax's conversion in memory (converted_dataset), to `target` or to
    Implicit VR Little Endian."""
    implicit = target == ImplicitVRLittleEndian
    ds = converted_dataset(src, ExplicitVRLittleEndian if implicit else target)
    ds.file_meta.TransferSyntaxUID = UID(target)
    ds.save_as(dst, implicit_vr=implicit, little_endian=True, enforce_file_format=True)


_FLOAT_CASES = [
    (stored, target, double)
    for stored in (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    for double in (False, True)
    if target != stored
]


@pytest.mark.parametrize(("stored", "target", "double"), _FLOAT_CASES)
def test_float_pixel_data_is_copied_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str, target: str, double: bool
) -> None:
    """Float (Double Float) Pixel Data of 16 MiB, no Pixel Data: copied (swapped by 4 or 8
    bytes from big endian) a chunk at a time, the bytes of the conversion in memory, which
    held the value two or three times over."""
    src = tmp_path / "float.dcm"
    ds = float_map(stored, 16, 512, 256 if double else 512, double)
    ds.save_as(src, implicit_vr=stored == ImplicitVRLittleEndian,
               little_endian=stored != ExplicitVRBigEndian, enforce_file_format=True)  # fmt: skip
    tracemalloc.start()
    try:
        _streamed(src, tmp_path / "streamed.dcm", target, monkeypatch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CONVERT_COPY_BYTES, f"peak {peak} bytes"
    _whole(src, tmp_path / "whole.dcm", target)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()
    got = pydicom.dcmread(tmp_path / "streamed.dcm")
    keyword = "DoubleFloatPixelData" if double else "FloatPixelData"
    words = np.frombuffer(pydicom.dcmread(src)[keyword].value, ">u8" if double else ">u4")
    if stored != ExplicitVRBigEndian:
        words = words.view(words.dtype.newbyteorder("<"))
    assert got[keyword].value == words.astype(words.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("name", ["parametric_map_float.dcm", "parametric_map_double_float.dcm"])
def test_float_samples_convert_as_in_memory(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """pydicom-data's Parametric Maps (Explicit VR Little Endian) to Implicit VR: streamed,
    the bytes of the conversion in memory."""
    src = samples / "real/pydicom-data" / name
    _streamed(src, tmp_path / "streamed.dcm", ImplicitVRLittleEndian, monkeypatch)
    _whole(src, tmp_path / "whole.dcm", ImplicitVRLittleEndian)
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()


@pytest.mark.db
async def test_float_pixels_under_an_unreadable_number_of_frames_convert(
    app: Any, app_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Float Pixel Data whose Number of Frames pydicom cannot read ("ab": stored, counted as
    one frame, vr.frame_count) is copied, through WADO-RS, as in memory: the streamed copy
    read the Image Pixel values for a decoder it does not use, and failed (a 406), where the
    conversion in memory it replaced had converted it."""
    ds = float_map(ImplicitVRLittleEndian, 1, 64, 64)
    ds.NumberOfFrames = 7  # "7 ": two bytes, replaced below
    src = tmp_path / "stored.dcm"
    ds.save_as(src, implicit_vr=True, little_endian=True, enforce_file_format=True)
    data = src.read_bytes()
    at = data.index(b"\x28\x00\x08\x00\x02\x00\x00\x007 ")  # (0028,0008), length 2, "7 "
    data = data[: at + 8] + b"ab" + data[at + 10 :]
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    r = await app_client.get(inst_url(ds), headers={"Accept": accept})
    assert r.status_code == 200, r.text
    ((_headers, part),) = split_multipart(r.content, r.headers["content-type"])
    src.write_bytes(data)
    _whole(src, tmp_path / "whole.dcm", ExplicitVRLittleEndian)
    assert part == (tmp_path / "whole.dcm").read_bytes()
