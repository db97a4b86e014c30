"""Rendered resources of documents (PS3.18 8.7.4, Table 8.7.4-1): a Structured Report as
text/html or text/plain, an encapsulated PDF as the PDF it holds."""

from __future__ import annotations

import html
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server import report
from dicomweb_server.report import render_report
from tests.helpers import ROOT, inst_url, multipart_body, stow_headers

TEST_SR = Path("real") / "pydicom" / "test-SR.dcm"
# What a rendered document may do in a browser (conformance/STATEMENT.md): show itself, with
# its inline styles; no script, plugin or load.
SANDBOX = "sandbox; default-src 'none'; style-src 'unsafe-inline'"


def _walk(items: Sequence | None) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items or []:
        out.append(item)
        out += _walk(getattr(item, "ContentSequence", None))
    return out


def test_every_value_of_the_content_tree_is_rendered(samples: Path) -> None:
    ds = pydicom.dcmread(samples / TEST_SR)
    text = render_report(samples / TEST_SR, "text/plain").decode()
    items = _walk(ds.ContentSequence)
    assert len(items) > 20
    wanted = []
    for item in items:
        kind = item.get("ValueType")  # by-reference items have none
        if kind == "TEXT":
            wanted += [ln for ln in item.TextValue.replace("\r", "\n").split("\n") if ln]
        if kind == "CODE":
            wanted.append(item.ConceptCodeSequence[0].CodeMeaning)
        if kind == "NUM":
            wanted.append(str(item.MeasuredValueSequence[0].NumericValue))
        if "ConceptNameCodeSequence" in item:
            wanted.append(item.ConceptNameCodeSequence[0].CodeMeaning)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert text.startswith(ds.ConceptNameCodeSequence[0].CodeMeaning + "\n")
    page = render_report(samples / TEST_SR, "text/html").decode()
    assert "&lt;&gt;" in page and "<>{}" not in page  # values are escaped
    assert all(html.escape(w) in page for w in wanted if "\n" not in w)


def _nested(depth: int, path: Path) -> Path:
    ds = pydicom.dcmread(path)
    leaf = ds.ContentSequence[0]
    for _ in range(depth):
        container = Dataset()
        container.RelationshipType, container.ValueType = "CONTAINS", "CONTAINER"
        container.ContentSequence = Sequence([leaf])
        leaf = container
    ds.ContentSequence = Sequence([leaf])
    out = path.parent / "nested.dcm"
    ds.save_as(out)
    return out


