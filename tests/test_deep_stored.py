"""Instances stored before STOW-RS and C-STORE limited the depth of sequences
(dicomfile.MAX_SEQUENCE_DEPTH), nested deeper: written into the blob store under a stored
instance's key, as tests/test_reindex.py simulates pre-existing data. pydicom reads sequences of
undefined length, and writes every sequence, recursively: converting them raised a bare
RecursionError (a 500 for a rendering) or overflowed the C stack. Now a conversion that would
re-encode or read them past transcode.frames.MAX_CONVERTED_SEQUENCE_DEPTH is refused with the
reason (a 406, an icon, a failed sub-operation); the stored bytes are served as they are."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1
from pynetdicom.events import Event
from starlette.applications import Starlette

from dicomweb_server.dicomfile import MAX_SEQUENCE_DEPTH
from dicomweb_server.report import render_report
from dicomweb_server.transcode import frames
from dicomweb_server.transcode.codecs import TranscodeError
from dicomweb_server.transcode.convert import converted_dataset, to_transfer_syntax
from dicomweb_server.transcode.writable import check_writable
from tests.dimse_support import Archive, blobs, get_study, in_thread
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers
from tests.test_deep_sequences import deep_part10, element, nested

# Deeper than pydicom's reader takes items of undefined length (about 190 levels).
_UNREADABLE_LEVELS = 300
# transcode.frames.MAX_CONVERTED_SEQUENCE_DEPTH (test_conversion_takes_the_limit_of_ingest)
_LIMIT = MAX_SEQUENCE_DEPTH
_REASON = f"its sequences nest deeper than {_LIMIT} levels"


def test_conversion_takes_the_limit_of_ingest() -> None:
    assert frames.MAX_CONVERTED_SEQUENCE_DEPTH == MAX_SEQUENCE_DEPTH


@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("streamed", [False, True])
def test_conversion_at_the_depth_limit(tmp_path: Path, undefined: bool, streamed: bool) -> None:
    """Implicit VR to Explicit VR Little Endian re-encodes every sequence: the limit converts,
    one level more is refused (a TranscodeError naming it, converted_dataset and
    to_transfer_syntax alike; pydicom's writer took up to about 240 levels, then a
    RecursionError, or a SIGSEGV near 300)."""
    src, dst = tmp_path / "x.dcm", tmp_path / "y.dcm"

    def convert() -> None:
        if streamed:
            to_transfer_syntax(src, dst, ExplicitVRLittleEndian)
        else:
            converted_dataset(src, ExplicitVRLittleEndian)

    src.write_bytes(deep_part10(make_instance(), _LIMIT, True, undefined))
    convert()
    src.write_bytes(deep_part10(make_instance(), _LIMIT + 1, True, undefined))
    with pytest.raises(TranscodeError, match=_REASON):
        convert()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_file_too_deep_to_read_is_a_transcode_error(tmp_path: Path, streamed: bool) -> None:
    """Items of undefined length past pydicom's recursion limit: converted_dataset raised a
    bare RecursionError."""
    src = tmp_path / "x.dcm"
    src.write_bytes(deep_part10(make_instance(), _UNREADABLE_LEVELS, True, True))
    with pytest.raises(TranscodeError, match=_REASON):
        if streamed:
            to_transfer_syntax(src, tmp_path / "y.dcm", JPEGLosslessSV1)
        else:
            converted_dataset(src, JPEGLosslessSV1)


@pytest.mark.db
async def test_wado_of_a_stored_instance_too_deep_to_read(
    app_client: httpx.AsyncClient, app: Starlette
) -> None:
    """Conversion and rendering are a 406 with the reason (rendering was a 500), a thumbnail
    an icon; the stored bytes, metadata and frames are served."""
    ds = make_instance()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([deep_part10(ds, 3, True, True)]),
        headers=stow_headers(),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    (inst,) = await app.state.services.index.locate(str(ds.StudyInstanceUID), None, None)
    path = app.state.services.blobs.local_path(inst.blob_key)
    path.write_bytes(deep_part10(ds, _UNREADABLE_LEVELS, True, True))
    dicom = 'multipart/related; type="application/dicom"'
    for accept in (dicom, f"{dicom}; transfer-syntax={JPEGLosslessSV1}"):
        answer = await app_client.get(inst_url(ds), headers={"Accept": accept})
        assert answer.status_code == 406 and _REASON in answer.text, accept
    rendered = await app_client.get(inst_url(ds) + "/rendered")
    assert rendered.status_code == 406 and _REASON in rendered.text
    stored = await app_client.get(inst_url(ds), headers={"Accept": f"{dicom}; transfer-syntax=*"})
    assert stored.status_code == 200  # implicit VR, as it cannot be converted (PS3.18 8.7.3)
    assert b"transfer-syntax=1.2.840.10008.1.2\r" in stored.content
    for resource in ("/metadata", "/frames/1", "/thumbnail"):
        assert (await app_client.get(inst_url(ds) + resource)).status_code == 200, resource


@pytest.mark.db
@pytest.mark.parametrize("undefined", [False, True])
async def test_c_get_of_a_stored_instance_too_deep_fails_the_sub_operation(
    archive: Archive, caplog: pytest.LogCaptureFixture, undefined: bool
) -> None:
    """A requestor taking Explicit VR Little Endian only, the instance stored implicit VR and
    nested deeper than the limit: the sub-operation fails (0xA702, PS3.4 C.4.3.1.3.2) with the
    reason logged, no traceback (a RecursionError's, reading items of undefined length)."""
    ds = make_instance()
    r = await archive.http.post(
        f"{ROOT}/studies", content=multipart_body([deep_part10(ds, 3, True, undefined)]),
        headers=stow_headers(),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    (path,) = blobs(archive)
    levels = _UNREADABLE_LEVELS if undefined else _LIMIT + 1
    path.write_bytes(deep_part10(ds, levels, True, undefined))
    received: list[Event] = []

    def on_store(event: Event) -> int:
        received.append(event)
        return 0x0000

    with caplog.at_level(logging.ERROR, logger="dicomweb_server.dimse.handlers"):
        statuses = await in_thread(
            get_study, archive, ds.StudyInstanceUID, ds.SOPClassUID, on_store
        )
    assert statuses[-1].Status == 0xA702 and not received
    (record,) = [r for r in caplog.records if r.name == "dicomweb_server.dimse.handlers"]
    assert _REASON in record.getMessage() and record.exc_info is None


@pytest.mark.db
async def test_bulk_data_of_a_stored_instance_too_deep_to_read(
    app_client: httpx.AsyncClient, app: Starlette
) -> None:
    """A bulk data value in an item is found by parsing the file (bulkvalue.bulk_element):
    pydicom's RecursionError on items of undefined length past its stack was a 500 (STYLE:
    never a 5xx for stored data); now a 406 with the reason, as for a conversion."""
    ds = make_instance()
    leaf = element(0x00420011, b"OB", bytes(4096), True)  # Encapsulated Document, bulk data
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([deep_part10(ds, 3, True, True, leaf)]),
        headers=stow_headers(),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    uri = inst_url(ds) + "/bulk/" + "00081140/0/" * 3 + "00420011"
    assert (await app_client.get(uri, headers={"Accept": "*/*"})).status_code == 200
    (inst,) = await app.state.services.index.locate(str(ds.StudyInstanceUID), None, None)
    path = app.state.services.blobs.local_path(inst.blob_key)
    path.write_bytes(deep_part10(ds, _UNREADABLE_LEVELS, True, True, leaf))
    answer = await app_client.get(uri, headers={"Accept": "*/*"})
    assert answer.status_code == 406 and _REASON in answer.text, answer.text


def _deep_within(path: Path, tag: int) -> None:
    """An implicit VR instance whose sequence `tag`, of defined length, holds items of undefined
    length nested past pydicom's recursion limit: pydicom reads a sequence of defined length
    only when it is first used, so the file reads (read_stored) and the failure comes later."""
    ds = make_instance()
    whole = deep_part10(ds, 0, True)
    inner = nested(_UNREADABLE_LEVELS, b"", True, True)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    at = whole.index(struct.pack("<HH", 0x7FE0, 0x0010))  # in tag order: before Pixel Data
    path.write_bytes(whole[:at] + element(tag, b"SQ", item, True) + whole[at:])


def test_a_sequence_too_deep_to_read_when_used_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The conversions (WADO-RS, and a C-GET reading values over 1 KiB deferred) said
    "cannot be written: RecursionError maximum recursion depth exceeded", and a Structured
    Report's rendering was a 500 (a RecursionError); now both give the depth (a 406)."""
    src = tmp_path / "x.dcm"
    _deep_within(src, 0x0040A730)  # Content Sequence
    pydicom.dcmread(src)  # readable: the sequence is left unparsed
    with pytest.raises(TranscodeError, match=_REASON):
        converted_dataset(src, ExplicitVRLittleEndian)
    with pytest.raises(TranscodeError, match=_REASON):
        to_transfer_syntax(src, tmp_path / "y.dcm", ExplicitVRLittleEndian)
    with pytest.raises(ValueError, match=_REASON):  # as dimse.conversion reads it
        check_writable(pydicom.dcmread(src, defer_size=1024))
    for media in ("text/html", "text/plain"):
        with pytest.raises(TranscodeError, match=_REASON):
            render_report(src, media)
