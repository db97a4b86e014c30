"""Shared by the transcoding tests (tests/test_transcode*.py): the JPEG Baseline transfer
syntax, and the transfer syntaxes an instance's metadata offers."""

from __future__ import annotations

import httpx
import pydicom

from tests.helpers import inst_url

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


async def available(client: httpx.AsyncClient, ds: pydicom.Dataset) -> list[str]:
    (meta,) = (await client.get(f"{inst_url(ds)}/metadata")).json()
    return list(meta["00083002"]["Value"])
