"""Bulk data values sent in bounded memory: those of a big endian instance (its Pixel Data by
BulkDataURI, /pixeldata, /bulkdata) read by range, their words swapped a chunk at a time
(bulkvalue.element_range); those found by parsing the file (a Deflated instance's) held in a
scratch file while they are sent, not in memory (pixeldata.HELD_VALUE_MAX_BYTES)."""

from __future__ import annotations

import io
import random
import tracemalloc

import httpx
import numpy as np
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server.blobstore import reading
from dicomweb_server.retrieve.instances import locate
from dicomweb_server.retrieve.pixeldata import _swap_words, stored_bulk_value
from dicomweb_server.vr import swapped_words
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
)

# 8 MiB of 16-bit pixels, read in chunks of at most 64 KiB (the reading constants scaled
# down): memory holds the read-ahead and a few chunks, under an eighth of the value.
_ROWS = _COLS = 2048
_FRAMES = 1
_CHUNK = 64 * 1024


def _big_endian_instance() -> tuple[bytes, bytes]:
    """(the Part-10 bytes of a big endian instance, its Pixel Data little endian)."""
    ds = make_instance(rows=_ROWS, cols=_COLS, frames=_FRAMES)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 65535, size=_ROWS * _COLS * _FRAMES, dtype="<u2")
    little = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds.PixelData = pixels.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=False, enforce_file_format=True)
    return buf.getvalue(), little


@pytest.mark.db
async def test_big_endian_pixel_data_is_swapped_as_it_is_sent(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"READ_CHUNK_BYTES": _CHUNK, "READ_CHUNK_MAX_BYTES": _CHUNK, "READ_AHEAD_BYTES": _CHUNK}
    for name, size in sizes.items():
        monkeypatch.setattr(reading, name, size)
    raw, little = _big_endian_instance()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([raw]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    svc = app.state.services
    (inst,) = await locate(svc, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    tracemalloc.start()
    try:
        value = await stored_bulk_value(svc, inst, "7FE00010", None)
        at, same = 0, True
        async for chunk in value.read(0, value.length):
            same = same and chunk == little[at : at + len(chunk)]
            at += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same and at == len(little) == value.length
    # The value was read whole, copied and swapped: 4 times its size (1.7 GB for 500 MB).
    assert peak < 16 * _CHUNK <= len(little) // 8, peak
    # Ranges starting and ending inside words, across chunks.
    for start, stop in ((3, 2_000_001), (_CHUNK - 1, 3 * _CHUNK + 5)):
        got = b"".join([c async for c in value.read(start, stop)])
        assert got == little[start:stop], (start, stop)
    # And over HTTP, as the BulkDataURI of the metadata names it.
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    r = await app_client.get(meta["7FE00010"]["BulkDataURI"])
    assert r.status_code == 200, r.text
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == little


@pytest.mark.parametrize("vr", ["OW", "OL", "OV"])
async def test_words_split_between_chunks_are_swapped_whole(vr: str) -> None:
    """Chunks of any size, a word split between two of them, an odd tail: the same bytes as
    swapping the value whole."""
    rng = random.Random(vr)
    data = rng.randbytes(1000 + 3)  # not a whole number of words of any width

    async def chunks() -> object:
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 37)
            yield data[pos : pos + n]
            pos += n

    got = b"".join([c async for c in _swap_words(chunks(), vr)])  # type: ignore[arg-type]
    assert got == swapped_words(data, vr)


@pytest.mark.db
async def test_a_parsed_value_is_held_on_disk_while_it_is_sent(
    app: Starlette, app_client: httpx.AsyncClient
) -> None:
    """The Pixel Data of a Deflated instance is found by inflating and parsing the file; the
    value was held in memory by each response until its client had read it (eight slow
    clients of a 60 MB value: 1.2 GB). It is written to a scratch file instead, removed once
    the response is done with it."""
    ds = make_instance(rows=1024, cols=1024, frames=2)  # 4 MiB
    pixels = np.random.default_rng(9).integers(0, 4096, 1024 * 1024 * 2, dtype="<u2")
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([buf.getvalue()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    svc = app.state.services
    (inst,) = await locate(svc, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    tracemalloc.start()
    try:
        values = [await stored_bulk_value(svc, inst, "7FE00010", None) for _ in range(4)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < len(ds.PixelData) // 4, held  # four values of 4 MiB were held: 32 MiB
    streams = [v.read(0, v.length) for v in values]
    firsts = [await anext(s) for s in streams]
    del values  # the streams being read keep their files
    for first, stream in zip(firsts, streams, strict=True):
        assert first + b"".join([c async for c in stream]) == ds.PixelData
    del streams, stream
    assert not [p for p in svc.scratch_dir.iterdir() if p.suffix == ".bulk"]
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    r = await app_client.get(meta["7FE00010"]["BulkDataURI"])
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == ds.PixelData
    assert not [p for p in svc.scratch_dir.iterdir() if p.suffix == ".bulk"]
