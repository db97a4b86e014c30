"""DIMSE identifiers -> the QIDO query model, peers, settings and the command line (no I/O)."""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.presentation import build_context

from dicomweb_server import cli
from dicomweb_server.attributes import Level
from dicomweb_server.config import ConfigError, Settings
from dicomweb_server.dimse import conversion, sending, statuses
from dicomweb_server.dimse.handlers import Handlers, _pairs
from dicomweb_server.dimse.identifier import (
    ERROR_COMMENT_MAX_CHARS,
    IdentifierError,
    Model,
    decode,
    find_response,
    parse_find,
    parse_retrieve,
)
from dicomweb_server.dimse.peers import Peer, parse_peers
from dicomweb_server.dimse.release import Releases
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services
from dicomweb_server.matching import (
    RangeMatch,
    SequenceMatch,
    SingleValueMatch,
    UidListMatch,
    WildcardMatch,
)
from dicomweb_server.sql import compile_search
from dicomweb_server.transcode.codecs import TranscodeError
from tests.dimse_support import converted_whole


def ident(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_find_keys_become_qido_matches() -> None:
    req = parse_find(
        ident("STUDY", PatientName="DOE*", StudyDate="20240101-20241231", StudyInstanceUID="",
              AccessionNumber="A1", InstitutionName=""),
        Model.STUDY_ROOT,
    )  # fmt: skip
    q = req.query
    assert q.level is Level.STUDY
    kinds = {m.attr.keyword: type(m) for m in q.matches}
    assert kinds == {
        "PatientName": WildcardMatch,
        "StudyDate": RangeMatch,
        "AccessionNumber": SingleValueMatch,
    }
    assert [t for t, _ in req.keys] == [0x00080020, 0x00080050, 0x00080080, 0x00100010, 0x0020000D]
    assert {0x00080080, 0x0020000D} <= q.include.tags


def test_image_level_uid_list_and_unique_key_added() -> None:
    req = parse_find(ident("IMAGE", SOPInstanceUID="1.2.3\\1.2.4"), Model.PATIENT_ROOT)
    (m,) = req.query.matches
    assert isinstance(m, UidListMatch) and m.values == ("1.2.3", "1.2.4")
    req = parse_find(ident("SERIES", Modality="CT"), Model.STUDY_ROOT)
    assert (0x0020000E, "UI") in req.keys  # the unique key of the level is always returned


def test_find_multiple_values_stay_any_value() -> None:
    """C-FIND negotiates no Multiple Value Matching (the SCP sends no SOP Class Extended
    Negotiation), so `CT\\PT` keeps its list meaning, any value (PS3.4 C.2.2.2.8 Note 4: the
    semantics are then undefined); QIDO's multiplevaluematching=true does not reach it."""
    req = parse_find(ident("STUDY", ModalitiesInStudy=["CT", "PT"]), Model.STUDY_ROOT)
    (m,) = req.query.matches
    assert isinstance(m, UidListMatch) and m.values == ("CT", "PT")
    assert req.query.warnings == ()


@pytest.mark.parametrize(
    ("model", "identifier", "status"),
    [
        (Model.STUDY_ROOT, ident("PATIENT"), 0xA900),
        (Model.PATIENT_ROOT, ident("WARD"), 0xA900),
        (Model.PATIENT_ROOT, Dataset(), 0xA900),
        (Model.PATIENT_ROOT, ident("PATIENT", StudyDate="20240101"), 0xA900),
        (Model.STUDY_ROOT, ident("SERIES", SOPInstanceUID="1.2"), 0xA900),
        (Model.STUDY_ROOT, ident("STUDY", StudyDate="yesterday"), 0xC000),
        (Model.STUDY_ROOT, ident("STUDY", StudyInstanceUID="1.2.x"), 0xC000),
    ],
)
def test_find_refusals(model: Model, identifier: Dataset, status: int) -> None:
    with pytest.raises(IdentifierError) as info:
        parse_find(identifier, model)
    assert info.value.status == status


def test_keys_not_supported_for_matching_are_ignored_and_named() -> None:
    """A value on an attribute the archive cannot match on is an Optional Key not supported
    for matching (PS3.4 C.4.1.1.4, Pending 0xFF01): left out of the query and named, not
    refused with 0xC000 (found by differential testing against Orthanc, which ignores it)."""
    ds = ident("STUDY", InstitutionName="X", PatientWeight="70", PatientID="P1")
    code = Dataset()
    code.CodeValue = "X1"
    ds.ProcedureCodeSequence = [code]
    req = parse_find(ds, Model.STUDY_ROOT)
    assert [m.attr.keyword for m in req.query.matches] == ["PatientID"]
    assert sorted(req.unsupported) == ["InstitutionName", "PatientWeight", "ProcedureCodeSequence"]
    assert {tag for tag, _ in req.keys} >= {0x00080080, 0x00101030, 0x00081032}  # returned
    assert parse_find(ident("STUDY", PatientID="P1"), Model.STUDY_ROOT).unsupported == ()


@pytest.mark.parametrize("value", ["^^^^", "^", "^=^", "**"])
def test_an_empty_name_is_a_return_key_not_an_unsupported_one(value: str) -> None:
    """Found by review: a PN of delimiters only is the zero-length name, universal matching
    (query: PatientName=^^^^), yet on a key the archive cannot match on it was named an
    Optional Key not supported for matching (Pending 0xFF01), where `` and `*` are return
    keys."""
    ds = ident("STUDY", PatientID="P1", OtherPatientNames=value, PerformingPhysicianName=value)
    req = parse_find(ds, Model.STUDY_ROOT)
    assert req.unsupported == ()
    assert {tag for tag, _ in req.keys} >= {0x00101001, 0x00081050}  # returned
    # a name that is not only delimiters is still one the archive cannot match on
    req = parse_find(ident("STUDY", PatientID="P1", OtherPatientNames="^A"), Model.STUDY_ROOT)
    assert req.unsupported == ("OtherPatientNames",)


def _read(*elements: tuple[int, str]) -> Dataset:
    """An identifier as pynetdicom reads one off the wire (Implicit VR Little Endian), values
    as sent, however long."""
    raw = b""
    for tag, text in elements:
        value = text.encode() + b" " * (len(text) % 2)
        raw += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    return read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


@pytest.mark.parametrize(
    ("keyword", "level", "value", "quoted"),
    [
        ("SeriesNumber", "SERIES", "99999999999", "'99999999999'"),
        ("SeriesNumber", "SERIES", "-2147483649", "'-2147483649'"),
        ("InstanceNumber", "IMAGE", "123456789012", "'123456789012'"),  # IS's longest (12)
        ("InstanceNumber", "IMAGE", "1234567890123456", "'1234567890123456'"),  # the most that fits
        ("InstanceNumber", "IMAGE", "12345678901234567", "'1234567890123...'"),
        ("SeriesNumber", "SERIES", "9" * 1000, "'" + "9" * 15 + "...'"),
    ],
)
def test_integer_key_refusal_quotes_the_value(
    keyword: str, level: str, value: str, quoted: str
) -> None:
    """An integer matching key that is none (or out of IS's range) is refused with a reason
    that fits the error comment (LO, ERROR_COMMENT_MAX_CHARS) and quotes the value as sent:
    whole when it fits, else its start and `...`. It used to end in the first three digits."""
    tag = {"SeriesNumber": 0x00200011, "InstanceNumber": 0x00200013}[keyword]
    with warnings.catch_warnings():  # pydicom warns of an IS past 12 characters, or not
        warnings.simplefilter("ignore", UserWarning)  # (its validation mode is global)
        ds = _read((0x00080052, level), (tag, value))
        with pytest.raises(IdentifierError) as info:
            parse_find(ds, Model.STUDY_ROOT)
    comment = statuses.status(info.value.status, info.value.message).ErrorComment
    assert comment == f"{keyword} {quoted} is no integer in -2^31..2^31-1"
    assert len(comment) <= ERROR_COMMENT_MAX_CHARS and info.value.status == 0xC000


def test_request_attributes_sequence_keys_match() -> None:
    """PS3.4 C.2.2.2.6: the keys of the query sequence's one item, matched as QIDO's
    `RequestAttributesSequence.Key` paths; empty keys in it are return keys."""
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS*"
    item.RequestedProcedureID = ""
    req = parse_find(ident("SERIES", StudyInstanceUID="1.2.3", RequestAttributesSequence=[item]),
                     Model.STUDY_ROOT)  # fmt: skip
    (m,) = [m for m in req.query.matches if isinstance(m, SequenceMatch)]
    assert m.attr.keyword == "RequestAttributesSequence"
    assert [(i.attr.keyword, type(i)) for i in m.items] == [
        ("ScheduledProcedureStepID", WildcardMatch)
    ]
    refusals = [
        (ident("SERIES", RequestAttributesSequence=[item, item]), 0xC000),  # two items
        (ident("STUDY", RequestAttributesSequence=[item]), 0xA900),  # below the level
    ]
    for identifier, status in refusals:
        with pytest.raises(IdentifierError) as info:
            parse_find(identifier, Model.STUDY_ROOT)
        assert info.value.status == status, identifier
    other = Dataset()
    other.AccessionNumber = "A1"  # not a matching key inside this sequence: ignored, named
    req = parse_find(ident("SERIES", RequestAttributesSequence=[other]), Model.STUDY_ROOT)
    assert req.unsupported == ("RequestAttributesSequence.AccessionNumber",)
    assert not [m for m in req.query.matches if isinstance(m, SequenceMatch)]


def test_sequence_return_key_accepted_matching_unsupported() -> None:
    seq_item = Dataset()
    seq_item.CodeValue = ""
    req = parse_find(ident("STUDY", ProcedureCodeSequence=[seq_item]), Model.STUDY_ROOT)
    assert req.unsupported == ()
    seq_item.CodeValue = "X1"
    req = parse_find(ident("STUDY", ProcedureCodeSequence=[seq_item]), Model.STUDY_ROOT)
    assert req.unsupported == ("ProcedureCodeSequence",) and req.query.matches == ()


def test_patient_level_compiles_to_one_row_per_patient() -> None:
    req = parse_find(ident("PATIENT", PatientID="P1", PatientName=""), Model.PATIENT_ROOT)
    sql_text, args = compile_search(req.query)
    assert "DISTINCT ON (st.patient_fk)" in sql_text
    assert "st.patient_id = $1" in sql_text
    assert args[0] == "P1"


def test_retrieve_identifier() -> None:
    q = parse_retrieve(
        ident("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3\\1.2.4"),
        Model.STUDY_ROOT,
    )
    assert q.level is Level.INSTANCE
    assert {m.attr.keyword for m in q.matches} == {"StudyInstanceUID", "SeriesInstanceUID"}
    for bad in (ident("SERIES", StudyInstanceUID="1.2"), ident("STUDY", StudyInstanceUID="1.*")):
        with pytest.raises(IdentifierError) as info:
            parse_retrieve(bad, Model.STUDY_ROOT)
        assert info.value.status == 0xA900


def test_find_response_has_exactly_the_keys_asked() -> None:
    req = parse_find(
        ident("STUDY", StudyInstanceUID="", PatientName="", StudyDescription=""), Model.STUDY_ROOT
    )
    result = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Anna"}]},
        "00100020": {"vr": "LO", "Value": ["not asked"]},
    }
    rsp = find_response(req, result, "DICOMWEB")
    assert rsp.QueryRetrieveLevel == "STUDY"
    assert rsp.StudyInstanceUID == "1.2.3"
    assert rsp.PatientName == "Müller^Anna"
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert rsp.StudyDescription in ("", None)  # asked, no value: empty
    assert "PatientID" not in rsp


