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
