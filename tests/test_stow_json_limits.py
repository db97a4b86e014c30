"""STOW-RS of metadata and bulk data: each limit at its edge (MAX_JSON_METADATA_BYTES,
MAX_JSON_BULK_VALUE_BYTES, MAX_JSON_DATASETS, MAX_JSON_BULK_REUSE_BYTES), a limit the
request passed not audited as the archive's failure, and the memory bulk data parts hold."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from starlette.applications import Starlette

from dicomweb_server import stow_json
from tests.helpers import ROOT, make_instance, values
from tests.stow_json_support import _body, _metadata, _post, _seq

pytestmark = pytest.mark.db


async def test_metadata_part_limit_at_the_edge(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_instance()
    text = json.dumps([_metadata(ds, "u:1")]).encode()
    bulk = ("u:1", "application/octet-stream", ds.PixelData)
    monkeypatch.setattr(stow_json, "MAX_JSON_METADATA_BYTES", len(text))
    assert (await _post(app_client, _body(text, bulk))).status_code == 200
    monkeypatch.setattr(stow_json, "MAX_JSON_METADATA_BYTES", len(text) - 1)
    r = await _post(app_client, _body(text, bulk))
    assert r.status_code == 413 and "metadata part" in r.json()["message"]


async def test_bulk_value_limit_at_the_edge(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-pixel bulk data value (here an encapsulated document) is read into the data set:
    at most MAX_JSON_BULK_VALUE_BYTES, else that instance fails (0xA700), a limit the
    request passed: audited as a refused request, not the archive out of resources."""
    pdf = b"%PDF-1.4 " + b"x" * 991
    docs = []
    for _ in range(2):
        ds = make_instance()
        del ds.PixelData
        doc = ds.to_json_dict()
        doc["00420011"] = {"vr": "OB", "BulkDataURI": "u:pdf"}
        docs.append(doc)
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", len(pdf))
    r = await _post(app_client, _body(docs[:1], ("u:pdf", "application/pdf", pdf)))
    assert r.status_code == 200, r.text
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", len(pdf) - 1)
    r = await _post(app_client, _body(docs[1:], ("u:pdf", "application/pdf", pdf)))
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xA700]
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT detail FROM audit_log WHERE action = 'store_instances' ORDER BY seq DESC LIMIT 1"
    )
    assert rows[0]["detail"] == "stored=0 failed=1"  # not ARCHIVE_FAULT: exported 4


async def test_data_sets_are_checked_before_any_is_stored(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_JSON_DATASETS data sets (413), every one an object (400), nesting JSON
    cannot hold (400): refused before anything is stored."""
    docs = [_metadata(make_instance(), "u:px") for _ in range(3)]
    px = ("u:px", "application/octet-stream", make_instance().PixelData)
    monkeypatch.setattr(stow_json, "MAX_JSON_DATASETS", 2)
    r = await _post(app_client, _body(docs, px))
    assert r.status_code == 413 and "at most 2" in r.json()["message"]
    r = await _post(app_client, _body([docs[0], 1], px))
    assert r.status_code == 400 and "object" in r.json()["message"]
    r = await _post(app_client, _body(b"[" * 100_000 + b"]" * 100_000))
    assert r.status_code == 400
    uid = str(values(docs[0], "00080018")[0])
    assert (
        await app_client.get(f"{ROOT}/instances", params={"SOPInstanceUID": uid})
    ).status_code == 204
    r = await _post(app_client, _body(docs[:2], px))
    assert r.status_code == 200, r.text


async def test_bulk_budget_counts_every_value_of_a_data_set(
    app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_instance()
    del ds.PixelData
    doc = ds.to_json_dict()
    blob = b"x" * 100
    doc["00091010"] = {"vr": "OB", "BulkDataURI": "u:blob"}
    doc["00091011"] = {"vr": "OB", "BulkDataURI": "u:blob"}
    doc["00090010"] = {"vr": "LO", "Value": ["TEST"]}
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_VALUE_BYTES", 2 * len(blob) - 1)
    r = await _post(app_client, _body([doc], ("u:blob", "application/octet-stream", blob)))
    assert r.status_code == 409
    assert values(_seq(r.json(), "00081198")[0], "00081197") == [0xA700]


async def test_bulk_reuse_limit_at_the_edge(
    app: Starlette, app_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data sets naming the same bulk data part copy it each: a request copies at most what
    it sent plus MAX_JSON_BULK_REUSE_BYTES (one 4 MiB part named by 50 data sets wrote 201
    MiB). Three data sets of one part of P bytes need 2P more: with exactly that all are
    stored, with a byte less the third fails (0xA700), a limit the request passed: not
    counted as the archive's failure in the audit trail (no ARCHIVE_FAULT)."""
    pixels = make_instance().PixelData

    def docs() -> list[dict[str, Any]]:
        return [_metadata(make_instance(), "u:px") for _ in range(3)]

    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_REUSE_BYTES", 2 * len(pixels))
    r = await _post(app_client, _body(docs(), ("u:px", "application/octet-stream", pixels)))
    assert r.status_code == 200, r.text
    monkeypatch.setattr(stow_json, "MAX_JSON_BULK_REUSE_BYTES", 2 * len(pixels) - 1)
    sent = docs()
    r = await _post(app_client, _body(sent, ("u:px", "application/octet-stream", pixels)))
    assert r.status_code == 202, r.text
    (failed,) = _seq(r.json(), "00081198")
    assert values(failed, "00081197") == [0xA700]
    assert values(failed, "00081155") == sent[2]["00080018"]["Value"]
    await app.state.audit.flush()
    rows = await app.state.services.index._fetch(
        "SELECT detail FROM audit_log WHERE action = 'store_instances' ORDER BY seq DESC LIMIT 1"
    )
    assert rows[0]["detail"] == "stored=2 failed=1"


async def test_bulk_data_parts_keep_no_bytes_in_memory(app_client: httpx.AsyncClient) -> None:
    """Bulk data parts are spooled to files, all of them kept until the metadata is read;
    each kept the hash of its spool file too, with up to 128 KiB of its last bytes (an
    instance's DataSetHash): a request of 10,000 frame parts (MAX_PARTS) held 830 MB. Now a
    part keeps its file's name and size."""
    from pydicom.pixels.encoders.base import get_encoder

    count, side = 100, 256
    rng = np.random.default_rng(5)
    noise = [rng.integers(0, 4096, (side, side), dtype=np.uint16) for _ in range(4)]
    jls = pydicom.uid.JPEGLSLossless
    encoder = get_encoder(jls)
    pixel: dict[str, Any] = {"rows": side, "columns": side, "samples_per_pixel": 1,
             "bits_allocated": 16, "bits_stored": 12, "pixel_representation": 0,
             "number_of_frames": 1, "photometric_interpretation": "MONOCHROME2"}  # fmt: skip
    frames = [encoder.encode(a, **pixel) for a in noise]
    ds = make_instance(rows=side, cols=side, frames=count, BitsStored=12, HighBit=11)
    doc = _metadata(ds, "/frames-of/1")
    parts = [("/frames-of/1", f"image/jls; transfer-syntax={jls}", frames[n % 4])
             for n in range(count)]  # fmt: skip
    body = _body([doc], *parts)
    held = sum(min(len(frames[n % 4]), 64 * 1024) for n in range(count))  # 6.4 MB
    tracemalloc.start()
    try:
        r = await _post(app_client, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    # httpx's ASGI transport hands the app a copy of the body (10 MB): the rest is the
    # server's. It held `held` more (21 MB in all).
    assert peak < len(body) + held // 2, (peak, len(body), held)
