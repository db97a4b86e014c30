"""Content-Type / Accept parsing and negotiation (PS3.18 8.7, RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest

from dicomweb_server import media
from dicomweb_server.errors import BadRequestError, NotAcceptableError, UnsupportedMediaTypeError
from dicomweb_server.media import (
    ACCEPT_CACHE_MAX_CHARS,
    ACCEPT_CACHE_SIZE,
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


def test_parsed_accept_headers_are_kept_and_bounded() -> None:
    """The same header is parsed once; distinct headers past ACCEPT_CACHE_SIZE push the
    oldest out; headers over ACCEPT_CACHE_MAX_CHARS are not kept; a malformed one is refused
    every time; kept ranges cannot be changed."""
    kept = media._parse_accept_kept
    kept.cache_clear()
    header = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    first = parse_accept(header)
    assert parse_accept(header) is first and kept.cache_info().hits == 1
    for n in range(ACCEPT_CACHE_SIZE + 10):
        assert parse_accept(f"application/x-{n}")[0].subtype == f"x-{n}"
    assert kept.cache_info().currsize == ACCEPT_CACHE_SIZE
    assert parse_accept(header) is not first  # pushed out, parsed again: equal ranges
    assert parse_accept(header) == first
    longest = "a/b," * (ACCEPT_CACHE_MAX_CHARS // 4 - 1) + "a/bc"
    assert len(longest) == ACCEPT_CACHE_MAX_CHARS
    assert parse_accept(longest) is parse_accept(longest)
    too_long = longest + "d"
    assert parse_accept(too_long) is not parse_accept(too_long)
    assert parse_accept(too_long) == parse_accept(too_long)
    for _ in range(2):
        with pytest.raises(BadRequestError):
            parse_accept("noslash")
    with pytest.raises(TypeError):
        first[0].params["type"] = "text/html"  # type: ignore[index]


JLS = "1.2.840.10008.1.2.4.80"
HTJ2K = "1.2.840.10008.1.2.4.201"
ALL = (EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.5", JLS, J2K, HTJ2K, JPEG)
ONLY_LE = (EXPLICIT_VR_LITTLE_ENDIAN,)


@pytest.mark.parametrize(
    ("accept", "stored", "targets", "expected"),
    [
        (None, JPEG, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        ("*/*", JPEG, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="application/dicom"', JPEG, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        ("multipart/related; type=application/dicom; transfer-syntax=*", JPEG, ALL, STORED),
        (f'multipart/related; type="application/dicom"; transfer-syntax={JPEG}', JPEG, (), STORED),
        ("multipart/related", J2K, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        (f"multipart/related; type=application/dicom; transfer-syntax={JLS}", J2K, ALL, JLS),
        (f"multipart/related; type=application/dicom; transfer-syntax={J2K}, */*;q=0.2", JPEG,
         ONLY_LE, EXPLICIT_VR_LITTLE_ENDIAN),
        (f"multipart/related; type=application/dicom; transfer-syntax={HTJ2K};q=0.5, "
         f"multipart/related; type=application/dicom; transfer-syntax={JLS};q=0.9", J2K, ALL, JLS),
    ],
)  # fmt: skip
def test_negotiate_instances(
    accept: str | None, stored: str, targets: tuple[str, ...], expected: str
) -> None:
    assert negotiate_instances(accept, stored, targets) == expected


def test_negotiate_instances_406_names_what_we_can_send() -> None:
    accept = f"multipart/related; type=application/dicom; transfer-syntax={J2K}"
    with pytest.raises(NotAcceptableError) as exc:
        negotiate_instances(accept, JPEG, ONLY_LE, "no decoder for X")
    assert EXPLICIT_VR_LITTLE_ENDIAN in exc.value.message and JPEG in exc.value.message
    assert "no decoder for X" in exc.value.message
    with pytest.raises(NotAcceptableError):
        negotiate_instances("application/dicom+json", JPEG, ALL)
    with pytest.raises(NotAcceptableError):  # the default needs a decoder we lack
        negotiate_instances(None, JPEG, ())


@pytest.mark.parametrize(
    ("accept", "stored", "targets", "expected"),
    [
        (None, JPEG, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="application/octet-stream"; transfer-syntax=*', JPEG, (), STORED),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", JPEG, (), STORED),
        ('multipart/related; type="image/jpeg"', JPEG, (), STORED),
        ('multipart/related; type="image/*"', J2K, (), STORED),
        ("multipart/related; type=application/octet-stream", J2K, ALL, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jls", multipart/related; type=application/octet-stream',
         JPEG, ONLY_LE, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jls"', JPEG, ALL, JLS),
        ('multipart/related; type="image/jphc"', J2K, ALL, HTJ2K),
        (f'multipart/related; type="image/jp2"; transfer-syntax={J2K}', JLS, ALL, J2K),
    ],
)  # fmt: skip
def test_negotiate_frames(
    accept: str | None, stored: str, targets: tuple[str, ...], expected: str
) -> None:
    assert negotiate_frames(accept, stored, targets) == expected


def test_negotiate_frames_406() -> None:
    with pytest.raises(NotAcceptableError):
        negotiate_frames('multipart/related; type="image/jp2"', JPEG, ONLY_LE)
    with pytest.raises(NotAcceptableError):  # image/jls cannot carry a JPEG 2000 syntax
        negotiate_frames(f'multipart/related; type="image/jls"; transfer-syntax={J2K}', JPEG, ALL)


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


def test_image_type_without_transfer_syntax_means_its_default() -> None:
    """image/jpeg means JPEG Baseline (PS3.18 Table 8.7.3-2): JPEG Lossless stored frames are
    converted, not sent as stored (browsers cannot decode them); found by review."""
    lossless = "1.2.840.10008.1.2.4.70"
    assert negotiate_frames('multipart/related; type="image/jpeg"', lossless, ALL) == JPEG
    assert negotiate_frames('multipart/related; type="image/jpeg"', JPEG, ALL) == STORED
