"""Damaged files that STOW accepts, retrieved: every pixel resource answers with a 4xx (or an
icon, or the stored bytes a client accepts) before its body starts, never a 500, a body cut
off mid-way, or memory in proportion to what the file claims. Each case is a corpus file with
one attribute or a few bytes changed, as a mutation fuzz of the retrieve routes found them
(see test_malformed.py for the files refused at STOW)."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments, generate_frames
from pydicom.uid import generate_uid

from dicomweb_server.render import JPEG_MAX_EDGE
from dicomweb_server.retrieve import frames as retrieve_frames
from dicomweb_server.transcode import fragments
from dicomweb_server.transcode.codecs import TranscodeError
from dicomweb_server.transcode.frames import DECODE_MAX_BYTES, decode_frames, frame_array
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

_MR_RLE = "real/pydicom/MR_small_RLE.dcm"  # 64 x 64, 16-bit, RLE Lossless
_JPEG_GREY = "generated/coverage/mg_jpeg_baseline_gray8.dcm"  # 8-bit, JPEG Baseline
_JPEG_LS_15 = "generated/coverage/ect_15frames_jpegls_lossless.dcm"  # 15 frames, JPEG-LS
_BIG_ENDIAN_PALETTE = "real/pydicom-data/OBXXXX1A_expb_2frame.dcm"  # palette, Explicit VR BE
_J2K = "real/pydicom-data/MR2_J2KR.dcm"  # 1024 x 1024, 16-bit, JPEG 2000 Lossless
_RGB_RLE_2 = "real/pydicom/SC_rgb_rle_2frame.dcm"  # 2 frames, RGB, RLE Lossless
_CT = "real/pydicom/CT_small.dcm"  # 128 x 128, 16-bit, Explicit VR Little Endian
_DEFLATED = "real/pydicom/image_dfl.dcm"  # 512 x 512, 8-bit, Deflated Explicit VR LE
_ONE_BIT = "real/pydicom/liver_1frame.dcm"  # 512 x 512, 1-bit SEG
_ONE_BIT_RLE = "real/pydicom-data/liver_rle.dcm"  # 3 frames of the same, RLE Lossless
_MULTIPART = "multipart/related; type="
_AS_JLS = {"Accept": f'{_MULTIPART}"image/jls"'}


def _mutant(samples: Path, name: str, **attributes: Any) -> Dataset:
    """A corpus file with fresh UIDs and `attributes` set (its pixels as they were)."""
    ds = pydicom.dcmread(samples / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


async def _stored(client: httpx.AsyncClient, ds: Dataset) -> str:
    """STOW `ds` (which must be accepted); its instance URL."""
    r = await client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200 and "00081198" not in r.json(), r.text
    return inst_url(ds)


async def _get(client: httpx.AsyncClient, url: str, accept: str | None = None) -> httpx.Response:
    """A GET that must be answered whole (a body cut off raises in the in-process client)
    and never with a 5xx."""
    r = await client.get(url, headers={"Accept": accept} if accept else {})
    assert r.status_code < 500, (url, accept, r.status_code, r.text)
    return r


async def test_a_codec_panic_is_a_406_not_a_500(
    app_client: httpx.AsyncClient, samples: Path, tmp_path: Path
) -> None:
    """RLE frames whose Columns was halved: pylibjpeg-rle's decoder (Rust) panics on segments
    longer than Rows x Columns, and pyo3's PanicException derives from BaseException. It
    passed every decoder `except`, and the server's own 500 handler: hypercorn answered a bare
    500, and the in-process client raised it. Now a decoder failure like any other."""
    ds = _mutant(samples, _MR_RLE, Columns=32)
    src = tmp_path / "x.dcm"
    src.write_bytes(to_bytes(ds))
    with pytest.raises(TranscodeError, match="codec failed"):
        decode_frames(src, [1])
    url = await _stored(app_client, ds)
    # Asked for uncompressed (no Accept): the conversion fails, so it goes as stored.
    r = await _get(app_client, url)
    assert r.status_code == 200 and b"transfer-syntax=1.2.840.10008.1.2.5" in r.content[:300]
    explicit = f'{_MULTIPART}"application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    r = await _get(app_client, url, explicit)
    assert r.status_code == 406 and "codec failed" in r.json()["message"]
    r = await _get(app_client, url + "/frames/1")  # as stored, too
    assert r.status_code == 200 and 'type="image/dicom-rle"' in r.headers["content-type"]
    r = await _get(app_client, url + "/frames/1", f'{_MULTIPART}"application/octet-stream"')
    assert r.status_code == 406 and "codec failed" in r.json()["message"]
    assert (await _get(app_client, url + "/rendered", "image/png")).status_code == 406
    r = await _get(app_client, url + "/thumbnail", "image/png")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")  # an icon
    for path in ("/pixeldata", "/bulkdata", "/bulk/7FE00010"):
        r = await _get(app_client, url + path)  # its frames as stored
        assert r.status_code == 200 and 'type="image/dicom-rle"' in r.headers["content-type"]


@pytest.mark.parametrize("attribute", ["BitsAllocated", "Rows", "Columns"])
async def test_encapsulated_pixels_described_as_empty(
    app_client: httpx.AsyncClient, samples: Path, attribute: str
) -> None:
    """Compressed frames whose Rows, Columns or Bits Allocated is 0: their uncompressed value,
    made frame by frame, divided by a frame size of 0 (a 500 on /pixeldata, /bulkdata and the
    Pixel Data's BulkDataURI). They have no uncompressed form: the frames go as stored when
    the client accepts that, else a 406 with the reason."""
    url = await _stored(app_client, _mutant(samples, _MR_RLE, **{attribute: 0}))
    for path in ("/pixeldata", "/bulkdata", "/bulk/7FE00010"):
        r = await _get(app_client, url + path)
        assert r.status_code == 200 and 'type="image/dicom-rle"' in r.headers["content-type"]
    uncompressed = f'{_MULTIPART}"application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'
    r = await _get(app_client, url + "/bulk/7FE00010", uncompressed)
    assert r.status_code == 406 and "is 0" in r.json()["message"]


async def test_native_pixel_data_short_of_its_number_of_frames(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Native Pixel Data of one frame under a Number of Frames of 2: frame 1 converted, sent,
    then frame 2 failed, and the response broke off mid-body (frames/1,2; Pixel Data asked
    for in an image type). The farthest frame asked for is converted before anything is
    sent: a 406 with its reason (the Pixel Data as stored, octet-stream, is still sent)."""
    url = await _stored(app_client, _mutant(samples, _CT, NumberOfFrames=2))
    assert (await _get(app_client, url + "/frames/1")).status_code == 200
    for path, accept in [
        ("/frames/2", None),
        ("/frames/1,2", None),
        ("/frames/1,2", f'{_MULTIPART}"image/jls"'),
        ("/pixeldata", f'{_MULTIPART}"image/jls"'),
        ("", f'{_MULTIPART}"image/jls"'),  # the instance asked for as bulk data
    ]:
        r = await _get(app_client, url + path, accept)
        assert r.status_code == 406 and "frame 2" in r.json()["message"], (path, r.text)
    assert (await _get(app_client, url + "/pixeldata")).status_code == 200  # as stored


async def test_a_number_of_frames_far_past_the_pixel_data(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Number of Frames 2^24 over one native frame: every frame of the Pixel Data asked for
    in an image type made a list of 2^24 frame numbers (of 2^31 - 1, 80 GB: the process was
    killed), and frame 2^24 is the one that fails. A 406, in bounded memory."""
    url = await _stored(app_client, _mutant(samples, _CT, NumberOfFrames=2**24))
    tracemalloc.start()
    try:
        for path in ("/pixeldata", "/bulkdata", ""):
            r = await _get(app_client, url + path, _AS_JLS["Accept"])
            assert r.status_code == 406, (path, r.text)
        r = await _get(app_client, f"{url}/frames/1,{2**24}")
        assert r.status_code == 406 and f"frame {2**24}" in r.json()["message"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, peak


async def test_a_frame_past_the_largest_file_offset(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Frame 999999999 (the largest a frame list spells) of 32 KiB frames starts 30 TiB in:
    past the largest offset ext4 takes, so pydicom's seek to it raised OSError (EINVAL),
    which no decoder `except` named: a 500 for the frame and for its rendering. The frame
    is now known to lie past the value before it is read, on any file system."""
    last = 999_999_999
    url = await _stored(app_client, _mutant(samples, _CT, NumberOfFrames=2**31 - 1))
    assert (await _get(app_client, f"{url}/frames/{last}")).status_code == 406
    r = await _get(app_client, f"{url}/frames/{last}/rendered", "image/png")
    assert r.status_code == 406
    r = await _get(app_client, f"{url}/frames/{last}/thumbnail", "image/png")
    assert r.status_code == 200  # an icon


def test_a_one_bit_frame_past_the_pixel_data_is_not_memory(samples: Path, tmp_path: Path) -> None:
    """pydicom reads frame n of a file at its offset, trusting Number of Frames, and unpacks
    1-bit frames with numpy's unpackbits, which returns uninitialised memory when the read
    is empty: frame 2 of a 1-bit SEG of one frame was the process's freed memory (text of
    earlier allocations showed in it). A frame past the value is an error now."""
    src = tmp_path / "x.dcm"
    src.write_bytes(to_bytes(_mutant(samples, _ONE_BIT, NumberOfFrames=2)))
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    assert frame_array(src, ds, 1).shape == (512, 512)
    with pytest.raises(ValueError, match="frame 2 lies past the end of the Pixel Data"):
        frame_array(src, ds, 2)


async def test_a_one_bit_frame_past_the_pixel_data(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """The same through the routes: frame 2 rendered drew that memory (a 200), and sent as
    octet-stream, bit-packing its bytes failed (a ValueError outside the decoder's `except`,
    a 500); empty 1-bit Pixel Data did the same for frame 1. A 406 with the reason."""
    url = await _stored(app_client, _mutant(samples, _ONE_BIT, NumberOfFrames=2))
    assert (await _get(app_client, url + "/frames/1")).status_code == 200
    for path, accept in [("/frames/2", None), ("/frames/2/rendered", "image/png")]:
        r = await _get(app_client, url + path, accept)
        assert r.status_code == 406 and "past the end" in r.json()["message"], path
    url = await _stored(app_client, _mutant(samples, _ONE_BIT, PixelData=b""))
    for path, accept in [("/frames/1", None), ("/rendered", "image/png")]:
        assert (await _get(app_client, url + path, accept)).status_code == 406, path


async def test_compressed_frames_claiming_one_bit(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """JPEG frames of 8 bits under a Bits Allocated and Stored of 1: the decoder gives their
    samples, bit-packing refuses them with a ValueError, and that was outside the decoder's
    `except` (a 500 for the frame as octet-stream). A 406; the frame as stored for a request
    that takes it."""
    ds = _mutant(samples, _JPEG_GREY, BitsAllocated=1, BitsStored=1, HighBit=0)
    url = await _stored(app_client, ds)
    r = await _get(app_client, url + "/frames/1", f'{_MULTIPART}"application/octet-stream"')
    assert r.status_code == 406
    assert (await _get(app_client, url + "/frames/1")).status_code == 200  # as stored


async def test_a_deflated_frame_is_one_frame_whatever_pydicom_counts(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """A Deflated file (decoded whole: no random access) whose Columns was halved, without a
    Number of Frames: pydicom counts the frames its value holds, two, and the whole array
    was taken for frame 1; rendering it, Pillow refused a 3-D image (a 500). Frame 1 is the
    array's first frame."""
    url = await _stored(app_client, _mutant(samples, _DEFLATED, Columns=256))
    for path in ("/rendered", "/frames/1/rendered", "/thumbnail"):
        r = await _get(app_client, url + path, "image/png")
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), path
    r = await _get(app_client, url + "/rendered", "image/png")
    assert r.content[16:24] == (256).to_bytes(4, "big") + (512).to_bytes(4, "big")  # IHDR


async def test_an_empty_frame_is_not_rendered(app_client: httpx.AsyncClient, samples: Path) -> None:
    """1-bit RLE frames under a Rows of 0 decode to no pixels. Windowed (the min-max of no
    values failed earlier, a 406), they reached the PNG writer, which refused an empty image
    with a ValueError outside the decoder's `except`: a 500. A 406; the thumbnail an icon."""
    url = await _stored(app_client, _mutant(samples, _ONE_BIT_RLE, Rows=0))
    r = await _get(app_client, url + "/rendered?window=100,200", "image/png")
    assert r.status_code == 406 and "not an image" in r.json()["message"]
    assert (await _get(app_client, url + "/thumbnail", "image/png")).status_code == 200


@pytest.mark.parametrize("columns", [JPEG_MAX_EDGE, JPEG_MAX_EDGE + 1])
async def test_jpeg_rendering_edge_at_its_limit(
    app_client: httpx.AsyncClient, columns: int
) -> None:
    """JPEG_MAX_EDGE: Rows and Columns reach 65535, a JPEG 65500 (libjpeg); Pillow's writer
    failed mid-save with an OSError, a 500. A wider rendering as JPEG is a 406 naming the
    limit; as PNG, and as a thumbnail (fitted), it is made."""
    ds = make_instance(rows=1, cols=columns, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.PixelData = bytes(range(256)) * (columns // 256) + bytes(columns % 256)
    url = await _stored(app_client, ds)
    r = await _get(app_client, url + "/rendered", "image/jpeg")
    if columns <= JPEG_MAX_EDGE:
        assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
    else:
        assert r.status_code == 406 and str(JPEG_MAX_EDGE) in r.json()["message"]
    assert (await _get(app_client, url + "/rendered", "image/png")).status_code == 200
    assert (await _get(app_client, url + "/thumbnail", "image/jpeg")).status_code == 200


async def test_a_decoded_value_that_fails_is_refused_before_its_part_starts(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """RLE Pixel Data whose Rows says 65535: its uncompressed value (8 MiB, so streamed) sent
    the multipart part's headers, then the first frame failed to decode and the body broke
    off. The first frame is decoded before anything is sent: the frames go as stored for a
    request that accepts them, a 406 for one that takes only the uncompressed value."""
    url = await _stored(app_client, _mutant(samples, _MR_RLE, Rows=65535))
    r = await _get(app_client, url + "/bulk/7FE00010")
    assert r.status_code == 200 and 'type="image/dicom-rle"' in r.headers["content-type"]
    r = await _get(app_client, url + "/bulk/7FE00010", "application/octet-stream")
    assert r.status_code == 406
    assert DECODE_MAX_BYTES > 65535 * 64 * 2  # the decode was tried, not refused


async def test_unmapped_frames_are_read_one_by_one(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Frames of two fragments each and no offset table (valid: PS3.5 A.4; pydicom finds each
    frame's end by its JPEG EOI marker) are not mapped at ingest. Each frame request read the
    whole file into memory and split all of its frames, however large the file (up to
    MAX_PART_BYTES, 4 GiB); now the frames are read from the file up to the one asked for."""
    ds = _mutant(samples, _JPEG_LS_15)
    frames = list(generate_frames(ds.PixelData, number_of_frames=15)) * 40
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    ds.NumberOfFrames = len(frames)
    url = await _stored(app_client, ds)
    stored = f'{_MULTIPART}"image/jls"; transfer-syntax=*'
    tracemalloc.start()
    try:
        r = await _get(app_client, url + "/frames/2", stored)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 200 and frames[1] in r.content
    assert len(ds.PixelData) > 8 * 1024 * 1024 > 4 * peak, peak
    r = await _get(app_client, f"{url}/frames/{len(frames)},3", stored)
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [body for _, body in parts] == [frames[-1], frames[2]]
    r = await _get(app_client, f"{url}/frames/{len(frames)}", stored)
    assert r.status_code == 200


async def test_unmapped_frames_are_found_once_per_file(
    app_client: httpx.AsyncClient, samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of two fragments each and no offset table: their places are found once, from
    the items' headers and last bytes (frame_map), and each frame is then read and decoded by
    range. pydicom counted every fragment and read the ones before frame k for each frame k,
    once per frame converted (the 1,000 frames of such a file took 25 s in one request)."""
    ds = _mutant(samples, _JPEG_LS_15)
    expected = ds.pixel_array
    frames = list(generate_frames(ds.PixelData, number_of_frames=15))
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    url = await _stored(app_client, ds)
    whole_file_reads = 0

    def counted(real: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            nonlocal whole_file_reads
            whole_file_reads += 1
            return real(*args)

        return wrapper

    for name in ("decode_frames", "encode_frames", "stored_frames"):
        monkeypatch.setattr(retrieve_frames, name, counted(getattr(retrieve_frames, name)))
    fragments._frame_map_of.cache_clear()
    every = ",".join(str(n) for n in range(1, 16))
    decoded = f'{_MULTIPART}"application/octet-stream"'
    r = await _get(app_client, f"{url}/frames/{every}", decoded)
    assert r.status_code == 200, r.text
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [body for _, body in parts] == [f.tobytes() for f in expected]
    stored = f'{_MULTIPART}"image/jls"; transfer-syntax=*'
    r = await _get(app_client, f"{url}/frames/15,3", stored)
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [body for _, body in parts] == [frames[14], frames[2]]
    r = await _get(app_client, f"{url}/frames/7", decoded)
    assert split_multipart(r.content, r.headers["content-type"])[0][1] == expected[6].tobytes()
    assert whole_file_reads == 0
    assert fragments._frame_map_of.cache_info().misses == 1


async def test_empty_big_endian_pixel_data_is_an_empty_value(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Empty Pixel Data of a big endian file (its bulk data found by parsing the file, not by
    a recorded range): pydicom reads an empty OW value as None, taken for "no bulk data
    here", so the BulkDataURI the metadata gives was a 404, and /bulkdata, which sent the
    values before it first, broke off at it. An empty value is b"", as a recorded one is."""
    ds = _mutant(samples, _BIG_ENDIAN_PALETTE, PixelData=b"")
    ds[0x200D1109].value = bytes(range(256)) * 8  # a private value over the bulk threshold
    url = await _stored(app_client, ds)
    (meta,) = (await _get(app_client, url + "/metadata")).json()
    assert "BulkDataURI" in meta["7FE00010"]
    r = await _get(app_client, url + "/bulk/7FE00010")
    assert r.status_code == 200, r.text
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [body for _, body in parts] == [b""]
    r = await _get(app_client, url + "/bulkdata")
    parts = split_multipart(r.content, r.headers["content-type"])
    assert r.status_code == 200 and parts[-1][1] == b"" and len(parts) > 1


async def test_a_decoded_value_short_of_its_frames_is_refused_up_front(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """One JPEG 2000 frame in three fragments, no offset table, under a Number of Frames of
    2 (stored: a frame may take several fragments). Its uncompressed value (4 MiB, so
    streamed), decoded frame by frame as it is sent, sent frame 1, then broke off at frame 2.
    Frames no offset table maps may not all be there: the last one a read covers is decoded
    before the first is sent."""
    ds = _mutant(samples, _J2K, NumberOfFrames=2)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame], fragments_per_frame=3, has_bot=False)
    assert len(list(generate_fragments(ds.PixelData))) == 4  # the (empty) BOT and three
    url = await _stored(app_client, ds)
    for path, accept in [
        ("/pixeldata", None),
        ("/bulk/7FE00010", None),
        ("/bulk/7FE00010", "application/octet-stream"),
        ("/frames/1,2", None),
    ]:
        r = await _get(app_client, url + path, accept)
        assert r.status_code in (404, 406), (path, accept, r.status_code)
    assert (await _get(app_client, url + "/frames/1")).status_code == 200


async def test_unmapped_pixel_data_short_of_its_frames_is_left_out(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    """Two RLE frames and an empty fragment, no offset table (not mapped at ingest: pydicom
    splits them into one frame when asked), after an overlay's bulk data. /bulkdata sent the
    overlay, then the Pixel Data's frames as stored were found short of Number of Frames (a
    404 raised past the response's start): the body broke off. The Pixel Data is left out
    now, as a value that cannot be sent is (unnamed: the headers, where a Warning would
    name it, went out with the overlay's part)."""
    ds = _mutant(samples, _RGB_RLE_2)
    frames = [*generate_frames(ds.PixelData, number_of_frames=2), b""]
    ds.PixelData = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in [b"", *frames])
    ds.add_new(0x60000010, "US", 64)  # Overlay Rows, Columns, Type, Origin, Bits, Data
    ds.add_new(0x60000011, "US", 64)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60003000, "OW", bytes(4096))  # over BULK_DATA_THRESHOLD_BYTES: bulk data
    url = await _stored(app_client, ds)
    r = await _get(
        app_client, url + "/bulkdata", f'{_MULTIPART}"application/octet-stream"; transfer-syntax=*'
    )
    assert r.status_code == 200, r.text
    parts = split_multipart(r.content, r.headers["content-type"])
    assert [h["content-location"].rsplit("/", 1)[-1] for h, _ in parts] == ["60003000"]
