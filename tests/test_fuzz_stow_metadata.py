"""Fuzzing STOW-RS of metadata and bulk data (PS3.18 10.5.1.4): valid DICOM JSON and DICOM
XML metadata of generated instances, mutated structurally (wrong VRs, values of the wrong
JSON type, bad InlineBinary and BulkDataURIs, deep or odd sequences, malformed tags, missing
or repeated UIDs, Pixel Data that disagrees with its attributes), through the real app: the
answer is one of PS3.18 Table 10.5.3-1's, never a 5xx, and an instance that failed leaves
no index row and no blob behind."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette

from dicomweb_server.config import Settings
from dicomweb_server.dicom_xml import dataset_xml
from tests.helpers import ROOT, make_instance, pending_reservations, values

pytestmark = pytest.mark.db

BOUNDARY = "fuzz-json"
PIXELS = "urn:fuzz:pixels"
OTHER = "urn:fuzz:other"
# What a STOW-RS may answer (PS3.18 Table 10.5.3-1), a 4xx for the request as a whole included.
ANSWERS = (200, 202, 400, 409, 413, 415)


def _base_doc(frames: int = 1) -> dict[str, Any]:
    """The DICOM JSON of a valid instance, Pixel Data by BulkDataURI, with a sequence, a
    private block, a PN and an OW value inline."""
    ds = make_instance(rows=4, cols=4, frames=frames, PixelSpacing=[0.5, 0.5])
    doc = ds.to_json_dict(bulk_data_threshold=1 << 30)
    doc["7FE00010"] = {"vr": "OW", "BulkDataURI": PIXELS}
    doc["00081140"] = {  # Referenced Image Sequence
        "vr": "SQ",
        "Value": [{"00081150": {"vr": "UI", "Value": ["1.2.3"]},
                   "00081155": {"vr": "UI", "Value": ["1.2.3.4"]}}],
    }  # fmt: skip
    doc["00091010"] = {"vr": "LO", "Value": ["ACME"]}
    doc["00091011"] = {"vr": "LO", "Value": ["private"]}  # no creator at 00090010
    doc["00281201"] = {"vr": "OW", "InlineBinary": "AAABAAIAAwA="}  # Red Palette LUT Data
    return doc


_PIXELS = make_instance(rows=4, cols=4).PixelData

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.sampled_from(["", "NaN", "Infinity", "-Infinity", "1e999", "1,5", " 7 ", "0x10",
                     "a\\b", "Doe^John", "\x00", "é", "19991301", "1.2.3", "x" * 70_000]),
    st.text(max_size=12),
)  # fmt: skip
_JSON = st.recursive(
    _LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=10), kids, max_size=3)
    ),
    max_leaves=8,
)
_VRS = st.sampled_from(["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT",
                        "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST",
                        "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
                        "XX", "", "ow", "O", "OWX", "US or SS", "OB or OW", "US or OW",
                        "US or SS or OW", "US or XX"])  # fmt: skip
_PN = st.one_of(
    st.just("Doe^John"),
    st.fixed_dictionaries({"Alphabetic": _LEAVES}),
    st.fixed_dictionaries({"Foo": st.just("x")}),
    st.fixed_dictionaries(
        {
            "Alphabetic": st.just("A"),
            "Ideographic": st.just("B"),
            "Phonetic": st.just("C"),
            "Extra": _JSON,
        }
    ),
)
_INLINE = st.one_of(
    st.sampled_from(
        ["QUJD!!", " QU JD ", "QUJD", "QUI=", "QQ==", "", "====", "A", "AAAAAA==", "QUJD\nREVG"]
    ),
    _LEAVES,
)
_URIS = st.one_of(
    st.sampled_from(
        [
            PIXELS,
            OTHER,
            "urn:fuzz:none",
            "",
            "/relative",
            "pixels",
            f"http://testserver{ROOT}/bulk/1",
            "urn:fuzz:PIXELS",
        ]
    ),
    _LEAVES,
)


def _element(vr: Any, kind: str, payload: Any) -> Any:
    """A DICOM JSON attribute object built from the drawn pieces (vr "-" means none)."""
    out: dict[str, Any] = {} if vr == "-" else {"vr": vr}
    if kind == "raw":
        return payload  # not even an object
    out[kind] = payload
    return out


_ELEMENTS = st.builds(
    _element,
    st.one_of(_VRS, st.just("-"), _LEAVES),
    st.sampled_from(["Value", "InlineBinary", "BulkDataURI", "raw", "Value"]),
    st.one_of(
        _JSON,
        st.lists(_PN, max_size=2),
        _INLINE,
        _URIS,
        st.lists(
            st.dictionaries(st.sampled_from(["00100010", "00080018", "x"]), _JSON), max_size=2
        ),
    ),
)
_TAGS = st.one_of(
    st.sampled_from(["00100010", "00100020", "00080018", "0020000D", "0020000E", "00080016",
                     "00280010", "00280011", "00280100", "00280008", "00280030", "7FE00010",
                     "00081140", "00091010", "00281201", "00020010", "00080005", "FFFEE000",
                     "0010001", "GGGG0010", "0010001g", "-0010010", "0x100010", "1_0010010",
                     " 0010010", "100000000", "00090010", "00111011", "", "Rows"]),
    st.text(alphabet="0123456789abcdefABCDEFx_- ", min_size=1, max_size=10),
)  # fmt: skip


def _deep(depth: int, leaf: Any) -> dict[str, Any]:
    """A sequence nested `depth` levels deep, `leaf` at the bottom."""
    node: dict[str, Any] = {"vr": "SQ", "Value": [leaf]}
    for _ in range(depth):
        node = {"vr": "SQ", "Value": [{"00081140": node}]}
    return node


_EDITS = st.one_of(
    st.tuples(st.just("set"), _TAGS, _ELEMENTS),
    st.tuples(st.just("del"), _TAGS, st.none()),
    st.tuples(
        st.just("deep"),
        st.one_of(st.integers(1, 3000), st.integers(8, 70)),  # 8-70: pydicom's doubling path
        st.one_of(st.just({}), _JSON, st.dictionaries(_TAGS, _ELEMENTS, max_size=2)),
    ),
    st.tuples(st.just("item"), st.sampled_from(["00100010", "00081150"]), _ELEMENTS),
    st.tuples(
        st.just("pixel"),
        st.sampled_from(["00280010", "00280011", "00280100", "00280008", "00280002", "00280101"]),
        st.sampled_from([0, 1, 3, 8, 12, 32, 64, 65535, 2**31, -1, "2"]),
    ),
)


def _apply(doc: dict[str, Any], edit: tuple[str, Any, Any]) -> None:
    what, where, value = edit
    if what == "set":
        doc[where] = value
    elif what == "del":
        doc.pop(where, None)
    elif what == "deep":
        doc["00081140"] = _deep(where, value)
    elif what == "item":
        # An earlier edit may have deleted the sequence or set it to any value (CI drew
        # `del 00081140` then `item`: a KeyError in the test itself): the items go in a
        # sequence element made anew then.
        seq = doc.get("00081140")
        if not isinstance(seq, dict):
            seq = doc["00081140"] = {"vr": "SQ"}
        seq["Value"] = [{where: value}, value]
    elif what == "pixel" and where in doc:
        doc[where] = {"vr": doc[where]["vr"], "Value": [value]}
    elif what == "pixel":
        doc[where] = {"vr": "US", "Value": [value]}


_BULK_TYPES = st.sampled_from([
    "application/octet-stream",
    "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80",
    "image/jpeg",
    "image/jp2",
    "video/mpeg",
    "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.5",
    "text/plain",
])  # fmt: skip
_BULK = st.lists(
    st.tuples(
        st.sampled_from([PIXELS, OTHER, "/relative", f"http://testserver{ROOT}/bulk/1"]),
        _BULK_TYPES,
        st.one_of(st.just(_PIXELS), st.binary(max_size=40), st.just(_PIXELS + b"\0")),
    ),
    max_size=3,
)


def _body(meta: list[tuple[str, bytes]], bulk: list[tuple[str, str, bytes]]) -> bytes:
    out = bytearray()
    for ctype, data in meta:
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    for location, ctype, data in bulk:
        head = f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\nContent-Location: {location}\r\n\r\n"
        out += head.encode() + data + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


async def _counts(dsn: str, app: Starlette, settings: Settings) -> tuple[int, int, int, int]:
    """Index rows, pending reservations, blobs, and spool files left in tmp."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = int(await conn.fetchval("SELECT count(*) FROM instance"))
        pending = await pending_reservations(conn, app.state.services.index)
    finally:
        await conn.close()
    root = settings.blob_dir
    files = [p for p in root.rglob("*") if p.is_file()]
    tmp = [p for p in files if p.relative_to(root).parts[0] == "tmp"]
    return rows, pending, len(files) - len(tmp), len(tmp)


