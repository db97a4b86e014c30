"""Fuzzing (issue 6): the multipart parser on arbitrary bytes and split points, and QIDO on
arbitrary parameters through the real app: never another exception, never a 5xx, never a hang."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomweb_server.errors import BadRequestError, PayloadTooLargeError
from dicomweb_server.multipart import MultipartReader
from tests.helpers import ROOT

BOUNDARY = "fuzz"
TEMPLATE = b"--fuzz\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--fuzz--\r\n"
KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "StudyInstanceUID", "limit",
        "offset", "includefield", "fuzzymatching", "ModalitiesInStudy", "00100020", "SeriesNumber",
        "AcquisitionDateTime", "Rows", "x", "",
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


@pytest.mark.db
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(params=st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=30)), max_size=5))
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
