"""HTTP caching and content-coding of responses (field notes 1 and 10): If-None-Match,
Accept-Encoding, and the size of the Warning header."""

from __future__ import annotations

import httpx
import pytest

from dicomweb_server.errors import NotAcceptableError
from dicomweb_server.routes.common import WARNING_HEADER_MAX_BYTES, warning_header
from tests.helpers import (
    ROOT,
    inst_url,
    make_instance,
    multipart_body,
    stow_headers,
    to_bytes,
    values,
)

MORE = "There are additional results that can be requested"
# One warning value around a text: 299 dicomweb-server "<text>".
OVERHEAD = len('299 dicomweb-server ""')


async def _metadata_url(client: httpx.AsyncClient) -> str:
    study = make_instance().StudyInstanceUID
    files = [to_bytes(make_instance(study=study, rows=64, cols=64)) for _ in range(3)]
    r = await client.post(f"{ROOT}/studies", content=multipart_body(files), headers=stow_headers())
    assert r.status_code == 200, r.text
    return f"{ROOT}/studies/{study}/metadata"


def _varies_on_encoding(r: httpx.Response) -> bool:
    return "accept-encoding" in {v.strip().lower() for v in r.headers["vary"].split(",")}


@pytest.mark.db
async def test_if_none_match_weak_lists_star_and_garbage(app_client: httpx.AsyncClient) -> None:
    """RFC 9110 13.1.2: If-None-Match uses the weak comparison, so the ETag a compressing proxy
    weakened (nginx with gzip on) still gives 304; a list matches on any member and `*` on
    any representation. A value that is no list of entity tags is ignored: 200, not 5xx."""
    url = await _metadata_url(app_client)
    r = await app_client.get(url, headers={"Accept-Encoding": "identity"})
    etag, body = r.headers["etag"], r.content
    assert etag.startswith('"') and not etag.startswith("W/")
    matching = [etag, f"W/{etag}", f'"stale", {etag}', f'W/"stale", W/{etag}', "*"]
    for header in matching:
        r = await app_client.get(url, headers={"If-None-Match": header, "Accept-Encoding": ""})
        assert r.status_code == 304 and r.content == b"", header
        assert r.headers["etag"] == etag and _varies_on_encoding(r), header
    # Several field lines are one list (RFC 9110 5.3).
    lines = [("If-None-Match", '"stale"'), ("If-None-Match", f"W/{etag}"), ("Accept-Encoding", "")]
    assert (await app_client.get(url, headers=lines)).status_code == 304
    not_matching = [
        '"stale", W/"other"',
        "garbage",
        etag.strip('"'),
        f"w/{etag}",
        f"{etag} trailing",
        f"*, {etag}",
        f"garbage, {etag}",
        ",",
    ]
    for header in not_matching:
        r = await app_client.get(url, headers={"If-None-Match": header, "Accept-Encoding": ""})
        assert r.status_code == 200 and r.content == body, header
        assert r.headers["etag"] == etag, header


GZIP_CASES = [
    ("gzip", True),
    ("GZIP", True),
    ("x-gzip", True),
    ("*", True),
    ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
    ("gzip;q=0, identity", False),
    ("*, gzip;q=0", False),
    ("identity", False),
    ("gzip;q=0.5, identity", False),
    ("gzip;q=abc", False),
    ("deflate, br", False),
    ("", False),
]


@pytest.mark.db
async def test_accept_encoding_is_parsed(app_client: httpx.AsyncClient) -> None:
    """RFC 9110 12.5.3: codings are case-insensitive, q=0 means not acceptable, `*` covers
    gzip unless gzip is listed with q=0. Vary: Accept-Encoding on every answer."""
    url = await _metadata_url(app_client)
    plain = await app_client.get(url, headers={"Accept-Encoding": "identity"})
    for header, compressed in GZIP_CASES:
        r = await app_client.get(url, headers={"Accept-Encoding": header})
        assert r.status_code == 200, header
        assert (r.headers.get("content-encoding") == "gzip") is compressed, header
        assert _varies_on_encoding(r), header
        # gzip has its own ETag: the identity one with -gzip (RFC 9110 8.8.3.3)
        gzip_etag = plain.headers["etag"][:-1] + '-gzip"'
        assert r.headers["etag"] == (gzip_etag if compressed else plain.headers["etag"]), header
        assert r.content == plain.content, header  # httpx decoded the gzip body