async def _check(
    client: httpx.AsyncClient, app: Starlette, settings: Settings, dsn: str,
    body: bytes, metadata_type: str, what: object,
) -> None:  # fmt: skip
    """POST the body; the answer is a STOW answer, and exactly the instances it reports
    stored have rows and blobs (re-sent ones excepted)."""
    rows, _, blobs, _ = await _counts(dsn, app, settings)
    headers = {
        "Content-Type": f'multipart/related; type="{metadata_type}"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json",
    }
    r = await client.post(f"{ROOT}/studies", content=body, headers=headers)
    assert r.status_code in ANSWERS, (what, r.status_code, r.text[:500])
    doc = r.json() if r.status_code in (200, 202, 409) else {}
    stored = len(values(doc, "00081199")) if "00081199" in doc else 0
    after = await _counts(dsn, app, settings)
    assert after[1] == 0 and after[3] == 0, (what, after)
    assert after[0] - rows == after[2] - blobs <= stored, (what, rows, blobs, after, r.text)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(_EDITS, min_size=1, max_size=3),
    twice=st.booleans(),
    bulk=_BULK,
    frames=st.sampled_from([1, 2]),
)
async def test_json_metadata_mutations_never_5xx(
    app_client: httpx.AsyncClient, app: Starlette, settings: Settings, clean_db: str,
    edits: list[tuple[str, Any, Any]], twice: bool, bulk: list[tuple[str, str, bytes]],
    frames: int,
) -> None:  # fmt: skip
    doc = _base_doc(frames)
    for edit in edits:
        _apply(doc, edit)
    try:
        one = json.dumps(doc)
    except (RecursionError, ValueError):
        return  # not JSON at all (a float NaN, too deep to encode here)
    meta = f"[{one}, {one}]" if twice else f"[{one}]"  # the same UIDs twice in one request
    parts = [(PIXELS, "application/octet-stream", _PIXELS * frames), *bulk]
    body = _body([("application/dicom+json", meta.encode())], parts)
    await _check(
        app_client,
        app,
        settings,
        clean_db,
        body,
        "application/dicom+json",
        (edits, meta[:300], bulk),
    )


