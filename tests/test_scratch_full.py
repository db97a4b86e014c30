"""The scratch directory's filesystem full (a real, small tmpfs mounted there, filled) while a
WADO-RS request writes a scratch file: an inflated copy, a converted instance, a rendering.

The client gets a 503 with Retry-After and a reason that names no path; the partial file goes,
what is stored is untouched, the operator's log names the directory once; and once space is
back the same request succeeds (no partial inflated copy kept for the next one). A study
whose later instance cannot be converted so is cut short, as any later failure cuts it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from starlette.applications import Starlette

from dicomweb_server.blobstore.files import SCRATCH_FULL_MESSAGE, SCRATCH_FULL_RETRY_S
from tests.helpers import ROOT, multipart_body, split_multipart, stow_headers

pytestmark = pytest.mark.db

# Size of the scratch directory's filesystem: room for the smaller conversion of the study
# below, not for the larger one (a 1024 x 1024 16-bit frame, 2 MiB uncompressed).
SCRATCH_FS = "4m"
# Bytes left free by `fill(room)` in the study test: the first instance's conversion
# (about 130 KiB) fits, the second's does not.
ROOM_BYTES = 1024 * 1024
DEFLATED = "generated/coverage/dx_deflated.dcm"
J2K = "generated/coverage/ct_j2k_lossless_signed.dcm"
J2K_LARGE = "real/pydicom-data/MR2_J2KR.dcm"
EXPLICIT = "1.2.840.10008.1.2.1"
LOGGER = "dicomweb_server"
# Bytes left free in the pydicom-writer test: more than a file's buffer (8 KiB), less than
# the value pydicom writes (the Deflated instance's 160 KiB of pixels, 128 KiB of overlay).
PYDICOM_ROOM_BYTES = 64 * 1024


class Scratch:
    """The app's scratch directory, on a tmpfs of its own once mounted (after the instances
    are stored: STOW spools there and renames into the blob store, which a rename across
    filesystems cannot), filled on demand (a filler file written until the filesystem
    refuses more, then cut back to leave `room` bytes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.filler = directory / "filler"
        self.mounted = False

    def mount(self) -> None:
        size = f"size={SCRATCH_FS}"
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(self.directory)], check=True
        )
        self.mounted = True

    def fill(self, room: int = 0) -> None:
        if not self.mounted:
            self.mount()
        chunk = b"\0" * 65536
        with self.filler.open("wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            if room:
                fh.truncate(max(0, fh.tell() - room))

    def free(self) -> None:
        self.filler.unlink()

    def others(self) -> list[Path]:
        """What the server left in the directory (its kept inflated copies included)."""
        return sorted(p for p in self.directory.rglob("*") if p != self.filler)


@pytest.fixture
def scratch(app: Starlette) -> Iterator[Scratch]:
    """The started app's scratch directory, to mount a tmpfs on (root is needed to mount, as
    in test_faults.py), unmounted before the app stops."""
    made = Scratch(app.state.services.scratch_dir)
    try:
        yield made
    finally:
        if made.mounted:
            subprocess.run(["umount", "-l", str(made.directory)], check=False)


def _client(app: Starlette, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def _store(app: Starlette, *files: bytes) -> None:
    async with _client(app) as client:
        for data in files:  # one request each: the study lists them in this order
            r = await client.post(
                f"{ROOT}/studies", content=multipart_body([data]), headers=stow_headers()
            )
            assert r.status_code == 200, r.text


def _url(ds: pydicom.Dataset) -> str:
    return (
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _stored(app: Starlette) -> dict[Path, str]:
    """Every stored blob and the digest of its bytes."""
    root: Path = app.state.services.blobs.root
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "tmp"
    }


def _check_unavailable(r: httpx.Response, scratch: Scratch) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == str(SCRATCH_FULL_RETRY_S)
    assert r.json() == {"status": 503, "message": SCRATCH_FULL_MESSAGE}
    assert str(scratch.directory) not in r.text  # where it is: the operator's log says
    assert "scratch space is full" in SCRATCH_FULL_MESSAGE


def _logged_once(caplog: pytest.LogCaptureFixture, scratch: Scratch) -> None:
    """One error naming the directory; no traceback of an unexpected error."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert str(scratch.directory) in errors[0].getMessage()
    assert errors[0].exc_info is None


@pytest.mark.parametrize("resource", ["frames", "rendered", "thumbnail", "bulkdata"])
async def test_a_deflated_instance_read_while_the_scratch_space_is_full(
    app: Starlette,
    scratch: Scratch,
    samples: Path,
    resource: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its frame (decoded), its renderings and its Pixel Data (bulk data) are read from a copy
    inflated into the scratch directory: full, that is a 503, no partial copy is kept, and
    the same request once space is back gets the pixels."""
    data = (samples / DEFLATED).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    await _store(app, data)
    stored = _stored(app)
    url, accept = {
        "frames": (f"{_url(ds)}/frames/1", 'multipart/related; type="application/octet-stream"'),
        "rendered": (f"{_url(ds)}/rendered", "image/png"),
        "thumbnail": (f"{_url(ds)}/thumbnail", "image/png"),  # not its icon, then cached
        "bulkdata": (f"{_url(ds)}/bulk/7FE00010", "application/octet-stream"),
    }[resource]
    scratch.fill()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with _client(app) as client:
        r = await client.get(url, headers={"Accept": accept})
        _check_unavailable(r, scratch)
        _logged_once(caplog, scratch)
        assert scratch.others() == [], "a partial inflated copy was left behind"
        assert _stored(app) == stored
        scratch.free()
        r = await client.get(url, headers={"Accept": accept})
        assert r.status_code == 200, r.text
        if resource == "frames":
            ((_, frame),) = split_multipart(r.content, r.headers["content-type"])
            assert frame == ds.PixelData
        elif resource == "bulkdata":
            assert r.content == ds.PixelData
        else:
            assert r.content.startswith(b"\x89PNG")
    assert _stored(app) == stored


async def test_an_instance_converted_while_the_scratch_space_is_full(
    app: Starlette, scratch: Scratch, samples: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JPEG 2000 instance asked for in Explicit VR Little Endian is converted into a
    scratch file: full, a 503 before the response starts, the partial file removed; with
    space back, the converted instance."""
    data = (samples / J2K).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    await _store(app, data)
    stored = _stored(app)
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
    scratch.fill()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with _client(app) as client:
        r = await client.get(_url(ds), headers={"Accept": accept})
        _check_unavailable(r, scratch)
        _logged_once(caplog, scratch)
        assert scratch.others() == []
        assert _stored(app) == stored
        scratch.free()
        r = await client.get(_url(ds), headers={"Accept": accept})
        assert r.status_code == 200, r.text
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT}"
    converted = pydicom.dcmread(io.BytesIO(body))
    assert converted.file_meta.TransferSyntaxUID == EXPLICIT
    assert (converted.pixel_array == ds.pixel_array).all()
    assert scratch.others() == []
    assert _stored(app) == stored


async def test_a_later_instance_of_a_study_converted_while_the_scratch_space_fills(
    app: Starlette, scratch: Scratch, samples: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first instance of a study converts and is sent (the 200 is out); the second does
    not fit: the body ends without its closing delimiter, as it does for any later instance
    that fails (conformance statement, WADO-RS), the partial file goes, the log names the
    directory once. With space back the whole study comes."""
    small = pydicom.dcmread(samples / J2K)
    large = pydicom.dcmread(samples / J2K_LARGE)
    large.StudyInstanceUID = small.StudyInstanceUID
    large.SeriesInstanceUID = small.SeriesInstanceUID  # a series lists its instances in order
    large.SOPInstanceUID = large.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    large.PatientID, large.PatientName = small.PatientID, small.PatientName
    out = io.BytesIO()
    large.save_as(out, enforce_file_format=True)
    await _store(app, (samples / J2K).read_bytes(), out.getvalue())
    stored = _stored(app)
    url = f"{ROOT}/studies/{small.StudyInstanceUID}"
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
    scratch.fill(ROOM_BYTES)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with _client(app, raise_app_exceptions=False) as client:
        r = await client.get(url, headers={"Accept": accept})
    assert r.status_code == 200  # sent with the first part, before the second failed
    boundary = r.headers["content-type"].split("boundary=")[1]
    assert not r.content.endswith(f"--{boundary}--\r\n".encode()), "the body looks whole"
    first = split_multipart(r.content, r.headers["content-type"])[0][1]
    assert pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID == small.SOPInstanceUID
    _logged_once(caplog, scratch)
    cut = [r for r in caplog.records if "cut short" in r.getMessage()]
    assert len(cut) == 1 and SCRATCH_FULL_MESSAGE in cut[0].getMessage()
    assert scratch.others() == [], "the partial conversion was left behind"
    assert _stored(app) == stored
    scratch.free()
    async with _client(app) as client:
        r = await client.get(url, headers={"Accept": accept})
    assert r.status_code == 200
    parts = split_multipart(r.content, r.headers["content-type"])
    uids = [pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID for _, body in parts]
    assert uids == [small.SOPInstanceUID, large.SOPInstanceUID]
    boundary = r.headers["content-type"].split("boundary=")[1]
    assert r.content.endswith(f"--{boundary}--\r\n".encode())
    assert scratch.others() == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_what_counts_as_the_scratch_space_full(
    tmp_path: Path, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A quota spent (EDQUOT) is the same 503 as a full filesystem (no quota is set up here
    to meet it for real); any other I/O error passes through as it is (a 500)."""
    from dicomweb_server.blobstore.files import scratch_space
    from dicomweb_server.errors import ServiceUnavailableError

    failure = OSError(code, os.strerror(code))
    expected: type[Exception] = OSError if code == errno.EIO else ServiceUnavailableError
    with pytest.raises(expected) as raised, scratch_space(tmp_path):
        raise failure
    if code == errno.EIO:
        assert raised.value is failure and not caplog.records
    else:
        assert isinstance(raised.value, ServiceUnavailableError)
        assert raised.value.headers == {"Retry-After": str(SCRATCH_FULL_RETRY_S)}
        (record,) = caplog.records
        assert str(tmp_path) in record.getMessage() and record.levelno == logging.ERROR


def _with_overlay(samples: Path) -> bytes:
    """The JPEG 2000 instance with Overlay Data of 128 KiB, before its Pixel Data: a value
    pydicom's writer writes into the header of the converted file."""
    ds = pydicom.dcmread(samples / J2K)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x60000010, "US", 1024)  # Overlay Rows
    ds.add_new(0x60000011, "US", 1024)  # Overlay Columns
    ds.add_new(0x60000040, "CS", "G")  # Overlay Type
    ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
    ds.add_new(0x60000100, "US", 1)  # Overlay Bits Allocated
    ds.add_new(0x60000102, "US", 0)  # Overlay Bit Position
    ds.add_new(0x60003000, "OW", b"\x55" * (1024 * 1024 // 8))  # Overlay Data
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["deflated", "header"])
async def test_a_value_written_by_pydicom_while_the_scratch_space_is_full(
    app: Starlette,
    scratch: Scratch,
    samples: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where pydicom's writer writes into the scratch file (a Deflated instance converted
    whole, the header of a streamed conversion), it re-raises the write's OSError as a new
    OSError of its message alone, without its errno (pydicom.tag.tag_in_exception): the
    scratch space full was a 500 whenever the file's buffer was written out before (some
    room left, not none: with none, closing the file failed again, with the errno). It is
    the same 503 as elsewhere."""
    data = (samples / DEFLATED).read_bytes() if kind == "deflated" else _with_overlay(samples)
    ds = pydicom.dcmread(io.BytesIO(data))
    await _store(app, data)
    stored = _stored(app)
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT}'
    scratch.fill(PYDICOM_ROOM_BYTES)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with _client(app, raise_app_exceptions=False) as client:
        r = await client.get(_url(ds), headers={"Accept": accept})
        _check_unavailable(r, scratch)
        _logged_once(caplog, scratch)
        (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert error.endswith(os.strerror(errno.ENOSPC))  # the system's reason, not None
        assert scratch.others() == []
        scratch.free()
        r = await client.get(_url(ds), headers={"Accept": accept})
        assert r.status_code == 200, r.text
        ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    converted = pydicom.dcmread(io.BytesIO(body))
    assert converted.file_meta.TransferSyntaxUID == EXPLICIT
    assert converted.PixelData == pydicom.dcmread(io.BytesIO(data)).pixel_array.tobytes()
    assert _stored(app) == stored


def test_a_full_scratch_space_under_pydicoms_wrapping(tmp_path: Path) -> None:
    """An OSError re-raised by pydicom's writer (a new OSError without an errno, raised from
    the write's; once more per enclosing sequence) is still the scratch space full; an
    OSError raised from anything else is not."""
    from dicomweb_server.blobstore.files import scratch_space
    from dicomweb_server.errors import ServiceUnavailableError

    def wrapped(cause: BaseException, times: int) -> OSError:
        exc = cause
        for _ in range(times):
            try:
                raise OSError(f"With tag (0008,1115) got exception: {exc}") from exc
            except OSError as again:
                exc = again
        assert isinstance(exc, OSError)
        return exc

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(ServiceUnavailableError), scratch_space(tmp_path):
        raise wrapped(full, 3)
    other = wrapped(ValueError("not a disk"), 1)
    with pytest.raises(OSError) as raised, scratch_space(tmp_path):
        raise other
    assert raised.value is other