def test_warning_text_is_a_quoted_string() -> None:
    """RFC 9110 5.6.4: a backslash ending a text must not escape the closing quote."""
    (header,) = warning_header(['say "a\\', "Ā\r\nX: 1"]).values()
    assert header == '299 dicomweb-server "say \'a\\\\", 299 dicomweb-server "\\\\u0100  X: 1"'


def test_warning_header_at_the_limit() -> None:
    """WARNING_HEADER_MAX_BYTES: a header of exactly that many bytes is sent whole; one byte
    more and the last warnings give way to a count of them."""
    first = "a" * 100
    last = "b" * (WARNING_HEADER_MAX_BYTES - len(", ") - 2 * OVERHEAD - len(first))
    (header,) = warning_header([first, last]).values()
    assert len(header) == WARNING_HEADER_MAX_BYTES
    assert header.endswith(f'"{last}"')
    (header,) = warning_header([first, last + "b"]).values()
    assert len(header) <= WARNING_HEADER_MAX_BYTES
    assert header == f'299 dicomweb-server "{first}", 299 dicomweb-server "... and 1 more"'


def test_warning_header_cap_keeps_the_first_warnings_and_counts_the_rest() -> None:
    texts = [f"includefield 'Unknown{n}' is not a DICOM attribute; ignored" for n in range(3000)]
    (header,) = warning_header(texts).values()
    assert len(header) <= WARNING_HEADER_MAX_BYTES
    assert header.startswith(f'299 dicomweb-server "{texts[0]}", ')
    kept = header.count("Unknown")
    assert 10 < kept < 3000
    assert header.endswith(f'299 dicomweb-server "... and {3000 - kept} more"')


def test_warning_header_cuts_one_overlong_text() -> None:
    (header,) = warning_header(["x" * (WARNING_HEADER_MAX_BYTES - OVERHEAD)]).values()
    assert len(header) == WARNING_HEADER_MAX_BYTES  # just fits: whole
    for texts in (["x" * (WARNING_HEADER_MAX_BYTES - OVERHEAD + 1)], ["y" * 10_000, "z"]):
        (header,) = warning_header(texts).values()
        assert len(header) <= WARNING_HEADER_MAX_BYTES
        assert header.startswith(f'299 dicomweb-server "{texts[0][:100]}')
        assert '..."' in header
    assert header.endswith('"... and 1 more"')


@pytest.mark.db
async def test_thousands_of_includefield_names_give_a_bounded_warning(
    app_client: httpx.AsyncClient,
) -> None:
    """3,000 unknown includefield names made a 230 KB Warning header that httpx refused
    ("Receive buffer too long"); the header stays within WARNING_HEADER_MAX_BYTES, and the
    more-results warning is the one that is kept."""
    for _ in range(2):
        ds = make_instance()
        r = await app_client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
        )
        assert r.status_code == 200
    names = ",".join(f"NoSuchKeyword{n}" for n in range(3000))
    r = await app_client.get(f"{ROOT}/studies", params={"includefield": names, "limit": "1"})
    assert r.status_code == 200 and len(r.json()) == 1
    warning = r.headers["warning"]
    assert len(warning) <= WARNING_HEADER_MAX_BYTES
    assert warning.startswith(f'299 dicomweb-server "{MORE}"')
    assert "NoSuchKeyword0'" in warning and 'more"' in warning
    r = await app_client.get(f"{ROOT}/studies", params={"includefield": names, "limit": "2"})
    assert r.status_code == 200 and MORE not in r.headers["warning"]


@pytest.mark.db
async def test_includefield_not_returned_at_the_level_is_named(
    app_client: httpx.AsyncClient,
) -> None:
    """Field notes 10: `/studies?includefield=SeriesDescription,PixelData` answered 200 with
    neither attribute and no Warning. Each is now named; at instance level both come back."""
    ds = make_instance(SeriesDescription="AXIAL")
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200
    fields = {"includefield": "SeriesDescription,PixelData,StudyDate"}
    r = await app_client.get(f"{ROOT}/studies", params=fields)
    assert r.status_code == 200
    (study,) = r.json()
    assert "0008103E" not in study and "7FE00010" not in study and "00080020" in study
    warning = r.headers["warning"]
    assert "'SeriesDescription'" in warning and "'PixelData'" in warning
    assert "StudyDate" not in warning
    r = await app_client.get(f"{ROOT}/instances", params=fields)
    (instance,) = r.json()
    assert values(instance, "0008103E") == ["AXIAL"] and "BulkDataURI" in instance["7FE00010"]
    assert "warning" not in r.headers