# XML: valid NativeDicomModel documents, mutated as text (the writer refuses to write most
# of the JSON mutations above) and by hostile constructs.
_XML_HOSTILE = [
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;'
    b'&lol;&lol;&lol;&lol;&lol;">]><NativeDicomModel>&lol2;</NativeDicomModel>',
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    b"<NativeDicomModel>&e;</NativeDicomModel>",
    b'<?xml version="1.0"?><!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd"><NativeDicomModel/>',
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p">%p;]><x/>',
    b"<NativeDicomModel>&amp;&lt;&#0;&#xFFFF;</NativeDicomModel>",
    b'<?xml version="1.0" encoding="shift_jis"?><NativeDicomModel/>',
    b'<?xml version="1.0" encoding="utf-16"?><NativeDicomModel/>',
    b"\xef\xbb\xbf<NativeDicomModel/>",
    b"<a:NativeDicomModel xmlns:a='urn:other'/>",
    b"<NativeDicomModel>" * 200,
]
_XML_EDITS = st.one_of(
    st.tuples(
        st.just("replace"),
        st.sampled_from(
            [
                ('vr="PN"', 'vr="XX"'),
                ('vr="US"', 'vr="FD"'),
                ('vr="US"', ""),
                ('tag="0028', 'tag="G028'),
                ('tag="00100010"', 'tag="0010001"'),
                ('tag="00100010"', 'tag="00100010" tag="x"'),
                ('number="1"', 'number="0"'),
                ('number="1"', ""),
                ("<Value", "<Item"),
                ("<PersonName", "<Value"),
                ("<Alphabetic>", "<Alphabetic><Alphabetic>"),
                ("</Value>", "</Value><BulkData uri='urn:fuzz:none'/>"),
                ('uri="' + PIXELS, 'uuid="' + PIXELS),
                ('uri="' + PIXELS, 'uri="urn:fuzz:none'),
                ("<NativeDicomModel", "<NativeDicomModel xmlns:x='urn:y' x:a='1'"),
                ('xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"', 'xmlns="urn:wrong"'),
                (
                    '<Value number="1">4</Value>',
                    '<Value number="1">99999999999999999999999</Value>',
                ),
                ('<Value number="1">4</Value>', '<Value number="1">-1</Value>'),
                ('<Value number="1">4</Value>', '<Value number="1">1e3</Value>'),
                ("<InlineBinary>", "<InlineBinary>!!"),
                ("</NativeDicomModel>", ""),
            ]
        ),
    ),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000)),
    st.tuples(st.just("whole"), st.sampled_from(_XML_HOSTILE)),
)