def test_find_response_in_utf8_when_its_character_set_cannot_encode_a_value() -> None:
    """A series result carries the study's PatientName (stored as ISO_IR 126, Greek) with the
    series' Specific Character Set (ISO_IR 100): sent in UTF-8, not as `?????????`. Found
    by differential testing against Orthanc."""
    req = parse_find(ident("SERIES", SeriesInstanceUID="", PatientName=""), Model.STUDY_ROOT)
    greek = {"vr": "PN", "Value": [{"Alphabetic": "Διονυσιος"}]}
    latin1 = {"vr": "CS", "Value": ["ISO_IR 100"]}
    rsp = find_response(req, {"00080005": latin1, "00100010": greek}, "DICOMWEB")
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    raw = encode(rsp, True, True)  # as pynetdicom sends it: Implicit VR Little Endian
    assert raw is not None and "Διονυσιος".encode() in raw
    # A value the stored character set encodes keeps it; ASCII alone needs none.
    french = {"vr": "PN", "Value": [{"Alphabetic": "Buc^Jérôme"}]}
    rsp = find_response(req, {"00080005": latin1, "00100010": french}, "DICOMWEB")
    assert rsp.SpecificCharacterSet == "ISO_IR 100"
    rsp = find_response(req, {"00100010": french}, "DICOMWEB")
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    ascii_only = {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert "SpecificCharacterSet" not in find_response(req, {"00100010": ascii_only}, "D")


@pytest.mark.parametrize(
    ("names", "value"),
    [
        # pydicom encodes ISO_IR 13 (JIS X 0201) itself: no kanji, although shift_jis has them.
        (["ISO_IR 13"], {"Alphabetic": "Yamada^Taro", "Ideographic": "山田^太郎"}),
        # pydicom's name for the default repertoire is an alias of Latin-1: ISO_IR 6 is ASCII.
        (["ISO_IR 6"], {"Alphabetic": "Müller^Jürgen"}),
        (["", "ISO 2022 IR 87"], {"Alphabetic": "Müller^Jürgen"}),
        # pydicom writes GB2312 bytes without the escape sequence of ISO 2022 IR 58.
        (["", "ISO 2022 IR 58"], {"Alphabetic": "Zhang^XiaoDong", "Ideographic": "张^小东"}),
    ],
)
def test_find_response_in_utf8_when_pydicom_would_not_write_the_value_in_its_charset(
    names: list[str], value: dict[str, str]
) -> None:
    """Found by review: the check asked Python's codec, not what pydicom writes, so these
    went out as `??^??` or as bytes the declared character set does not have."""
    req = parse_find(ident("SERIES", SeriesInstanceUID="", PatientName=""), Model.STUDY_ROOT)
    charset = {"vr": "CS", "Value": names}
    result = {"00080005": charset, "00100010": {"vr": "PN", "Value": [value]}}
    rsp = find_response(req, result, "DICOMWEB")
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    raw = encode(rsp, True, True)
    assert raw is not None and list(value.values())[-1].encode() in raw


@pytest.mark.parametrize(
    ("names", "value"),
    [
        (["", "ISO 2022 IR 87"], {"Alphabetic": "Yamada^Taro", "Ideographic": "山田^太郎"}),
        (["ISO 2022 IR 100", "ISO 2022 IR 126"], {"Alphabetic": "Γιάννης Müller"}),
        (["", "ISO 2022 IR 149"], {"Alphabetic": "Hong^Gildong", "Ideographic": "洪^吉洞"}),
        (["GB18030"], {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}),
        (["ISO_IR 13"], {"Alphabetic": "ﾔﾏﾀﾞ^ﾀﾛｳ"}),
        (["ISO_IR 6"], {"Alphabetic": "Doe^John"}),
    ],
)
def test_find_response_keeps_a_charset_pydicom_writes_the_value_in(
    names: list[str], value: dict[str, str]
) -> None:
    req = parse_find(ident("SERIES", SeriesInstanceUID="", PatientName=""), Model.STUDY_ROOT)
    charset = {"vr": "CS", "Value": names}
    result = {"00080005": charset, "00100010": {"vr": "PN", "Value": [value]}}
    rsp = find_response(req, result, "DICOMWEB")
    declared = rsp.SpecificCharacterSet
    assert (declared if isinstance(declared, MultiValue) else [declared]) == names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns when it replaces a character
        raw = encode(rsp, True, True)
    assert raw is not None
    back = read_dataset(io.BytesIO(raw), True, True)
    assert str(back.PatientName) == "=".join(value.values())


def test_peers() -> None:
    peers = parse_peers('{"WS1": {"host": "10.0.0.7", "port": 104}}')
    assert peers == {"WS1": Peer("WS1", "10.0.0.7", 104)}
    bad_peers = (
        "[]",
        "{",
        '{"WS1": {"host": "h"}}',
        '{"WS1": {"host": "h", "port": 0}}',
        '{"A\\\\B": {"host": "h", "port": 1}}',
        '{"WAY-TOO-LONG-AE-TITLE": {"host": "h", "port": 1}}',
    )
    for bad in bad_peers:
        with pytest.raises(ConfigError):
            parse_peers(bad)


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "DICOMWEB_DIMSE_PORT": "11112",
            "DICOMWEB_AE_TITLE": "ARCHIVE",
            "DICOMWEB_DIMSE_ALLOWED_AES": "CT1, WS2",
            "DICOMWEB_DIMSE_MAX_ASSOCIATIONS": "3",
            "DICOMWEB_DIMSE_PEERS": "/etc/peers.json",
        }
    )
    assert (s.dimse_port, s.ae_title, s.dimse_max_associations) == (11112, "ARCHIVE", 3)
    assert s.dimse_allowed_aes == ("CT1", "WS2")
    assert s.dimse_peers == Path("/etc/peers.json")
    assert Settings.from_env({}).dimse_port is None  # off by default
    for env in ({"DICOMWEB_AE_TITLE": "A" * 17}, {"DICOMWEB_DIMSE_MAX_ASSOCIATIONS": "0"}):
        with pytest.raises(ConfigError):
            Settings.from_env(env)


