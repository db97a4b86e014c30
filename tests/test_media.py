"""Content-Type / Accept parsing and negotiation (PS3.18 8.7, RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest

from dicomweb_server.errors import BadRequestError, NotAcceptableError, UnsupportedMediaTypeError
from dicomweb_server.media import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    STORED,
    frame_media_type,
    negotiate_frames,
    negotiate_instances,
    negotiate_json,
    parse_accept,
    stow_boundary,
)

JPEG = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"


def test_parse_accept_quoted_params_commas_and_q() -> None:
    ranges = parse_accept(
        'application/json;q=0.5, multipart/related; type="application/dicom"; '
        'transfer-syntax="1.2.840.10008.1.2.1", */*;q=0.1, text/html;q=0'
    )
    assert [r.essence for r in ranges] == ["multipart/related", "application/json", "*/*"]
    assert ranges[0].params == {
        "type": "application/dicom",
        "transfer-syntax": EXPLICIT_VR_LITTLE_ENDIAN,
    }


def test_parse_accept_comma_inside_quotes() -> None:
    (r,) = parse_accept('multipart/related; type="a,b"')
    assert r.params["type"] == "a,b"


@pytest.mark.parametrize("bad", ["noslash", "text/html; q=abc", "a/b; novalue"])
def test_parse_accept_malformed(bad: str) -> None:
    with pytest.raises(BadRequestError):
        parse_accept(bad)


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (None, JPEG, EXPLICIT_VR_LITTLE_ENDIAN),
        ("*/*", JPEG, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="application/dicom"', JPEG, EXPLICIT_VR_LITTLE_ENDIAN),
        ("multipart/related; type=application/dicom; transfer-syntax=*", JPEG, STORED),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}', JPEG, STORED),
        ("multipart/related", J2K, EXPLICIT_VR_LITTLE_ENDIAN),
        (f"multipart/related; type=application/dicom; transfer-syntax={J2K}, */*;q=0.2", JPEG,
         EXPLICIT_VR_LITTLE_ENDIAN),
    ],
)  # fmt: skip
def test_negotiate_instances(accept: str | None, stored: str, expected: str) -> None:
    assert negotiate_instances(accept, stored) == expected


def test_negotiate_instances_406_names_what_we_can_send() -> None:
    with pytest.raises(NotAcceptableError) as exc:
        negotiate_instances(
            f"multipart/related; type=application/dicom; transfer-syntax={J2K}", JPEG
        )
    assert EXPLICIT_VR_LITTLE_ENDIAN in exc.value.message and JPEG in exc.value.message
    with pytest.raises(NotAcceptableError):
        negotiate_instances("application/dicom+json", JPEG)


@pytest.mark.parametrize(
    ("accept", "stored", "expected"),
    [
        (None, JPEG, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*', JPEG, STORED),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", JPEG, STORED),
        ('multipart/related; type="image/jpeg"', JPEG, STORED),
        ('multipart/related; type="image/*"', J2K, STORED),
        ("multipart/related; type=application/octet-stream", J2K, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jls", multipart/related; type=application/octet-stream',
         JPEG, EXPLICIT_VR_LITTLE_ENDIAN),
    ],
)  # fmt: skip
def test_negotiate_frames(accept: str | None, stored: str, expected: str) -> None:
    assert negotiate_frames(accept, stored) == expected


def test_negotiate_frames_406() -> None:
    with pytest.raises(NotAcceptableError):
        negotiate_frames('multipart/related; type="image/jp2"', JPEG)


def test_frame_media_types() -> None:
    assert frame_media_type(JPEG) == "image/jpeg"
    assert frame_media_type(J2K) == "image/jp2"
    assert frame_media_type("1.2.840.10008.1.2.5") == "image/dicom-rle"
    assert frame_media_type(EXPLICIT_VR_LITTLE_ENDIAN) == "application/octet-stream"


def test_negotiate_json() -> None:
    assert negotiate_json(None) == "application/dicom+json"
    assert negotiate_json("application/json") == "application/json"
    assert negotiate_json("application/xml, application/json;q=0.3") == "application/json"
    with pytest.raises(NotAcceptableError):
        negotiate_json("application/dicom+xml")


def test_stow_boundary() -> None:
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="a b:c"') == "a b:c"
    assert stow_boundary("multipart/related; boundary=xyz") == "xyz"
    for bad in (
        None,
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
    ):
        with pytest.raises(UnsupportedMediaTypeError):
            stow_boundary(bad)
    with pytest.raises(BadRequestError):
        stow_boundary('multipart/related; type="application/dicom"')