def _vary(r: httpx.Response) -> list[str]:
    return [v.strip() for v in r.headers.get("vary", "").split(",") if v.strip()]


@pytest.mark.db
async def test_not_acceptable_varies_on_accept(app_client: httpx.AsyncClient) -> None:
    """A 406 depends on Accept, so it says so (RFC 9110 12.5.5, 15.5.7): a cache must not
    answer a request that accepts something else with it. The Origin the CORS middleware
    adds (with or without an Origin in the request) is merged in: one Vary, each field once."""
    ds = make_instance()
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code == 200, r.text
    inst = inst_url(ds)
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    cases = [
        ("GET", inst, jpeg),
        ("GET", f"{inst}/metadata", "text/plain"),
        ("GET", f"{inst}/frames/1", "application/json"),
        ("GET", f"{inst}/rendered", "application/json"),
        ("GET", f"{inst}/bulkdata", "application/json"),
        ("GET", f"{ROOT}/studies", "application/dicom+xml"),
        ("OPTIONS", ROOT, "text/html"),
    ]
    for method, url, accept in cases:
        r = await app_client.request(method, url, headers={"Accept": accept})
        assert r.status_code == 406, (url, accept, r.text)
        assert _vary(r) == ["Accept", "Origin"], (url, accept)
        assert len(r.headers.get_list("vary")) == 1
        r = await app_client.request(
            method, url, headers={"Accept": accept, "Origin": "http://localhost:3000"}
        )
        assert r.status_code == 406 and _vary(r) == ["Accept", "Origin"], (url, accept)
        assert len(r.headers.get_list("vary")) == 1


def test_not_acceptable_merges_vary() -> None:
    """A Vary given to a 406 keeps its fields and gains Accept once, whatever the case."""
    assert NotAcceptableError("x").headers == {"Vary": "Accept"}
    assert NotAcceptableError("x", headers={"vary": "Origin"}).headers == {"vary": "Origin, Accept"}
    assert NotAcceptableError("x", headers={"Vary": "accept, Origin"}).headers == {
        "Vary": "accept, Origin"
    }
    assert NotAcceptableError("x", headers={"Vary": "*"}).headers == {"Vary": "*"}


@pytest.mark.db
async def test_search_results_gzipped_when_accepted(app_client: httpx.AsyncClient) -> None:
    """QIDO-RS results of GZIP_MIN_BYTES or more are gzip-compressed under the same rules as
    metadata (found by interop review: 1000 matches, 546 KB, went uncompressed); JSON and XML
    alike, Vary: Accept, Accept-Encoding on every answer; small results go as they are."""
    from dicomweb_server.routes.responses import GZIP_MIN_BYTES

    url = f"{ROOT}/studies/{(await _metadata_url(app_client)).split('/')[-2]}/instances"
    xml = 'multipart/related; type="application/dicom+xml"'
    for accept in ("application/dicom+json", xml):
        plain = await app_client.get(url, headers={"Accept": accept, "Accept-Encoding": "identity"})
        assert plain.status_code == 200 and len(plain.content) >= GZIP_MIN_BYTES
        assert "content-encoding" not in plain.headers and _varies_on_encoding(plain)
        for header, compressed in GZIP_CASES:
            r = await app_client.get(url, headers={"Accept": accept, "Accept-Encoding": header})
            assert (r.headers.get("content-encoding") == "gzip") is compressed, header
            assert "accept" in {v.strip().lower() for v in r.headers["vary"].split(",")}
            if accept == xml:  # a fresh boundary each time: the parts are what must agree
                assert len(r.content) == len(plain.content), header
            else:
                assert r.json() == plain.json(), header  # httpx decoded the gzip body
    one = await app_client.get(
        f"{url}?limit=1&includefield=00080018", headers={"Accept-Encoding": "gzip"}
    )
    assert len(one.content) < GZIP_MIN_BYTES and "content-encoding" not in one.headers