def test_cli_refuses_dimse_with_several_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--workers", "2", "--dimse-port", "11112"]) == 2
    assert "--workers 1" in capsys.readouterr().err
    assert cli.main(["serve", "--ae-title", "THIS-IS-TOO-LONG-A-TITLE"]) == 2


def test_deflated_identifier_inflates_up_to_the_limit() -> None:
    """identifier.decode inflates a Deflated identifier (PS3.5 A.5) no further than the
    bound it is given (DIMSE_MAX_IDENTIFIER_BYTES): one of exactly that size decodes, one
    byte more is 0xC000 (pynetdicom inflated any, a small one to gigabytes)."""
    ds = ident("STUDY", PatientID="X")
    plain = cast(bytes, encode(ds, False, True)) + struct.pack("<HH2sH", 0x0009, 0x1000, b"OB", 0)
    pad = 1000
    plain += struct.pack("<I", pad) + b"\x00" * pad  # (0009,1000) OB, explicit: 12-byte header
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(plain) + packer.flush()
    assert decode(deflated, False, True, True, len(plain)).PatientID == "X"
    with pytest.raises(IdentifierError) as refused:
        decode(deflated, False, True, True, len(plain) - 1)
    assert refused.value.status == 0xC000
    assert refused.value.message == f"identifier inflates past {len(plain) - 1} bytes"