def test_deep_and_long_reports_are_cut_with_a_note(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "sr.dcm"
    src.write_bytes((samples / TEST_SR).read_bytes())
    deep = render_report(_nested(report.MAX_REPORT_DEPTH + 20, src), "text/plain").decode()
    assert "nested deeper, not shown" in deep
    assert len(deep.splitlines()) < report.MAX_REPORT_DEPTH + 20
    monkeypatch.setattr(report, "MAX_REPORT_ITEMS", 5)
    short = render_report(src, "text/html").decode()
    assert short.count("<li>") == 6 and "more content items, not shown" in short


async def _store(client: httpx.AsyncClient, path: Path) -> Dataset:
    r = await client.post(
        f"{ROOT}/studies", content=multipart_body([path.read_bytes()]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    return pydicom.dcmread(path)


@pytest.mark.db
async def test_rendered_structured_report_is_text(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    ds = await _store(app_client, samples / "generated" / "coverage" / "sr_basic_text.dcm")
    url = f"{inst_url(ds)}/rendered"
    cases = [(None, "text/html"), ("*/*", "text/html"), ("text/plain", "text/plain"),
             ("text/*;q=0.5, text/plain", "text/plain")]  # fmt: skip
    for accept, media in cases:
        r = await app_client.get(url, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, (accept, r.text)
        assert r.headers["content-type"] == f"{media}; charset=utf-8"
        assert "Keine Raumforderung. Lunge frei." in r.text
        assert "Müller-Lüdenscheidt" in r.text  # UTF-8 throughout
    r = await app_client.get(url, headers={"Accept": "image/jpeg"})
    assert r.status_code == 406  # an image of a report is not made
    r = await app_client.get(f"{inst_url(ds)}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"  # its icon


@pytest.mark.db
async def test_rendered_encapsulated_pdf_is_the_pdf(
    app_client: httpx.AsyncClient, samples: Path
) -> None:
    ds = await _store(app_client, samples / "generated" / "coverage" / "encapsulated_pdf.dcm")
    url = f"{inst_url(ds)}/rendered"
    for accept in (None, "application/pdf", "*/*"):
        r = await app_client.get(url, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, (accept, r.text)
        assert r.headers["content-type"] == "application/pdf"
        length = int(ds.get("EncapsulatedDocumentLength", len(ds.EncapsulatedDocument)))
        assert r.content == ds.EncapsulatedDocument[:length] and r.content.startswith(b"%PDF")
    r = await app_client.get(url, headers={"Accept": "text/html"})
    assert r.status_code == 406


def test_malformed_content_items_render_without_failing(samples: Path, tmp_path: Path) -> None:
    """Values that are not what their Value Type calls for (a number where a sequence
    belongs, one coordinate) are shown as such; they were a 500."""
    ds = pydicom.dcmread(samples / TEST_SR)
    num, image, scoord = Dataset(), Dataset(), Dataset()
    num.ValueType, image.ValueType, scoord.ValueType = "NUM", "IMAGE", "SCOORD"
    num.add_new(0x0040A300, "US", 5)  # Measured Value Sequence as a number
    image.add_new(0x00081199, "US", 7)  # Referenced SOP Sequence as a number
    scoord.add_new(0x00700022, "FL", 1.5)  # Graphic Data: one value
    scoord.GraphicType = "POINT"
    ds.ContentSequence = Sequence([num, image, scoord])
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    for media in report.REPORT_MEDIA_TYPES:
        text = render_report(path, media).decode()
        assert "(no value)" in text and "(no reference)" in text and "POINT (0 points)" in text


@pytest.mark.db
async def test_documents_are_shown_never_run(
    app_client: httpx.AsyncClient, samples: Path, tmp_path: Path
) -> None:
    """A CDA (or any document) that holds script must not run in the archive's origin when a
    browser opens its rendered URL: a sandboxing Content-Security-Policy and nosniff; the
    CDA's own Content-Type, no charset added (it declares its encoding itself)."""
    ds = pydicom.dcmread(samples / "generated" / "coverage" / "encapsulated_pdf.dcm")
    cda = b'<?xml version="1.0" encoding="ISO-8859-1"?><html><script>alert(1)</script></html>'
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(
        "1.2.840.10008.5.1.4.1.1.104.2"
    )
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.MIMETypeOfEncapsulatedDocument = "text/xml"
    ds.EncapsulatedDocument = cda + b" " * (len(cda) % 2)
    ds.EncapsulatedDocumentLength = len(cda)
    path = tmp_path / "cda.dcm"
    ds.save_as(path)
    await _store(app_client, path)
    r = await app_client.get(f"{inst_url(ds)}/rendered")
    assert r.status_code == 200 and r.content == cda
    assert r.headers["content-type"] == "text/xml"
    assert r.headers["content-security-policy"] == SANDBOX  # scripts, plugins, loads: none
    assert r.headers["x-content-type-options"] == "nosniff"
    r = await app_client.get(f"{inst_url(ds)}/rendered", headers={"Accept": "text/html"})
    assert r.status_code == 406 and "text/xml" in r.json()["message"]
    sr = await _store(app_client, samples / "generated" / "coverage" / "sr_basic_text.dcm")
    r = await app_client.get(f"{inst_url(sr)}/rendered")
    assert r.headers["content-security-policy"] == SANDBOX