def _apply_xml(xml: bytes, edit: tuple[str, Any], junk: bytes) -> bytes:
    what, arg = edit
    if what == "replace":
        return xml.replace(arg[0].encode(), arg[1].encode(), 1)
    if what == "cut":
        return xml[: arg % (len(xml) + 1)]
    if what == "insert":
        at = arg % (len(xml) + 1)
        return xml[:at] + junk + xml[at:]
    return bytes(arg)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(_XML_EDITS, min_size=1, max_size=3),
    junk=st.sampled_from([b"<", b"&", b"&lol;", b"<!ENTITY x 'y'>", b"<Item number='1'/>",
                          b"<DicomAttribute tag='00100010' vr='PN'/>", b"\x00", b"\xff\xfe",
                          b"]]>", b"<![CDATA[x]]>", b"<?pi x?>", b"<!-- c -->"]),
    twice=st.booleans(),
    bulk=_BULK,
)  # fmt: skip
async def test_xml_metadata_mutations_never_5xx(
    app_client: httpx.AsyncClient, app: Starlette, settings: Settings, clean_db: str,
    edits: list[tuple[str, Any]], junk: bytes, twice: bool,
    bulk: list[tuple[str, str, bytes]],
) -> None:  # fmt: skip
    xml = dataset_xml(_base_doc())
    for edit in edits:
        xml = _apply_xml(xml, edit, junk)
    meta = [("application/dicom+xml", xml)] * (2 if twice else 1)
    parts = [(PIXELS, "application/octet-stream", _PIXELS), *bulk]
    body = _body(meta, parts)
    await _check(app_client, app, settings, clean_db, body, "application/dicom+xml", edits)


async def test_base_documents_are_stored(
    app_client: httpx.AsyncClient, app: Starlette, settings: Settings, clean_db: str
) -> None:
    """The fuzzers start from metadata the server stores (else they test only refusals)."""
    parts = [(PIXELS, "application/octet-stream", _PIXELS)]
    for ctype, meta in [
        ("application/dicom+json", json.dumps([_base_doc()]).encode()),
        ("application/dicom+xml", dataset_xml(_base_doc())),
    ]:
        body = _body([(ctype, meta)], parts)
        await _check(app_client, app, settings, clean_db, body, ctype, ctype)
    assert (await _counts(clean_db, app, settings))[0] == 2


# One well-formed element with a drawn VR and value: most reach the writer.
_DEEP_ELEMENTS = st.one_of(
    st.builds(lambda vr, v: {"vr": vr, "Value": v}, _VRS, st.lists(_LEAVES, max_size=2)),
    st.builds(lambda vr, v: {"vr": vr, "InlineBinary": v}, _VRS, _INLINE),
)


@settings(max_examples=100, deadline=None)
@given(tag=_TAGS, element=_DEEP_ELEMENTS, depth=st.integers(9, 11))
def test_a_failure_deep_in_sequences_stays_small(tag: str, element: Any, depth: int) -> None:
    """Whatever the element 9 to 11 sequences deep, assembling its data set (stored or
    refused) peaks under 20 MB: pydicom's writer doubles a failure's message per enclosing
    sequence (150 MB at 10 levels, 4 GB at 13), which the app fuzzer above cannot see short
    of the OOM killer. Found this way: an ambiguous VR (`US or SS`) the check skipped."""
    import tracemalloc
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from dicomweb_server import stow_json
    from dicomweb_server.dicomfile import InvalidInstanceError

    doc = _base_doc()
    doc.pop("7FE00010")
    doc["00081140"] = _deep(depth, {tag: element})
    with TemporaryDirectory() as tmp:
        tracemalloc.start()
        try:
            stow_json._assemble(doc, {}, stow_json._Budget({}), Path(tmp) / "out.dcm")
        except InvalidInstanceError as exc:
            assert len(exc.message) < 400, exc.message[:400]
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, (tag, element, peak)