class _CancelledEvent:
    """What Handlers.find reads of a pynetdicom Event, with a C-CANCEL already received."""

    is_cancelled = True

    def __init__(self) -> None:
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
        )

        self.identifier = ident("STUDY", StudyInstanceUID="")
        # The association the bytes sent are counted on (dimse/retrieval.BytesSent).
        self.assoc = SimpleNamespace(bind=lambda *_: None, unbind=lambda *_: None)
        # Whether the requestor asked to release it (dimse/release.py): it did not.
        self.assoc.dul = SimpleNamespace(releases=Releases(self.assoc))
        # Handlers decode the identifier as received (identifier.decode), on its context.
        self.request = SimpleNamespace(
            AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind,
            Identifier=io.BytesIO(cast(bytes, encode(self.identifier, True, True))),
        )
        self.context = SimpleNamespace(transfer_syntax=ImplicitVRLittleEndian)


def test_find_honours_c_cancel() -> None:
    loop = asyncio.new_event_loop()
    try:
        handlers = Handlers(cast(Services, None), loop, "DICOMWEB", {}, "http://x")
        results: Iterator[Any] = handlers.find(cast(Any, _CancelledEvent()))
        assert list(results) == [(0xFE00, None)]  # PS3.4 C.4.1.2.3: Cancel, no more matches
    finally:
        loop.close()


