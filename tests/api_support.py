"""Shared by the in-process API tests (tests/test_api*.py): a STOW-RS request, and what the
blob store holds. The names are those the tests had when they were one file."""

from __future__ import annotations

import httpx

from dicomweb_server.config import Settings
from tests.helpers import ROOT, multipart_body, stow_headers


async def stow(
    client: httpx.AsyncClient, *files: bytes, study: str | None = None
) -> httpx.Response:
    url = f"{ROOT}/studies" + (f"/{study}" if study else "")
    return await client.post(url, content=multipart_body(files), headers=stow_headers())


def _blob_contents(settings: Settings) -> list[bytes]:
    root = settings.blob_dir
    return [
        p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "tmp"
    ]
