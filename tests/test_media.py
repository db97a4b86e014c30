"""Content-Type / Accept parsing and negotiation (PS3.18 8.7, RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest

from dicomweb_server.errors import BadRequestError, NotAcceptableError, UnsupportedMediaTypeError
from dicomweb_server.media import mediatypes
from dicomweb_server.media.headers import accepts_gzip, none_match
from dicomweb_server.media.mediatypes import (
    ACCEPT_CACHE_MAX_CHARS,
    ACCEPT_CACHE_SIZE,
    EXPLICIT_VR_LITTLE_ENDIAN,
    STORED,
    parse_accept,
    stow_boundary,
)
from dicomweb_server.media.negotiate import (
    BULKDATA_ACCEPTABLE,
    bulkdata_unacceptable,
    frame_media_type,
    negotiate_dicom_model,
    negotiate_frames,
    negotiate_instances,
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


@pytest.mark.parametrize("bad", ["noslash", "text/html; q=abc", "a/b; novalue", "a/b; q=1.5"])
def test_parse_accept_malformed_ranges_are_ignored(bad: str) -> None:
    """PS3.18 8.7.7: Accept values that are not valid "shall be ignored"."""
    assert parse_accept(bad) == ()
    assert [r.essence for r in parse_accept(f"{bad}, c/d")] == ["c/d"]


def test_parsed_accept_headers_are_kept_and_bounded() -> None:
    """The same header is parsed once; distinct headers past ACCEPT_CACHE_SIZE push the
    oldest out; headers over ACCEPT_CACHE_MAX_CHARS are not kept; kept ranges cannot be
    changed."""
    kept = mediatypes._parse_accept_kept
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
    with pytest.raises(NotAcceptableError):  # application/dicom means Explicit VR LE
        negotiate_instances("multipart/related; type=application/dicom", JPEG, ())
    with pytest.raises(NotAcceptableError):  # no type: application/dicom too
        negotiate_instances("multipart/related", JPEG, ())


@pytest.mark.parametrize("accept", [None, "*/*", "multipart/*", "multipart/related; type=*/*"])
def test_negotiate_instances_without_a_named_type_falls_back_to_as_stored(
    accept: str | None,
) -> None:
    """A client that names no part type accepts the instance as stored when it cannot be
    decoded (field notes 3); Explicit VR Little Endian stays the choice when it can be made."""
    assert negotiate_instances(accept, JPEG, ()) == STORED
    assert negotiate_instances(accept, JPEG, ONLY_LE) == EXPLICIT_VR_LITTLE_ENDIAN
    assert negotiate_instances(accept, EXPLICIT_VR_LITTLE_ENDIAN, ONLY_LE) == STORED


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
    def negotiate_json(accept: str | None) -> str:
        return negotiate_dicom_model(accept, multipart=False, single=False)

    assert negotiate_json(None) == "application/dicom+json"
    assert negotiate_json("application/json") == "application/json"
    assert negotiate_json("application/xml, application/json;q=0.3") == "application/json"
    with pytest.raises(NotAcceptableError):
        negotiate_json("application/dicom+xml")


@pytest.mark.parametrize(
    ("accept", "multipart", "single", "expected"),
    [
        (None, True, True, "application/dicom+json"),
        ("*/*", True, True, "application/dicom+json"),
        ('multipart/related; type="application/dicom+xml"', True, False, "multipart/related"),
        ("multipart/related", True, False, "multipart/related"),
        ("multipart/*", True, False, "multipart/related"),
        ('multipart/related; type="application/dicom"', True, False, None),
        ('multipart/related; type="application/dicom+xml"', False, True, None),
        ("application/dicom+xml", True, False, None),  # one document: not for several
        ("application/dicom+xml", True, True, "application/dicom+xml"),
        ("application/dicom+xml, application/json;q=0.1", True, False, "application/json"),
        (
            'application/json;q=0.5, multipart/related; type="application/dicom+xml"',
            True,
            False,
            "multipart/related",
        ),
    ],
)
def test_negotiate_dicom_model(
    accept: str | None, multipart: bool, single: bool, expected: str | None
) -> None:
    """PS3.18 10.4.4: DICOM XML as multipart/related parts where several data sets answer,
    a bare application/dicom+xml only for one; JSON by default."""
    if expected is None:
        with pytest.raises(NotAcceptableError, match="application/dicom\\+json"):
            negotiate_dicom_model(accept, multipart=multipart, single=single)
    else:
        assert negotiate_dicom_model(accept, multipart=multipart, single=single) == expected


def test_stow_boundary() -> None:
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="a b:c"') == (
        "a b:c", "application/dicom"
    )  # fmt: skip
    assert stow_boundary("multipart/related; boundary=xyz") == ("xyz", "application/dicom")
    assert stow_boundary('multipart/related; type="application/dicom+json"; boundary=x') == (
        "x", "application/dicom+json"
    )  # fmt: skip
    assert stow_boundary('multipart/related; type="application/dicom+xml"; boundary=x') == (
        "x", "application/dicom+xml"
    )  # fmt: skip
    for bad in (
        None,
        "application/dicom",
        'multipart/related; type="application/pdf"; boundary=x',
    ):
        with pytest.raises(UnsupportedMediaTypeError):
            stow_boundary(bad)
    with pytest.raises(BadRequestError):
        stow_boundary('multipart/related; type="application/dicom"')


def test_image_type_without_transfer_syntax_means_its_default() -> None:
    """image/jpeg means JPEG Lossless SV1 (PS3.18 Table 8.7.3-5, RESTful column "D"), never
    lossy Baseline unless named; frames stored lossy (Baseline, Extended) are sent as stored,
    the archive having "only access to the pixel data in lossy compressed form" (8.7.3)."""
    sv1 = "1.2.840.10008.1.2.4.70"
    jpeg = 'multipart/related; type="image/jpeg"'
    with_sv1 = (*ALL, sv1)
    assert negotiate_frames(jpeg, sv1, ALL) == STORED
    assert negotiate_frames(jpeg, EXPLICIT_VR_LITTLE_ENDIAN, with_sv1) == sv1
    assert negotiate_frames(jpeg, J2K, with_sv1) == sv1
    assert negotiate_frames(jpeg, JPEG, with_sv1) == STORED
    assert negotiate_frames(jpeg, "1.2.840.10008.1.2.4.51", with_sv1) == STORED
    assert negotiate_frames(f"{jpeg}; transfer-syntax={JPEG}", J2K, with_sv1) == JPEG
    with pytest.raises(NotAcceptableError):  # Baseline is there, but not asked for
        negotiate_frames(jpeg, J2K, ALL)


ETAG = '"0123abcd"'


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),
        ("", False),
        (ETAG, True),
        (f"W/{ETAG}", True),  # weak comparison (RFC 9110 13.1.2): nginx gzip weakens ETags
        (f'"other", {ETAG}', True),  # a list, the match second
        (f'W/"other",W/{ETAG}', True),
        (f'"a,b", {ETAG}', True),  # a comma inside an entity tag is data
        (f" ,, {ETAG} ,", True),  # empty list elements (RFC 9110 5.6.1)
        ("*", True),
        (" * ", True),
        ('"other", W/"second"', False),
        ('"0123abc"', False),
        ("garbage", False),  # not a list of entity tags: ignored
        (ETAG.strip('"'), False),  # unquoted
        (f"w/{ETAG}", False),  # the weak indicator is case-sensitive
        (f"{ETAG} garbage", False),
        (f"garbage, {ETAG}", False),
        (f"*, {ETAG}", False),  # "*" stands alone
        (ETAG[:-1] + '\\"', False),  # another tag, ending in a backslash (etagc)
        ('"\x00"', False),  # a control character is not etagc
    ],
)
def test_none_match(header: str | None, expected: bool) -> None:
    assert none_match(header, ETAG) is expected
    assert none_match(header, f"W/{ETAG}") is expected  # our side weak: the same comparison


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, False),  # no header: not compressed (a client that never asked)
        ("", False),
        ("gzip", True),
        ("GZIP", True),  # codings are case-insensitive (RFC 9110 8.4.1)
        ("x-gzip", True),  # RFC 9110 8.4.1.3
        ("gzip, deflate, br", True),
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("gzip ; Q=0.5", True),
        ("gzip;q=0.001", True),
        ("gzip;q=0, identity", False),
        ("gzip;q=0.000", False),
        ("GZIP;q=0", False),
        ("identity", False),
        ("deflate, br", False),
        ("*", True),  # `*` covers gzip
        ("*;q=0.5", True),
        ("*, gzip;q=0", False),  # gzip listed with q=0 wins over `*`
        ("gzip;q=0, *", False),
        ("*;q=0", False),
        ("gzip;q=0.5, identity", False),  # identity preferred
        ("gzip;q=0.5, identity;q=0.5", True),  # a tie: the smaller body
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("gzip;q=abc", False),  # a bad q-value: the element is skipped
        ("gzip;q=2", False),
        ("gzip;q=1.5", False),
        ("gzip;q=, identity", False),
        ("gzip-not, notgzip", False),  # not a substring test
        (",,gzip,,", True),
    ],
)
def test_accepts_gzip(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


@pytest.mark.parametrize("accept", [None, "*/*", "multipart/*", "multipart/related; type=*/*"])
def test_negotiate_frames_without_a_named_type_falls_back_to_as_stored(accept: str | None) -> None:
    assert negotiate_frames(accept, JPEG, ()) == STORED
    assert negotiate_frames(accept, JPEG, ONLY_LE) == EXPLICIT_VR_LITTLE_ENDIAN
    with pytest.raises(NotAcceptableError):  # octet-stream named: uncompressed only
        negotiate_frames('multipart/related; type="application/octet-stream"', JPEG, ())


@pytest.mark.parametrize(
    ("accept", "media", "accepted"),
    [
        ("text/html;q=0, */*", "text/html", False),
        ("text/html;q=0, */*", "text/plain", True),
        ("image/*;q=0, */*;q=0.5", "image/png", False),
        ("image/*;q=0, */*;q=0.5", "application/pdf", True),
        ("image/png;q=0, image/*", "image/jpeg", True),
        ("image/png;q=0, image/*", "image/png", False),
        ("*/*;q=0, text/html", "text/html", True),
    ],
)
def test_a_refused_type_is_not_accepted_through_a_wildcard(
    accept: str, media: str, accepted: bool
) -> None:
    """RFC 9110 12.5.1: the most specific range gives a type its quality; q=0 refuses it."""
    assert any(r.matches(media) for r in parse_accept(accept)) is accepted


@pytest.mark.parametrize(
    ("accept", "stored", "targets", "expected"),
    [
        # application/dicom with no transfer syntax is Explicit VR Little Endian (8.7.3.5.2)
        ('multipart/related; type="application/dicom"; q=0, */*', JPEG, ALL, STORED),
        ("multipart/related; type=application/dicom; transfer-syntax=*; q=0, */*", JPEG, ALL,
         EXPLICIT_VR_LITTLE_ENDIAN),
        (f"multipart/related; type=application/dicom; transfer-syntax={JPEG}; q=0, "
         f'multipart/related; type="application/dicom"; q=0, */*', JPEG, ALL, None),
        ('multipart/related; type="application/dicom"; q=0, multipart/*', JPEG, ONLY_LE, STORED),
        ('multipart/related; type="application/dicom+xml"; q=0, */*', JPEG, ALL,
         EXPLICIT_VR_LITTLE_ENDIAN),  # another part type: no bearing
    ],
)  # fmt: skip
def test_a_refused_transfer_syntax_is_not_sent_for_a_wildcard(
    accept: str, stored: str, targets: tuple[str, ...], expected: str | None
) -> None:
    """RFC 9110 12.5.1: the most specific range gives a representation its quality, and q=0
    refuses it, parameters included. `*/*` was answered in Explicit VR Little Endian (frames
    uncompressed) although a q=0 range refused exactly that: a range with parameters and q=0
    was dropped without refusing anything. The instance as stored is what `*/*` then takes;
    406 when that is refused too."""
    if expected is None:
        with pytest.raises(NotAcceptableError):
            negotiate_instances(accept, stored, targets)
    else:
        assert negotiate_instances(accept, stored, targets) == expected


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ('multipart/related; type="application/octet-stream"; q=0, */*', STORED),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*; q=0, */*",
         EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jpeg"; q=0, */*', EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="application/octet-stream"; q=0, '
         'multipart/related; type="image/*"; q=0, */*', None),
    ],
)  # fmt: skip
def test_a_refused_frame_type_is_not_sent_for_a_wildcard(accept: str, expected: str | None) -> None:
    """As above for frames: `octet-stream; q=0, */*` was sent uncompressed frames."""
    if expected is None:
        with pytest.raises(NotAcceptableError):
            negotiate_frames(accept, JPEG, ALL)
    else:
        assert negotiate_frames(accept, JPEG, ALL) == expected


def test_an_accept_of_more_than_max_ranges_is_a_400() -> None:
    """MAX_ACCEPT_RANGES media ranges (the `accept` parameter's counted with the header's) are
    negotiated, one more is a 400 with the reason. Unbounded, negotiation weighed every
    wildcard range against every refused one: a 14 kB header of `*/*;q=.5` and `a/b;q=0` held
    the event loop 0.6 s, and a 30 kB one (HTTP/2 allows 64 kB) 1.8 s for a rendered image."""
    limit = mediatypes.MAX_ACCEPT_RANGES
    half = ["*/*;q=.5"] * (limit // 2) + [f"a{i}/b;q=0" for i in range(limit // 2)]
    assert len(parse_accept(",".join(half))) == limit // 2
    assert parse_accept(",".join(half[:-1]) + mediatypes.ACCEPT_FALLBACK + half[-1])
    with pytest.raises(BadRequestError) as exc:
        parse_accept(",".join([*half, "image/png"]))
    assert f"more than {limit}" in exc.value.message
    with pytest.raises(BadRequestError):  # the `accept` parameter's ranges count too
        parse_accept(",".join(half) + mediatypes.ACCEPT_FALLBACK + "*/*")
    assert len(parse_accept(", , ,".join(half))) == limit // 2  # empty elements do not count


IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_OHIF_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
_DWC_INSTANCE = ", ".join(
    f'multipart/related; type="application/dicom"; transfer-syntax={ts}'
    for ts in (JLS, J2K, EXPLICIT_VR_LITTLE_ENDIAN)
)
_DWC_FRAMES_Q = (
    f'multipart/related; type="image/jls"; transfer-syntax={JLS}; q=0.9, '
    f'multipart/related; type="image/jp2"; transfer-syntax={J2K}; q=0.5, '
    "multipart/related; type=application/octet-stream; q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "stored", "targets", "instances", "frames"),
    [
        # OHIF and Cornerstone's frame requests: the frames as stored, quoted or not
        # (a frame type for instances, application/dicom for frames: 406)
        (_OHIF_FRAMES, JPEG, ALL, None, STORED),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", IMPLICIT, ALL,
         None, STORED),
        ("multipart/related; type=application/octet-stream", J2K, ALL, None,
         EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jls"', JLS, (), None, STORED),
        ('multipart/related; type="image/jp2"', J2K, ALL, None, STORED),
        ('multipart/related; type="image/jls"', EXPLICIT_VR_LITTLE_ENDIAN, ALL, None, JLS),
        # dicomweb-client: retrieve_instance with several syntaxes (the first that can be
        # made, or as stored); retrieve_instance_frames with q-values
        (_DWC_INSTANCE, J2K, ALL, JLS, None),
        (_DWC_INSTANCE, JLS, (), STORED, None),
        (_DWC_INSTANCE, JPEG, ONLY_LE, EXPLICIT_VR_LITTLE_ENDIAN, None),
        (_DWC_FRAMES_Q, J2K, ALL, None, JLS),
        (_DWC_FRAMES_Q, J2K, (), None, STORED),
        (_DWC_FRAMES_Q, JPEG, ONLY_LE, None, EXPLICIT_VR_LITTLE_ENDIAN),
        # no Accept, */*: Explicit VR Little Endian when it can be made, else as stored
        (None, JPEG, (), STORED, STORED),
        ("*/*", IMPLICIT, ALL, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN),
        # q=0 ranges with parameters (RFC 9110 12.5.1): native frames as stored are sent
        # uncompressed, which `type="application/octet-stream"; q=0` refuses
        ('multipart/related; type="application/octet-stream"; q=0, */*', IMPLICIT, ALL,
         EXPLICIT_VR_LITTLE_ENDIAN, None),
        ('multipart/related; type="application/octet-stream"; q=0, */*', DEFLATED, (),
         STORED, None),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*; q=0, */*",
         IMPLICIT, ALL, EXPLICIT_VR_LITTLE_ENDIAN, None),
        ('multipart/related; type="application/octet-stream"; q=0, */*', JPEG, ALL,
         EXPLICIT_VR_LITTLE_ENDIAN, STORED),
        # ... and to a wildcard part type of multipart/related, as to */*
        ('multipart/related; type="application/octet-stream"; q=0, '
         'multipart/related; type="*/*"', JPEG, ALL, EXPLICIT_VR_LITTLE_ENDIAN, STORED),
        ('multipart/related; type="application/octet-stream"; q=0, '
         'multipart/related; type="application/*"', EXPLICIT_VR_LITTLE_ENDIAN, ALL, STORED,
         None),
        ('multipart/related; type="application/dicom"; q=0, multipart/related; type="*/*"',
         JPEG, ALL, STORED, EXPLICIT_VR_LITTLE_ENDIAN),
        ('multipart/related; type="image/jls"; q=0, multipart/related; type="image/*"',
         EXPLICIT_VR_LITTLE_ENDIAN, ALL, None, HTJ2K),
        ('multipart/related; type="image/jls"; q=0, multipart/related; type="image/*"', JLS,
         (), None, None),
    ],
)  # fmt: skip
def test_negotiation_table(
    accept: str | None,
    stored: str,
    targets: tuple[str, ...],
    instances: str | None,
    frames: str | None,
) -> None:
    """What real clients send (OHIF, Cornerstone, dicomweb-client) and q=0 refusals, each
    with the transfer syntax the instances and the frames get (None: 406). PS3.18 8.7.3:
    octet-stream with no syntax is uncompressed, `*` as stored, an image type its default
    syntax; RFC 9110 12.5.1: a q=0 range refuses what it names to the wildcards of its
    header. Native frames as stored go as Explicit VR Little Endian octet-stream, so
    `type="application/octet-stream"; q=0, */*` on an Implicit VR instance was sent exactly
    that; `type="*/*"` and `type="image/*"` ignored the q=0 ranges of narrower part types."""
    for negotiate, want in ((negotiate_instances, instances), (negotiate_frames, frames)):
        if want is None:
            with pytest.raises(NotAcceptableError):
                negotiate(accept, stored, targets)
        else:
            assert negotiate(accept, stored, targets) == want, negotiate.__name__


_NO_OCTETS = 'multipart/related; type="application/octet-stream"; q=0'


@pytest.mark.parametrize(
    ("accept", "acceptable"),
    [
        (None, True),
        ("*/*", True),
        ('multipart/related; type="application/octet-stream"', True),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", True),
        (f"{_NO_OCTETS}, */*", False),
        (f"{_NO_OCTETS}, multipart/*", False),
        (f'{_NO_OCTETS}, multipart/related; type="*/*"', False),
        (f'{_NO_OCTETS}, multipart/related; type="application/*"', False),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*; q=0, */*", False),
        (f"multipart/related; type=application/octet-stream; transfer-syntax={JLS}; q=0, */*",
         True),
        ('multipart/related; type="image/jls"; q=0, */*', True),
        ('multipart/related; type="application/dicom"; q=0, */*', True),
        (f'{_NO_OCTETS}, */*;q=0.5, multipart/related; type="application/octet-stream"; q=0.1',
         True),
    ],
)  # fmt: skip
def test_bulk_data_refused_with_q0_is_not_acceptable(accept: str | None, acceptable: bool) -> None:
    """RFC 9110 12.5.1, as for frames: bulk data goes as octet-stream, uncompressed (Explicit
    VR Little Endian, which `transfer-syntax=*` means for it too), so `type="application/
    octet-stream"; q=0, */*` refuses it; the bulk data resources sent it all the same."""
    why = bulkdata_unacceptable(accept)
    assert (why is None) == acceptable
    if why is not None:
        assert why == f"{BULKDATA_ACCEPTABLE}; the Accept refuses it (q=0)"
