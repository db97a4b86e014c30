"""Reading the frames of stored files without doing the work again: a Deflated file inflated
once into its copy (transcode.inflated), files decoded whole kept up to
WHOLE_FILE_KEEP_MAX_BYTES, frame maps kept for FRAME_MAP_FILES files (transcode.fragments)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames

from dicomweb_server.transcode import fragments, inflated
from dicomweb_server.transcode import frames as transcode_frames
from tests.helpers import make_instance

pytestmark = pytest.mark.db


def test_frames_of_a_deflated_file_inflate_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every frame of a Deflated file converted one at a time (a frame list, the frames of
    one request each) inflates the file once, into its copy (transcode.inflated), never
    whole by pydicom: the header each conversion reads inflates only the data set before
    the Pixel Data. dcmread inflated the whole file for it: a 120-frame instance was
    inflated 121 times (51 s)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_instance(frames=16, rows=64, cols=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(inflated, "_copies", type(inflated._copies)())
    inflated_whole = 0  # bytes made by pydicom's inflate of the whole data set
    real = zlib.decompress

    def counting(*args: Any, **kwargs: Any) -> bytes:
        nonlocal inflated_whole
        out = real(*args, **kwargs)
        inflated_whole += len(out)
        return out

    monkeypatch.setattr(zlib, "decompress", counting)
    expected = ds.pixel_array
    for n in range(1, 17):
        (frame,) = transcode_frames.decode_frames(path, [n], tmp_path)
        assert frame == expected[n - 1].tobytes()
    assert inflated_whole == 0
    (copy,) = inflated._copies.values()
    assert copy.path.parent == tmp_path
    # The header alone inflates nothing whole, and is the header dcmread reads.
    head = transcode_frames.read_stored(path, stop_before_pixels=True)
    assert inflated_whole == 0
    whole = pydicom.dcmread(path, stop_before_pixels=True)
    assert head == whole and head.file_meta == whole.file_meta
    assert head.original_encoding == whole.original_encoding == (False, True)
    assert head.preamble == whole.preamble and "PixelData" not in head


def test_deflated_header_keeps_the_end_of_the_stream(tmp_path: Path) -> None:
    """A Deflated data set without Pixel Data ending in zeros: the header read inflated step
    by step (_Inflating) holds all of it, as dcmread does. Once the file was all read, the
    inflater's last output was left in it when a step's output was full: the private value
    below came back 65,464 bytes of 65,516, silently (found by review). A stream cut short
    is an error, as it is for dcmread."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = "1.2.3"
    ds.StudyDescription = ""
    ds.add_new(0x00091011, "OB", bytes(65516))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    head = transcode_frames.read_stored(path, stop_before_pixels=True)
    assert head == pydicom.dcmread(path, stop_before_pixels=True)
    assert len(head[0x00091011].value) == 65516
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(zlib.error):
        pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(zlib.error):
        transcode_frames.read_stored(path, stop_before_pixels=True)


def test_files_decoded_whole_are_kept_up_to_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files decoded whole for their frames (1-bit RLE, files pydicom reads only whole) are
    kept, least recently used dropped, WHOLE_FILE_KEEP_MAX_BYTES in all: one file was kept,
    so the frames of two such files read in turn (two clients) decoded each file again for
    every frame. At the edge: two files of 2048 decoded bytes are both kept at 4096, and at
    a byte less each frame decodes its file again."""
    reads = 0
    real = pydicom.dcmread

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return real(*args, **kwargs)

    files = []
    for k, name in enumerate(("a.dcm", "b.dcm")):
        ds = make_instance(frames=16, rows=8, cols=8)
        rng = np.random.default_rng(k)
        ds.PixelData = rng.integers(0, 4096, (16, 8, 8), dtype=np.uint16).tobytes()
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append((tmp_path / name, ds.pixel_array))
    monkeypatch.setattr(pydicom, "dcmread", counting)
    both = sum(expected.nbytes for _, expected in files)
    for limit, decodes in ((both, 2), (both - 1, 32)):
        monkeypatch.setattr(transcode_frames, "_whole", type(transcode_frames._whole)())
        monkeypatch.setattr(transcode_frames, "WHOLE_FILE_KEEP_MAX_BYTES", limit)
        reads = 0
        for n in range(1, 17):
            for path, expected in files:
                frame = transcode_frames._whole_file_frame(path, n, True)
                assert np.array_equal(frame, expected[n - 1])
                frame[...] = 0  # a copy: the decoded file is not changed for the next caller
        assert reads == decodes, limit


def test_frame_maps_are_kept_for_frame_map_files_files(tmp_path: Path, samples: Path) -> None:
    """frame_map keeps the places it found for FRAME_MAP_FILES files, the least recently
    used dropped for one more (the limit at its edge); a place is an item run whose values
    are the frame (15 frames of two fragments each, no offset table)."""
    ds = pydicom.dcmread(samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    paths = [tmp_path / f"{n}.dcm" for n in range(fragments.FRAME_MAP_FILES + 1)]
    for path in paths:
        ds.save_as(path, enforce_file_format=True)
    cached = fragments._frame_map_of
    cached.cache_clear()
    found = fragments.frame_map(paths[0])
    assert found is not None
    data = paths[0].read_bytes()
    for frame, offset, length in zip(frames, *found, strict=True):
        run = data[offset : offset + length] + b"\xfe\xff\xdd\xe0"  # its items, delimited
        assert b"".join(generate_fragments(run)) == frame
    for path in paths[1:-1]:
        assert fragments.frame_map(path) == found
    for path in paths[:-1]:
        fragments.frame_map(path)
    info = cached.cache_info()
    assert (info.misses, info.hits, info.currsize) == (
        len(paths) - 1,
        len(paths) - 1,
        len(paths) - 1,
    )
    fragments.frame_map(paths[-1])  # one more: paths[0], used least recently, dropped
    fragments.frame_map(paths[1])
    assert cached.cache_info().hits == len(paths)
    fragments.frame_map(paths[0])
    assert cached.cache_info().misses == len(paths) + 1
