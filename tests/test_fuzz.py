"""Fuzzing (issue 6): the multipart parser on arbitrary bytes and split points, QIDO on
arbitrary parameters, and the retrieve routes on stored files whose pixel attributes disagree
with their Pixel Data, through the real app: never another exception, never a 5xx, never a
hang."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from dicomweb_server.errors import BadRequestError, PayloadTooLargeError
from dicomweb_server.multipart import MultipartReader
from tests.helpers import ROOT, inst_url, multipart_body, stow_headers, to_bytes

BOUNDARY = "fuzz"
TEMPLATE = b"--fuzz\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--fuzz--\r\n"
KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "StudyInstanceUID", "limit",
        "offset", "includefield", "fuzzymatching", "ModalitiesInStudy", "00100020", "SeriesNumber",
        "AcquisitionDateTime", "Rows", "x", "", "multiplevaluematching", "emptyvaluematching",
        "RequestAttributesSequence.ScheduledProcedureStepID", "00400275.00401001",
        "RequestAttributesSequence.PatientName", "00400275..x"]  # fmt: skip


def _bodies() -> st.SearchStrategy[bytes]:
    mutated = st.builds(
        lambda cuts, junk: (
            TEMPLATE[: cuts % len(TEMPLATE)] + junk + TEMPLATE[cuts % len(TEMPLATE) :]
        ),
        st.integers(0, 10_000),
        st.binary(max_size=40),
    )
    return st.one_of(st.binary(max_size=300), mutated)


@settings(max_examples=400, deadline=None)
@given(body=_bodies(), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_multipart_reader_only_raises_client_errors(body: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    reader = MultipartReader(BOUNDARY, max_part_bytes=100)
    try:
        for chunk in chunks:
            reader.feed(chunk)
        reader.close()
    except (BadRequestError, PayloadTooLargeError):
        pass


# Values: any text, the flags' own values (else the flags are never on), and lists with the
# separators and wild cards (`\` is Multiple Value Matching's, PS3.4 C.2.2.2.8).
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["true", "false"]),
    st.text(alphabet="CTPMR1.\\,*? ", max_size=12),
)


@pytest.mark.db
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(params=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=5))
async def test_qido_parameters_never_5xx(
    app_client: httpx.AsyncClient, params: list[tuple[str, str]]
) -> None:
    for level in ("studies", "series", "instances"):
        r = await app_client.get(f"{ROOT}/{level}", params=tuple(params))
        assert r.status_code in (200, 204, 400), (level, params, r.status_code, r.text)


@pytest.mark.db
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=_bodies(),
    ctype=st.sampled_from(
        [
            f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            f"multipart/related; boundary={BOUNDARY}",
            "multipart/related; boundary=",
            'multipart/related; type="application/dicom"; boundary="unclosed',
            "application/dicom",
            "text/plain; charset=utf-8",
            ";;;",
        ]
    ),
)
async def test_stow_bodies_never_5xx(
    app_client: httpx.AsyncClient, body: bytes, ctype: str
) -> None:
    r = await app_client.post(f"{ROOT}/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code in (400, 409, 413, 415), (ctype, body[:80], r.status_code, r.text)


# Retrieve side: corpus files with Image Pixel attributes that disagree with their Pixel
# Data (tests/test_malformed_retrieve.py holds one case for each fault this found). Byte
# flips are left out: a damaged codestream in a frame after the first still ends a
# multi-frame response mid-body, as the conformance statement says.
_RETRIEVE_BASES = [
    "real/pydicom/CT_small.dcm",
    "real/pydicom/MR_small_RLE.dcm",
    "real/pydicom/MR_small_jp2klossless.dcm",
    "real/pydicom/MR_small_bigendian.dcm",
    "real/pydicom/liver_1frame.dcm",
    "generated/coverage/nm_10frames_rle.dcm",
]
_ATTRIBUTES = st.one_of(
    st.tuples(st.sampled_from(["Rows", "Columns"]), st.sampled_from([0, 1, 2, 33, 65535])),
    st.tuples(st.just("NumberOfFrames"), st.sampled_from([0, 2, 3, 11, 2**24, 2**31 - 1])),
    st.tuples(st.just("BitsAllocated"), st.sampled_from([0, 1, 8, 12, 32, 64])),
    st.tuples(st.just("BitsStored"), st.sampled_from([0, 1, 7, 40])),
    st.tuples(st.just("SamplesPerPixel"), st.sampled_from([0, 2, 3, 4])),
    st.tuples(
        st.just("PhotometricInterpretation"),
        st.sampled_from(["RGB", "YBR_FULL_422", "PALETTE COLOR", "MONOCHROME1", "HSV", ""]),
    ),
    st.tuples(st.just("PixelData"), st.just(b"")),
)
_ROUTES = [
    ("", None),
    ("", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'),
    ("", 'multipart/related; type="image/jls"'),
    ("/metadata", None),
    ("/frames/1", None),
    ("/frames/1,2", 'multipart/related; type="image/jp2"'),
    ("/frames/2", "application/octet-stream"),
    ("/rendered", "image/png"),
    ("/frames/1/thumbnail", "image/jpeg"),
    ("/pixeldata", None),
    ("/bulk/7FE00010", None),
    ("/bulk/7FE00010", "application/octet-stream"),
]


@pytest.mark.db
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.sampled_from(_RETRIEVE_BASES),
    changes=st.lists(_ATTRIBUTES, min_size=1, max_size=2),
)
async def test_retrieve_of_inconsistent_pixel_attributes_never_5xx(
    app_client: httpx.AsyncClient, samples: Path, base: str, changes: list[tuple[str, object]]
) -> None:
    ds = pydicom.dcmread(samples / base)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes:
        if keyword == "PixelData" and ds.file_meta.TransferSyntaxUID.is_compressed:
            value = encapsulate([b"\0\0"])  # a fragment of two bytes, for any frame
        setattr(ds, keyword, value)
    r = await app_client.post(
        f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=stow_headers()
    )
    assert r.status_code in (200, 409), r.text
    if "00081198" in r.json():
        return  # refused at STOW, with its reason
    for path, accept in _ROUTES:
        # A body cut off mid-way raises here (the in-process client reads it whole).
        r = await app_client.get(inst_url(ds) + path, headers={"Accept": accept or "*/*"})
        assert r.status_code < 500, (base, changes, path, accept, r.status_code, r.text)