def _stored(sop_class: str, ts: str, **pixels: Any) -> StoredInstance:
    return StoredInstance("1.2", "1.2.3", "1.2.3.4", sop_class, "0" * 32, ts, 100, 1, None,
                          None, False, **pixels)  # fmt: skip


def test_contexts_as_stored_first_then_one_fallback_each() -> None:
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    jls, j2k, rle = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
    found = [
        _stored(ct, ts)
        for ts in (
            jls,
            j2k,
            rle,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
        )
    ]
    found.append(_stored(mr, jls))
    us = "1.2.840.10008.5.1.4.1.1.6.1"
    found.append(_stored(us, ExplicitVRBigEndian))
    got = [(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in conversion.contexts(found)]
    native = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    # Fallbacks that repeat an as-stored context (the other native syntax here) are left
    # out; big endian is converted, so it has the same fallback as the other syntaxes.
    assert got == [
        (ct, (jls,)), (ct, (j2k,)), (ct, (rle,)), (ct, (ExplicitVRLittleEndian,)),
        (ct, (ImplicitVRLittleEndian,)), (ct, (ExplicitVRBigEndian,)), (mr, (jls,)),
        (us, (ExplicitVRBigEndian,)), (ct, native), (mr, native), (us, native),
    ]  # fmt: skip


def test_pairs_are_the_contexts_we_may_send_on() -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ours = build_context(ct, [ExplicitVRLittleEndian])
    ours.context_id, ours.result = 1, 0x00
    ours._as_scu, ours._as_scp = True, False
    theirs = build_context(ct, [ImplicitVRLittleEndian])
    theirs.context_id, theirs.result = 3, 0x00
    theirs._as_scu, theirs._as_scp = False, True
    assert _pairs([ours, theirs]) == {(ct, ExplicitVRLittleEndian)}


def test_decode_for_a_peer_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples: Path
) -> None:
    """DIMSE_DECODE_MAX_BYTES bounds what is decoded at once: a frame of a multi-frame
    instance converted into a scratch file (the 15 frames of 128 x 128 16-bit pixels here)."""
    jls = "1.2.840.10008.1.2.4.80"
    src = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    frame = 128 * 128 * 2
    inst = StoredInstance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                          ds.SOPClassUID, "0" * 32, jls, src.stat().st_size, 15, None, None,
                          True, rows=128, columns=128, samples_per_pixel=1,
                          bits_allocated=16)  # fmt: skip
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(conversion, "DIMSE_DECODE_MAX_BYTES", frame - 1)
    with pytest.raises(TranscodeError, match=f"at most {frame - 1} are decoded"):
        converted_whole(inst, src, ExplicitVRLittleEndian, scratch)
    monkeypatch.setattr(conversion, "DIMSE_DECODE_MAX_BYTES", frame)  # 1/15 of the instance
    sent = converted_whole(inst, src, ExplicitVRLittleEndian, scratch)
    assert pydicom.dcmread(sent.stored_path).NumberOfFrames == 15
    sending.remove_scratch(sent)
    unknown = _stored("1.2.840.10008.5.1.4.1.1.2", jls)  # no Image Pixel values indexed
    with pytest.raises(TranscodeError, match="unknown size"):
        converted_whole(unknown, tmp_path / "unread", ExplicitVRLittleEndian,
                                      scratch)  # fmt: skip
    assert list(scratch.iterdir()) == []


