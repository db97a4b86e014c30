"""Building DICOM test data and multipart bodies."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import anyio
import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from starlette.applications import Starlette

from dicomweb_server.config import Settings
from dicomweb_server.media.part10 import LONG_LENGTH_VRS

BOUNDARY = "test-boundary-1234"
# Host names the in-process test clients use; `--auth none` answers only names it is told of.
TEST_HOSTS = ("testserver", "t", "archive.internal")
ROOT = "/dicom-web"
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")


def make_instance(
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    patient_id: str = "PAT-1",
    patient_name: str = "Doe^John",
    study_date: str = "20240115",
    modality: str = "CT",
    frames: int = 1,
    rows: int = 4,
    cols: int = 4,
    **extra: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop) if sop else generate_uid()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID(study) if study else generate_uid()
    ds.SeriesInstanceUID = UID(series) if series else generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.Modality = modality
    ds.AccessionNumber = "ACC1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = np.arange(frames * rows * cols, dtype=np.uint16).reshape(frames, rows, cols)
    ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def float_map(ts: str, frames: int, rows: int, cols: int, double: bool = False) -> Dataset:
    """A Parametric Map in `ts` whose pixels are Float (Double Float) Pixel Data, no Pixel
    Data, varied values (a wrong swap shows), private elements after them."""
    ds = make_instance(rows=rows, cols=cols, modality="OT")
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(PARAMETRIC_MAP_STORAGE)
    ds.BitsAllocated = 64 if double else 32
    ds.NumberOfFrames = frames
    values = (np.arange(frames * rows * cols) % 100003) * 1.37 - 5000.25
    if double:
        ds.DoubleFloatPixelData = values.astype("<f8").tobytes()
    else:
        ds.FloatPixelData = values.astype("<f4").tobytes()
    ds.add_new(0x7FE10010, "LO", "ACME")  # private elements after them
    ds.add_new(0x7FE11001, "OB", b"\x01\x02\x03")
    return ds


def element_bytes(tag: int, vr: bytes, value: bytes, reserved: int = 0) -> bytes:
    """One data element in explicit VR little endian, written by hand (for malformed files):
    an odd value padded, a long-length VR's 2 reserved bytes holding `reserved`."""
    if len(value) % 2:
        value += b"\0"
    if vr in LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, reserved, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# The scan header of JPEG-lossy.dcm's one frame (a 12-bit JPEG Extended file of pydicom's):
# SOS, length 8, one component, its selector 1 (ITU-T T.81 B.2.3), Ss 0, Se 0, Ah Al 0.
_LOSSY_SCAN = bytes.fromhex("ffda0008010100")


def undecodable_jpeg(lossy: bytes) -> bytes:
    """JPEG-lossy.dcm (the bytes given) with its scan naming component 9, which its frame has
    not: a file of a transfer syntax that has decoders, every installed one refusing its
    frame (pylibjpeg, Pillow and the fallback's libjpeg-turbo). The file itself is decoded
    by the fallback now."""
    assert lossy.count(_LOSSY_SCAN) == 1
    return lossy.replace(_LOSSY_SCAN, _LOSSY_SCAN[:5] + b"\x09" + _LOSSY_SCAN[6:])


def ending_in_a_sequence() -> bytes:
    """A data set with no Pixel Data whose last element is a sequence of defined length (as
    pydicom writes it): an SR or a presentation state ends like this."""
    ds = make_instance()
    del ds.PixelData
    item = Dataset()
    item.CodeValue = "12345"
    item.CodeMeaning = "a meaning long enough to be cut"
    ds.PerformedProtocolCodeSequence = [item]
    return to_bytes(ds)


def multipart_body(
    parts: Iterable[bytes], boundary: str = BOUNDARY, part_type: str | None = "application/dicom"
) -> bytes:
    out = bytearray()
    for part in parts:
        out += f"--{boundary}\r\n".encode()
        if part_type:
            out += f"Content-Type: {part_type}\r\n".encode()
        out += b"\r\n" + part + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def stow_headers(boundary: str = BOUNDARY) -> dict[str, str]:
    return {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related response (test-side parser, deliberately simple)."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"')
    delim = b"--" + boundary.encode()
    chunks = body.split(b"\r\n" + delim)
    first = chunks[0]
    assert first.startswith(delim), "body must start with the boundary"
    chunks[0] = first[len(delim) :]
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n"):
            if b":" in line:
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, data))
    return parts


def values(doc: dict[str, object], tag: str) -> Sequence[object]:
    element = doc.get(tag)
    assert isinstance(element, dict), f"{tag} missing in {sorted(doc)}"
    v = element.get("Value", [])
    assert isinstance(v, list)
    return v


async def pending_reservations(conn: Any, index: Any) -> int:
    """Reservation rows other than the index's spare keys (none once every store finished)."""
    n = await conn.fetchval(
        "SELECT count(*) FROM blob_reservation WHERE NOT blob_key = ANY($1::text[])",
        list(index.spare_keys),
    )
    return int(n)


def inst_url(ds: Dataset) -> str:
    """The root-relative WADO-RS URL of an instance."""
    return (
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m dicomweb_server ARGS` in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dicomweb_server", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@contextlib.asynccontextmanager
async def app_process(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """An app with services of its own, as a process of `serve --workers N` has (a database
    pool, a process lock, caches), and an in-process client of it. Several over the same
    settings share the database and the blob store as such processes do."""
    from dicomweb_server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield app, c


async def studies_named(client: httpx.AsyncClient, names: dict[str, str]) -> Any:
    """Stores one study per name of `names` (key: its Patient ID); returns a QIDO-RS study
    search, `found(**params)`, giving the keys of the names found, sorted."""
    made = {
        k: make_instance(patient_name=v, patient_id=k, SpecificCharacterSet="ISO_IR 192")
        for k, v in names.items()
    }
    body = multipart_body([to_bytes(ds) for ds in made.values()])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    by_uid = {ds.StudyInstanceUID: k for k, ds in made.items()}

    async def found(**params: str) -> list[str]:
        r = await client.get(f"{ROOT}/studies", params=params)
        assert r.status_code in (200, 204), r.text
        return sorted(
            by_uid[str(values(s, "0020000D")[0])] for s in (r.json() if r.content else [])
        )

    return found


async def asgi_get(
    app: Any, path: str, headers: list[tuple[bytes, bytes]] | None = None, query: str = ""
) -> tuple[int, int, bool]:
    """(status, body length, whether the body was finished) of a GET through the app, its
    body dropped as it is sent (a client's buffer is not the server's memory)."""
    got = {"status": 0, "length": 0, "ended": False}

    async def receive() -> dict[str, Any]:  # the client waits: asked for, it never leaves
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            got["status"] = message["status"]
        elif message["type"] == "http.response.body":
            got["length"] += len(message.get("body", b""))
            got["ended"] = not message.get("more_body", False)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(),
             "headers": [(b"host", b"testserver"), *(headers or [])],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}  # fmt: skip
    await app(scope, receive, send)
    return int(got["status"]), int(got["length"]), bool(got["ended"])
