"""Shared by the tests of STOW-RS of metadata and bulk data (tests/test_stow_json*.py): the
request's body and its POST, the metadata of an instance whose Pixel Data is a BulkDataURI,
the items of a sequence of the response. The names are those the tests had when they were
one file."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pydicom

from tests.helpers import ROOT, values

BOUNDARY = "json-boundary"
JSON_STOW = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _body(metadata: Any, *bulk: tuple[str, str, bytes]) -> bytes:
    """The metadata part (a JSON value, or raw bytes), then (Content-Location, Content-Type,
    value) bulk data parts."""
    text = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    out = bytearray(f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode())
    out += text + b"\r\n"
    for location, ctype, value in bulk:
        head = f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\nContent-Location: {location}\r\n\r\n"
        out += head.encode() + value + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


def _metadata(ds: pydicom.Dataset, pixel_uri: str) -> dict[str, Any]:
    doc = ds.to_json_dict(bulk_data_threshold=1 << 30)
    doc.pop("7FE00010", None)
    doc["7FE00010"] = {"vr": "OB", "BulkDataURI": pixel_uri}
    return doc


def _seq(doc: Any, tag: str) -> list[dict[str, object]]:
    """The items of a sequence of a DICOM JSON document."""
    items = values(doc, tag)
    assert all(isinstance(i, dict) for i in items)
    return [i for i in items if isinstance(i, dict)]


async def _post(client: httpx.AsyncClient, body: bytes, path: str = "/studies") -> httpx.Response:
    headers = {"Content-Type": JSON_STOW, "Accept": "application/dicom+json"}
    return await client.post(f"{ROOT}{path}", content=body, headers=headers)