def test_a_failed_conversion_for_a_peer_leaves_no_scratch_file(tmp_path: Path) -> None:
    """A conversion that fails (a codec refusing the stored frames) removes its scratch file;
    the sub-operation fails (handlers._to_send)."""
    from tests.helpers import make_instance

    src = tmp_path / "broken.dcm"
    made = make_instance(rows=8, cols=8)
    made.compress("1.2.840.10008.1.2.5")
    made.PixelData = made.PixelData[:40]  # the RLE segments cut short
    made.save_as(src, enforce_file_format=True)
    inst = _stored(str(made.SOPClassUID), "1.2.840.10008.1.2.5", rows=8, columns=8,
                   samples_per_pixel=1, bits_allocated=16)  # fmt: skip
    scratch = tmp_path / "scratch"
    with pytest.raises(TranscodeError):
        converted_whole(inst, src, ExplicitVRLittleEndian, scratch)
    assert list(scratch.iterdir()) == []


def test_private_return_key_with_its_creator() -> None:
    """Found by review: a private return key comes with its Private Creator element, which
    always has a value, and that value was taken for a matching key the archive does not
    have (0xC000): no private attribute could be asked for."""
    ds = ident("STUDY", StudyInstanceUID="")
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "")
    req = parse_find(ds, Model.STUDY_ROOT)
    assert req.query.matches == ()
    assert req.unsupported == ()
    ds.add_new(0x00091002, "LO", "a value")  # a private key cannot be matched: unsupported
    req = parse_find(ds, Model.STUDY_ROOT)
    assert req.query.matches == () and req.unsupported == ("(0009,1002)",)


