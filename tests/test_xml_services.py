"""DICOM XML through the services (PS3.18 10.4.4, 10.5, 10.6; PS3.19 A.1): metadata and
QIDO results as `multipart/related; type="application/dicom+xml"`, the STOW response as
`application/dicom+xml`, and STOW-RS of XML metadata with its bulk data."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomweb_server.dicom_xml import MAX_XML_DEPTH, NATIVE_DICOM_NS, dataset_from_xml, dataset_xml
from dicomweb_server.routes.responses import XML_INLINE_DOCS
from dicomweb_server.stow_json import MAX_JSON_METADATA_BYTES, MAX_JSON_SEQUENCE_DEPTH
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    split_multipart,
    stow_headers,
    to_bytes,
)

pytestmark = pytest.mark.db

XML_PARTS = 'multipart/related; type="application/dicom+xml"'
NS = f"{{{NATIVE_DICOM_NS}}}"
BOUNDARY = "xml-boundary"


async def _store(client: httpx.AsyncClient, *instances: pydicom.Dataset) -> None:
    body = multipart_body([to_bytes(ds) for ds in instances])
    r = await client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text


def _xml_parts(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(XML_PARTS + "; boundary=")
    parts = split_multipart(r.content, r.headers["content-type"])
    assert all(h["content-type"] == "application/dicom+xml" for h, _ in parts)
    return [dataset_from_xml(body) for _, body in parts]


def _same_as_json(xml_doc: dict[str, Any], json_doc: dict[str, Any]) -> bool:
    """The XML's data set is the JSON's, up to what XML keeps as text (DS/IS numbers)."""
    return dataset_from_xml(dataset_xml(json_doc)) == xml_doc


async def test_metadata_in_xml_at_every_level(app_client: httpx.AsyncClient) -> None:
    a = make_instance(PatientName="Müller^Jürgen")
    value = b"40,5"  # a decimal comma, kept as sent; pydicom would refuse to convert it
    a._dict[Tag(0x00281050)] = RawDataElement(Tag(0x00281050), "DS", 4, value, 0, False, True)
    b = make_instance(study=a.StudyInstanceUID, series=a.SeriesInstanceUID, InstanceNumber=2)
    await _store(app_client, a, b)
    series_url = f"{ROOT}/studies/{a.StudyInstanceUID}/series/{a.SeriesInstanceUID}"
    for url, count in (
        (f"{ROOT}/studies/{a.StudyInstanceUID}/metadata", 2),
        (f"{series_url}/metadata", 2),
        (f"{inst_url(a)}/metadata", 1),
    ):
        as_json = (await app_client.get(url)).json()
        r = await app_client.get(url, headers={"Accept": XML_PARTS})
        docs = _xml_parts(r)
        assert len(docs) == count
        by_sop = {d["00080018"]["Value"][0]: d for d in docs}
        for j in as_json:
            assert _same_as_json(by_sop[j["00080018"]["Value"][0]], j)
    (doc,) = _xml_parts(
        await app_client.get(f"{inst_url(a)}/metadata", headers={"Accept": XML_PARTS})
    )
    assert doc["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert doc["00281050"]["Value"] == ["40,5"]
    assert doc["7FE00010"]["BulkDataURI"].endswith(f"{inst_url(a)}/bulk/7FE00010")


async def test_xml_negotiation(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    await _store(app_client, ds)
    study_url = f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata"
    # multipart/related with no type: the only multipart representation of metadata is XML
    assert (
        len(_xml_parts(await app_client.get(study_url, headers={"Accept": "multipart/related"})))
        == 1
    )
    # a bare application/dicom+xml is one document: for an instance, not for a study
    r = await app_client.get(
        f"{inst_url(ds)}/metadata", headers={"Accept": "application/dicom+xml"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+xml"
    assert ET.fromstring(r.content).tag == NS + "NativeDicomModel"
    r = await app_client.get(study_url, headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406 and "application/dicom+xml" in r.text
    # the accept query parameter overrides the header (PS3.18 8.3.3.1); JSON stays default
    r = await app_client.get(study_url, params={"accept": XML_PARTS}, headers={"Accept": "x/y"})
    assert len(_xml_parts(r)) == 1
    r = await app_client.get(study_url, headers={"Accept": "*/*"})
    assert r.headers["content-type"] == "application/dicom+json"
    r = await app_client.get(
        study_url, headers={"Accept": f"{XML_PARTS}, application/dicom+json;q=0.5"}
    )
    assert r.headers["content-type"].startswith(XML_PARTS)


async def test_xml_metadata_is_cached_with_a_stable_etag_and_gzip(
    app_client: httpx.AsyncClient,
) -> None:
    ds = make_instance(ImageComments="x" * 2000)
    await _store(app_client, ds)
    url = f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata"
    first = await app_client.get(url, headers={"Accept": XML_PARTS, "Accept-Encoding": "identity"})
    second = await app_client.get(url, headers={"Accept": XML_PARTS, "Accept-Encoding": "identity"})
    assert first.content == second.content  # the boundary, too, is the same
    assert first.headers["etag"] == second.headers["etag"]
    json_etag = (await app_client.get(url, headers={"Accept-Encoding": "identity"})).headers["etag"]
    assert json_etag != first.headers["etag"]
    r = await app_client.get(
        url,
        headers={
            "Accept": XML_PARTS, "If-None-Match": first.headers["etag"], "Accept-Encoding": ""
        },
    )  # fmt: skip
    assert r.status_code == 304
    r = await app_client.get(url, headers={"Accept": XML_PARTS, "Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.content == first.content  # httpx decodes
    assert r.headers["etag"] == first.headers["etag"][:-1] + '-gzip"'  # its own (RFC 9110 8.8.3.3)
    # the same URL answers JSON or XML: caches must key on Accept as well
    assert {"Accept", "Accept-Encoding"} <= {v.strip() for v in r.headers["vary"].split(",")}


async def test_qido_results_in_xml(app_client: httpx.AsyncClient) -> None:
    a = make_instance(patient_id="XML-1")
    b = make_instance(patient_id="XML-1")
    await _store(app_client, a, b)
    as_json = (await app_client.get(f"{ROOT}/studies", params={"PatientID": "XML-1"})).json()
    r = await app_client.get(
        f"{ROOT}/studies", params={"PatientID": "XML-1"}, headers={"Accept": XML_PARTS}
    )
    docs = _xml_parts(r)
    assert len(docs) == len(as_json) == 2
    by_study = {d["0020000D"]["Value"][0]: d for d in docs}
    for j in as_json:
        assert _same_as_json(by_study[j["0020000D"]["Value"][0]], j)
    r = await app_client.get(
        f"{ROOT}/studies", params={"PatientID": "NOBODY"}, headers={"Accept": XML_PARTS}
    )
    assert r.status_code == 204 and r.content == b""
    r = await app_client.get(f"{ROOT}/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


async def test_stow_response_in_xml(app_client: httpx.AsyncClient) -> None:
    ds = make_instance()
    headers = {**stow_headers(), "Accept": "application/dicom+xml"}
    body = multipart_body([to_bytes(ds), b"not dicom"])
    r = await app_client.post(f"{ROOT}/studies", content=body, headers=headers)
    assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+xml"
    doc = dataset_from_xml(r.content)
    (ok,) = doc["00081199"]["Value"]
    assert ok["00081155"]["Value"] == [ds.SOPInstanceUID]
    (failed,) = doc["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    # asked as multipart/related (PS3.18 Example B.23): the same document, as one part
    headers["Accept"] = XML_PARTS
    r = await app_client.post(f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
                              headers=headers)  # fmt: skip
    (doc,) = _xml_parts(r)
    assert doc["00081199"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]


def _xml_stow_body(*parts: tuple[str, str | None, bytes]) -> bytes:
    """(Content-Type, Content-Location, body) parts."""
    out = bytearray()
    for ctype, location, data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n".encode()
        if location:
            out += f"Content-Location: {location}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


async def _post_xml(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json",
    }
    return await client.post(f"{ROOT}/studies", content=body, headers=headers)


def _metadata_xml(ds: pydicom.Dataset, pixel_uri: str) -> bytes:
    doc = ds.to_json_dict(bulk_data_threshold=1 << 30)
    doc["7FE00010"] = {"vr": "OW", "BulkDataURI": pixel_uri}
    return dataset_xml(doc)


async def test_stow_of_xml_metadata_and_bulk_data(app_client: httpx.AsyncClient) -> None:
    a = make_instance(rows=6, cols=5, frames=2)
    b = make_instance(study=a.StudyInstanceUID)
    b.add_new(0x00290010, "LO", "ACME 1.0")
    b.add_new(0x00291010, "LO", "private in block 10")
    r = await _post_xml(
        app_client,
        _xml_stow_body(
            ("application/dicom+xml", None, _metadata_xml(a, "urn:a")),
            ("application/dicom+xml", None, _metadata_xml(b, "urn:b")),
            ("application/octet-stream", "urn:a", a.PixelData),
            ("application/octet-stream", "urn:b", b.PixelData),
        ),
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == 2
    for ds in (a, b):
        got = await app_client.get(
            inst_url(ds),
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        ((_, data),) = split_multipart(got.content, got.headers["content-type"])
        stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert np.array_equal(stored.pixel_array, ds.pixel_array)
        assert stored.PatientName == ds.PatientName
    meta = (await app_client.get(f"{inst_url(b)}/metadata")).json()[0]
    assert meta["00290010"]["Value"] == ["ACME 1.0"]
    assert meta["00291010"]["Value"] == ["private in block 10"]


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        (b"<NativeDicomModel><DicomAttribute", "not well-formed"),
        (b'<!DOCTYPE x [<!ENTITY a "a">]><NativeDicomModel/>', "DOCTYPE"),
        (b"<Other/>", "NativeDicomModel"),
    ],
)
async def test_stow_of_bad_xml_metadata_is_400_and_stores_nothing(
    app_client: httpx.AsyncClient, metadata: bytes, why: str
) -> None:
    good = make_instance()
    body = _xml_stow_body(
        ("application/dicom+xml", None, _metadata_xml(good, "urn:g")),
        ("application/dicom+xml", None, metadata),
        ("application/octet-stream", "urn:g", good.PixelData),
    )
    r = await _post_xml(app_client, body)
    assert r.status_code == 400 and why in r.text
    assert (await app_client.get(f"{inst_url(good)}/metadata")).status_code == 404


async def test_stow_xml_metadata_limit_counts_all_parts(app_client: httpx.AsyncClient) -> None:
    """MAX_JSON_METADATA_BYTES bounds the XML metadata parts together: at the limit they are
    read (and the padding refused as a data set), one byte over is a 413."""
    half = MAX_JSON_METADATA_BYTES // 2
    for extra, status in ((0, 400), (1, 413)):
        parts = [
            ("application/dicom+xml", None, b" " * half),
            ("application/dicom+xml", None, b" " * (half + extra)),
        ]
        r = await _post_xml(app_client, _xml_stow_body(*parts))
        assert r.status_code == status, r.text
    assert "the metadata parts are over" in r.text


async def test_qido_xml_of_more_matches_than_made_inline(app_client: httpx.AsyncClient) -> None:
    """Past XML_INLINE_DOCS data sets the XML is made in a worker thread: the same parts."""
    first = make_instance(patient_id="XML-MANY")
    more = [
        make_instance(study=first.StudyInstanceUID, series=first.SeriesInstanceUID)
        for _ in range(XML_INLINE_DOCS)
    ]
    await _store(app_client, first, *more)
    url = f"{ROOT}/studies/{first.StudyInstanceUID}/instances"
    as_json = (await app_client.get(url)).json()
    docs = _xml_parts(await app_client.get(url, headers={"Accept": XML_PARTS}))
    assert len(docs) == len(as_json) == XML_INLINE_DOCS + 1
    assert [d["00080018"]["Value"] for d in docs] == [j["00080018"]["Value"] for j in as_json]


def _deep_xml(ds: pydicom.Dataset, levels: int) -> bytes:
    """`ds` with a Referenced Image Sequence `levels` deep, a person name innermost (the
    deepest leaf XML has: PersonName, Alphabetic, FamilyName)."""
    doc = ds.to_json_dict(bulk_data_threshold=1 << 30)
    doc["7FE00010"] = {"vr": "OW", "BulkDataURI": f"urn:{ds.SOPInstanceUID}"}
    node: dict[str, Any] = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]}}
    for _ in range(levels):
        node = {"00081140": {"vr": "SQ", "Value": [node]}}
    doc.update(node)
    return dataset_xml(doc)


async def test_xml_stow_takes_the_sequence_depth_of_json(app_client: httpx.AsyncClient) -> None:
    """MAX_JSON_SEQUENCE_DEPTH levels are stored, as from JSON; deeper, up to what
    MAX_XML_DEPTH elements hold, fails only that instance (0xC000). XML stopped at 62 levels
    (MAX_XML_DEPTH was 128) and refused the whole request past them (400)."""
    depth = MAX_JSON_SEQUENCE_DEPTH
    deepest = (MAX_XML_DEPTH - 5) // 2  # NativeDicomModel, 2 a level, 4 of the leaf
    assert deepest > depth
    instances = [make_instance() for _ in range(3)]
    levels = [depth, depth + 1, deepest]
    xmls = [_deep_xml(ds, n) for ds, n in zip(instances, levels, strict=True)]
    assert ET.fromstring(xmls[2]) is not None
    r = await _post_xml(
        app_client,
        _xml_stow_body(
            *[("application/dicom+xml", None, xml) for xml in xmls],
            *[("application/octet-stream", f"urn:{ds.SOPInstanceUID}", ds.PixelData)
              for ds in instances],
        ),
    )  # fmt: skip
    assert r.status_code == 202, r.text
    (ok,) = r.json()["00081199"]["Value"]
    assert ok["00081155"]["Value"] == [instances[0].SOPInstanceUID]
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xC000], [0xC000]]
    assert r.headers["Warning"].count(f"deeper than {depth} levels") == 2
    meta = (await app_client.get(f"{inst_url(instances[0])}/metadata")).json()[0]
    node = meta
    for _ in range(depth):
        (node,) = node["00081140"]["Value"]
    assert node["00100010"]["Value"] == [{"Alphabetic": "Doe^J"}]
    # one element more than MAX_XML_DEPTH: the parser's limit, the whole request a 400
    too_deep = make_instance()
    r = await _post_xml(
        app_client,
        _xml_stow_body(
            ("application/dicom+xml", None, _deep_xml(too_deep, deepest + 1)),
            ("application/octet-stream", f"urn:{too_deep.SOPInstanceUID}", too_deep.PixelData),
        ),
    )
    assert r.status_code == 400 and f"deeper than {MAX_XML_DEPTH} elements" in r.text
