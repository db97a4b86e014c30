"""STOW, QIDO and WADO through the ASGI app in-process, against a real PostgreSQL: whole flows,
and the requests clients make. Each service on its own: test_api_stow.py (with
test_api_duplicates.py), test_api_qido.py, test_api_wado.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest

from tests.api_support import stow
from tests.helpers import (
    ROOT,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
    values,
)

pytestmark = pytest.mark.db


async def test_store_search_retrieve_round_trip(app_client: httpx.AsyncClient) -> None:
    ds = make_instance(frames=3)
    raw = to_bytes(ds)
    r = await stow(app_client, raw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    ref = values(r.json(), "00081199")[0]
    assert isinstance(ref, dict)
    url = values(ref, "00081190")[0]
    assert url == (
        f"http://testserver{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )

    r = await app_client.get(f"{ROOT}/studies", params={"PatientID": "PAT-1"})
    assert r.status_code == 200
    (study,) = r.json()
    assert values(study, "0020000D") == [ds.StudyInstanceUID]
    assert values(study, "00201208") == [1]
    assert values(study, "00201206") == [1]
    assert values(study, "00080061") == ["CT"]
    assert values(study, "00100010") == [{"Alphabetic": "Doe^John"}]

    r = await app_client.get(
        str(url),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == raw
    assert "transfer-syntax=1.2.840.10008.1.2.1" in headers["content-type"]

    r = await app_client.get(f"{url}/frames/2,3")
    assert r.status_code == 200
    parts = split_multipart(r.content, r.headers["content-type"])
    expected = ds.pixel_array
    assert [p[1] for p in parts] == [expected[1].tobytes(), expected[2].tobytes()]

    r = await app_client.get(f"{url}/metadata")
    (meta,) = r.json()
    assert values(meta, "00080018") == [ds.SOPInstanceUID]
    bulk = meta["7FE00010"]["BulkDataURI"]
    assert bulk.startswith("http://testserver/dicom-web/studies/")
    r = await app_client.get(bulk)
    assert r.status_code == 200
    ((_, pixel_bytes),) = split_multipart(r.content, r.headers["content-type"])
    assert pixel_bytes == ds.PixelData


async def test_uris_keep_the_port_when_host_has_none(app: object) -> None:
    """dicomweb-client sends `Host: 127.0.0.1` without the port; our URIs must still work."""
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        ds = make_instance()
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
            headers={**stow_headers(), "Host": "127.0.0.1"},
        )  # fmt: skip
        ref = values(r.json(), "00081199")[0]
        assert isinstance(ref, dict)
        assert str(values(ref, "00081190")[0]).startswith("http://127.0.0.1:8080/dicom-web/")


async def test_bad_input_battery_keeps_what_was_stored(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    raw = to_bytes(ds)
    assert (await stow(app_client, raw)).status_code == 200
    truncated = multipart_body([raw])[:-40]
    headers = stow_headers()
    bad = [
        app_client.post(f"{ROOT}/studies", content=truncated, headers=headers),
        app_client.post(f"{ROOT}/studies", content=b"\x00" * 5000, headers=headers),
        app_client.post(f"{ROOT}/studies", content=multipart_body([raw[:200]]), headers=headers),
        app_client.post(
            f"{ROOT}/studies/..%2F..%2Fetc", content=multipart_body([raw]), headers=headers
        ),
        app_client.get(f"{ROOT}/studies", params={"StudyInstanceUID": "1'; DELETE FROM instance;"}),
        app_client.get(f"{ROOT}/studies", params={"limit": "-5"}),
        app_client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/series/1.2/instances/1.3/frames/1"),
    ]
    for request in bad:
        r = await request
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
    # Quotes are legal in a PatientID (and in names: O'Brien): a plain, empty result.
    r = await app_client.get(f"{ROOT}/studies", params={"PatientID": "'; DELETE FROM instance; --"})
    assert r.status_code == 204 and r.content == b""
    url = (
        f"{ROOT}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    r = await app_client.get(url, headers={"Accept": "multipart/related; transfer-syntax=*"})
    ((_, body),) = split_multipart(r.content, r.headers["content-type"])
    assert body == raw
    r = await app_client.get(f"{ROOT}/instances")
    assert len(r.json()) == 1


async def test_requests_ohif_makes(app_client: httpx.AsyncClient, samples: Path) -> None:
    """The exact request shapes OHIF v3 sends (issue 5), quoted and unquoted Accept alike."""
    path = samples / "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (await stow(app_client, path.read_bytes())).status_code == 200
    st, se, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    fields = "00081030%2C00080060%2C00080020"
    for extra in ("", f"&StudyInstanceUID={st}", f"&00100020={ds.PatientID}"):
        r = await app_client.get(
            f"{ROOT}/studies?limit=101&offset=0&fuzzymatching=false&includefield={fields}{extra}"
        )
        assert r.status_code == 200 and st in r.text, extra
    r = await app_client.get(
        f"{ROOT}/studies/{st}/series?includefield=00080021%2C00080031%2C0008103E%2C00200011"
    )
    assert r.status_code == 200 and se in r.text
    r = await app_client.get(f"{ROOT}/studies/{st}/series/{se}/metadata")
    assert r.status_code == 200 and r.json()[0]["00080018"]["Value"] == [sop]
    frames = f"{ROOT}/studies/{st}/series/{se}/instances/{sop}/frames/1"
    for accept in (
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
    ):
        r = await app_client.get(frames, headers={"Accept": accept})
        assert r.status_code == 200
        ((headers, body),) = split_multipart(r.content, r.headers["content-type"])
        assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
        assert body[:2] == b"\xff\xd8"
    for resource in ("rendered", "thumbnail"):
        r = await app_client.get(
            f"{ROOT}/studies/{st}/series/{se}/instances/{sop}/{resource}?accept=image/jpeg"
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        r = await app_client.get(f"{ROOT}/studies/{st}/series/{se}/{resource}?accept=image%2Fjpeg")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