@pytest.mark.parametrize("small", [False, True])
def test_a_data_set_read_without_vrs_is_sent_as_stored(
    samples: Path, tmp_path: Path, small: bool
) -> None:
    """pydicom's SC_rgb_jpeg.dcm says JPEG Baseline (explicit VR) and holds an implicit VR
    data set: read so, its elements have no VR (Pixel Data "OB or OW"). Sent as stored to a
    peer that took its syntax, pynetdicom's encoding failed ("encoding without a string
    argument", an ambiguous VR for Pixel Data short enough to be read) and the C-GET/C-MOVE
    sub-operation with it; its elements are converted first now, as for the other syntax."""
    from tests.helpers import make_instance
    from tests.test_convert_stream import _implicit_body

    path = samples / "real/pydicom/SC_rgb_jpeg.dcm"
    if small:  # Pixel Data under the C-GET's defer size: read, its VR ambiguous
        made = make_instance(rows=8, cols=8)
        made.compress("1.2.840.10008.1.2.5")
        path = tmp_path / "small.dcm"
        _implicit_body(made, "1.2.840.10008.1.2.5", path)
    src = pydicom.dcmread(path)
    ts = str(src.file_meta.TransferSyntaxUID)
    inst = _stored(str(src.SOPClassUID), ts)
    ds = conversion.as_stored_for_peer(inst, path, {(inst.sop_class_uid, ts)})
    raw = encode(ds, False, True)  # as pynetdicom sends it in the stored syntax
    assert raw is not None
    sent = read_dataset(io.BytesIO(raw), False, True)
    assert sent["PatientName"].VR == "PN" and sent.PatientName == src.PatientName
    assert sent["PixelData"].VR == "OB" and sent.PixelData == src.PixelData
