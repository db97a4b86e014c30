"""The DIMSE front door, Query/Retrieve: C-FIND, C-MOVE and C-GET driven by dcmtk's findscu,
movescu and getscu and by pynetdicom SCUs, over instances stored with STOW-RS.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.config import Settings
from dicomweb_server.dimse import conversion, handlers
from tests.dimse_support import (
    PEER,
    SCU,
    Archive,
    Peer,
    archive_with_peer,
    as_part10,
    associate,
    audit_rows,
    audit_seq,
    dataset_bytes,
    dcmtk,
    get_study,
    identifier,
    in_thread,
    received_data_set,
    requestor_store,
    running_archive,
    running_peer,
    scu,
    stow,
    wado_instance,
)
from tests.helpers import ROOT, make_instance, multipart_body, stow_headers

pytestmark = [pytest.mark.db, pytest.mark.usefixtures("no_spool_left_behind")]


# -- Query ----------------------------------------------------------------------------------


def _find(archive: Archive, model: str, ident: Dataset) -> list[tuple[int, Dataset | None]]:
    ae = scu(model)
    assoc = associate(ae, archive)
    try:
        return [(int(st.Status), found) for st, found in assoc.send_c_find(ident, model)]
    finally:
        assoc.release()


async def test_find_stowed_instance_at_every_level(archive: Archive) -> None:
    ds = make_instance(patient_id="FIND-1", patient_name="Find^Me", modality="MR")
    other = make_instance(patient_id="OTHER", patient_name="Other^One")
    await stow(archive, ds, other)
    patient_root = PatientRootQueryRetrieveInformationModelFind
    study_root = StudyRootQueryRetrieveInformationModelFind

    got = await in_thread(
        _find, archive, patient_root,
        identifier("PATIENT", PatientID="FIND-1", PatientName="", PatientSex="",
                    NumberOfPatientRelatedStudies=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    match = got[0][1]
    assert match is not None
    assert match.PatientName == "Find^Me"
    assert match.NumberOfPatientRelatedStudies == 1
    assert match.QueryRetrieveLevel == "PATIENT"
    assert "StudyInstanceUID" not in match  # only what was asked for

    for model in (patient_root, study_root):
        got = await in_thread(
            _find, archive, model,
            identifier("STUDY", PatientID="FIND-1", StudyInstanceUID="", StudyDate="",
                        ModalitiesInStudy=""),
        )  # fmt: skip
        assert [s for s, _ in got] == [0xFF00, 0x0000]
        match = got[0][1]
        assert match is not None
        assert match.StudyInstanceUID == ds.StudyInstanceUID
        assert match.StudyDate == "20240115"
        assert match.ModalitiesInStudy == "MR"

    got = await in_thread(
        _find, archive, study_root,
        identifier("SERIES", StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID="",
                    Modality="MR", NumberOfSeriesRelatedInstances=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    assert got[0][1] is not None and got[0][1].SeriesInstanceUID == ds.SeriesInstanceUID

    got = await in_thread(
        _find, archive, patient_root,
        identifier("IMAGE", PatientID="FIND-1", StudyInstanceUID=ds.StudyInstanceUID,
                    SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID="",
                    InstanceNumber="", Rows=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    match = got[0][1]
    assert match is not None
    assert match.SOPInstanceUID == ds.SOPInstanceUID
    assert match.Rows == 4
    assert match.InstanceNumber == 1

    # Wildcard on a PN, nothing else matching: only the patient asked for.
    got = await in_thread(
        _find, archive, study_root, identifier("STUDY", PatientName="find*", PatientID="")
    )
    assert [m.PatientID for s, m in got if m is not None and s == 0xFF00] == ["FIND-1"]


async def test_find_series_by_request_attributes(archive: Archive) -> None:
    """C-FIND at the series level on a key inside RequestAttributesSequence (PS3.4
    C.2.2.2.6), through the same matching as QIDO: an item other than the first matches."""
    first, second = Dataset(), Dataset()
    first.ScheduledProcedureStepID, second.ScheduledProcedureStepID = "SPS-1", "SPS-77"
    ds = make_instance(patient_id="FIND-SEQ", RequestAttributesSequence=[first, second])
    await stow(archive, ds, make_instance(patient_id="FIND-SEQ"))
    query = Dataset()
    query.ScheduledProcedureStepID = "SPS-77"
    got = await in_thread(
        _find, archive, StudyRootQueryRetrieveInformationModelFind,
        identifier("SERIES", StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID="",
                   RequestAttributesSequence=[query]),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    assert got[0][1] is not None and got[0][1].SeriesInstanceUID == ds.SeriesInstanceUID


async def test_find_returns_the_patient_and_study_keys_of_ps3_4_table_c6(
    archive: Archive,
) -> None:
    """Keys PS3.4 Tables C.6-1, C.6-2 and C.6-5 name at the Patient and Study levels come
    back with the stored values. Found by differential testing against Orthanc: they came
    back empty (study.attrs did not keep them)."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ds = make_instance(
        patient_id="FIND-C6", PatientBirthTime="101010", EthnicGroup="GROUP",
        OtherPatientNames="Other^Name", Occupation="Baker", AdditionalPatientHistory="None",
        ReferencedStudySequence=[ref],
    )  # fmt: skip
    await stow(archive, ds)
    study_keys = identifier(
        "STUDY", PatientID="FIND-C6", StudyInstanceUID="", PatientBirthTime="",
        EthnicGroup="", OtherPatientNames="", Occupation="", AdditionalPatientHistory="",
        ReferencedStudySequence=[],
    )  # fmt: skip
    got = await in_thread(_find, archive, StudyRootQueryRetrieveInformationModelFind, study_keys)
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    match = got[0][1]
    assert match is not None
    assert (match.PatientBirthTime, match.EthnicGroup) == ("101010", "GROUP")
    assert (match.OtherPatientNames, match.Occupation) == ("Other^Name", "Baker")
    assert match.AdditionalPatientHistory == "None"
    assert match.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    got = await in_thread(
        _find, archive, PatientRootQueryRetrieveInformationModelFind,
        identifier("PATIENT", PatientID="FIND-C6", PatientBirthTime="", EthnicGroup=""),
    )  # fmt: skip
    assert [s for s, _ in got] == [0xFF00, 0x0000]
    assert got[0][1] is not None and got[0][1].PatientBirthTime == "101010"


async def test_findscu_study_root(archive: Archive, tmp_path: Path) -> None:
    ds = make_instance(patient_id="DCMTK-1", study_date="20230301")
    await stow(archive, ds, make_instance(patient_id="DCMTK-2", study_date="20220101"))
    done = await dcmtk(
        "findscu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-X", "-od", str(tmp_path),
        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyDate=20230101-20231231",
        "-k", "StudyInstanceUID", "-k", "PatientID", "-k", "NumberOfStudyRelatedInstances",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    responses = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(responses) == 1, done.stderr
    rsp = dcmread(responses[0])
    assert rsp.PatientID == "DCMTK-1"
    assert rsp.StudyInstanceUID == ds.StudyInstanceUID
    assert rsp.NumberOfStudyRelatedInstances == 1


async def test_find_refusals(archive: Archive) -> None:
    study_root = StudyRootQueryRetrieveInformationModelFind
    got = await in_thread(_find, archive, study_root, identifier("PATIENT", PatientID=""))
    assert [s for s, _ in got] == [0xA900]
    got = await in_thread(_find, archive, study_root, identifier("STUDY", StudyDate="2024x"))
    assert [s for s, _ in got] == [0xC000]
    got = await in_thread(_find, archive, study_root, identifier("STUDY", SOPInstanceUID="1.2.3"))
    assert [s for s, _ in got] == [0xA900]


async def test_find_with_a_key_unsupported_for_matching_warns_and_matches(
    archive: Archive,
) -> None:
    """PS3.4 C.4.1.1.4: an Optional Key the SCP does not support for matching is ignored and
    every pending response is 0xFF01; it was refused with 0xC000 (no match at all)."""
    ds = make_instance(patient_id="FIND-FF01")
    ds.InstitutionName = "Here"
    await stow(archive, ds)
    study_root = StudyRootQueryRetrieveInformationModelFind
    ident = identifier("STUDY", PatientID="FIND-FF01", InstitutionName="Elsewhere")
    got = await in_thread(_find, archive, study_root, ident)
    assert [s for s, _ in got] == [0xFF01, 0x0000]
    match = got[0][1]
    assert match is not None and match.StudyInstanceUID == ds.StudyInstanceUID
    # Still a return key, with the stored value (InstitutionName is kept at the study level),
    # not the value the SCU asked to match.
    assert match.InstitutionName == "Here"
    got = await in_thread(_find, archive, study_root, identifier("STUDY", PatientID="FIND-FF01"))
    assert [s for s, _ in got] == [0xFF00, 0x0000]


async def test_find_with_only_asterisks_matches_entities_without_a_value(
    archive: Archive,
) -> None:
    """PS3.4 C.2.2.2.4: `*` matches any sequence of characters "including a zero length
    value", so `**` matches what `*` (universal matching, C.2.2.2.3) matches, an entity
    without a value too, as dcmtk's dcmqrscp answers; `**` left such studies out. An
    all-asterisk Optional Key not supported for matching is a return key, as `*` is."""
    named = make_instance(patient_id="FIND-STARS", patient_name="Star^Ann")
    blank = make_instance(patient_id="FIND-STARS", patient_name="", AccessionNumber="")
    await stow(archive, named, blank)
    study_root = StudyRootQueryRetrieveInformationModelFind
    both = {named.StudyInstanceUID, blank.StudyInstanceUID}
    for keys in ({"AccessionNumber": "**"}, {"PatientName": "***"}, {"PatientName": "**=**"},
                 {"PatientName": "**^"}, {"InstitutionName": "**"}):  # fmt: skip
        ident = identifier("STUDY", PatientID="FIND-STARS", StudyInstanceUID="", **keys)
        got = await in_thread(_find, archive, study_root, ident)
        assert [s for s, _ in got] == [0xFF00, 0xFF00, 0x0000], keys
        assert {m.StudyInstanceUID for _, m in got if m is not None} == both, keys
    # Not every pattern matches an empty value: one asking for a character does not.
    ident = identifier("STUDY", PatientID="FIND-STARS", StudyInstanceUID="", PatientName="*?*")
    got = await in_thread(_find, archive, study_root, ident)
    assert [m.StudyInstanceUID for _, m in got if m is not None] == [named.StudyInstanceUID]


# -- Retrieve -------------------------------------------------------------------------------


async def test_movescu_to_a_configured_peer(archive: Archive, peer: Peer) -> None:
    ds = make_instance(patient_id="MOVE-1")
    await stow(archive, ds, make_instance(patient_id="NOT-MOVED"))
    done = await dcmtk(
        "movescu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-aem", PEER,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert list(peer.received) == [ds.SOPInstanceUID]
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert peer.received[ds.SOPInstanceUID] == dataset_bytes(sent)


def _move(archive: Archive, destination: str, ident: Dataset) -> list[Dataset]:
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = associate(scu(model), archive)
    try:
        return [st for st, _ in assoc.send_c_move(ident, destination, model)]
    finally:
        assoc.release()


async def test_pynetdicom_move_counts_and_unknown_destination(archive: Archive, peer: Peer) -> None:
    series = "1.2.826.0.1.3680043.8.498.99.1"
    a = make_instance(series=series, study="1.2.826.0.1.3680043.8.498.99")
    b = make_instance(series=series, study="1.2.826.0.1.3680043.8.498.99")
    await stow(archive, a, b)
    ident = identifier("SERIES", StudyInstanceUID=a.StudyInstanceUID, SeriesInstanceUID=series)
    statuses = await in_thread(_move, archive, PEER, ident)
    final = statuses[-1]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfFailedSuboperations == 0
    assert set(peer.received) == {a.SOPInstanceUID, b.SOPInstanceUID}

    statuses = await in_thread(_move, archive, "NOBODY", ident)
    assert [int(s.Status) for s in statuses] == [0xA801]
    # Found by review: pynetdicom's 0xA801 said nothing of which title was unknown.
    assert statuses[0].ErrorComment == "Move Destination 'NOBODY' is not a known AE"
    assert "NumberOfFailedSuboperations" not in statuses[0]

    missing_key = identifier("SERIES", StudyInstanceUID=a.StudyInstanceUID)
    statuses = await in_thread(_move, archive, PEER, missing_key)
    assert int(statuses[-1].Status) == 0xA900


async def test_move_compressed_multiframe_as_stored(
    archive: Archive, peer: Peer, samples: Path
) -> None:
    path = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    body = multipart_body([path.read_bytes()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    ds = dcmread(path, stop_before_pixels=True)
    ident = identifier(
        "IMAGE",
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=ds.SOPInstanceUID,
    )
    statuses = await in_thread(_move, archive, PEER, ident)
    assert statuses[-1].Status == 0x0000
    assert peer.received[ds.SOPInstanceUID] == dataset_bytes(path)


@pytest.mark.parametrize(
    "name",
    ["generated/coverage/ect_15frames_jpegls_lossless.dcm",
     "generated/coverage/ct_j2k_lossless_signed.dcm",
     # Explicit VR Big Endian (retired, PS3.5 A.3): a palette's OW tables and 16-bit RGB.
     "real/pydicom-data/OBXXXX1A_expb.dcm",
     "real/pydicom-data/SC_rgb_expb_16bit_2frame.dcm"],
)  # fmt: skip
async def test_move_decodes_for_a_peer_taking_only_uncompressed(
    settings: Settings, samples: Path, tmp_path: Path, name: str
) -> None:
    """The destination accepts the SOP Class in little endian syntaxes only: the instance is
    decoded and sent uncompressed (PS3.4 C.4.2.3.1), its pixels those of the stored data."""
    path = samples / name
    ds = dcmread(path)
    with running_peer([ImplicitVRLittleEndian, ExplicitVRLittleEndian]) as only_native:
        async with archive_with_peer(settings, only_native, tmp_path) as archive:
            body = multipart_body([path.read_bytes()])
            r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
            assert r.status_code == 200, r.text
            ident = identifier("IMAGE", StudyInstanceUID=ds.StudyInstanceUID,
                               SeriesInstanceUID=ds.SeriesInstanceUID,
                               SOPInstanceUID=ds.SOPInstanceUID)  # fmt: skip
            statuses = await in_thread(_move, archive, PEER, ident)
    assert statuses[-1].Status == 0x0000, statuses[-1]
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    sent_as = only_native.syntaxes[ds.SOPInstanceUID]
    assert sent_as in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    got = as_part10(only_native.received[ds.SOPInstanceUID], sent_as)
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)
    if not ds.file_meta.TransferSyntaxUID.is_little_endian:  # every value re-encoded
        assert got.Rows == ds.Rows and got.BitsAllocated == ds.BitsAllocated
        for kw in ("RedPaletteColorLookupTableData", "RedPaletteColorLookupTableDescriptor"):
            if kw in ds:
                assert np.array_equal(
                    np.frombuffer(got[kw].value, "<u2") if got[kw].VR == "OW" else got[kw].value,
                    np.frombuffer(ds[kw].value, ">u2") if ds[kw].VR == "OW" else ds[kw].value,
                )


async def test_a_failed_decode_fails_one_sub_operation_not_the_move(
    settings: Settings, samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error no codec foresaw while decoding one instance for the destination: that
    sub-operation fails (0xB000 at the end), the others are still sent."""

    names = ["generated/coverage/ect_15frames_jpegls_lossless.dcm",
             "generated/coverage/ct_j2k_lossless_signed.dcm"]  # fmt: skip
    metas = [dcmread(samples / n, stop_before_pixels=True) for n in names]
    from dicomweb_server.transcode.convert import to_transfer_syntax as convert

    def flaky(path: Path, made: Path, target: str, *args: Any, **kwargs: Any) -> None:
        # Before anything is written: once the C-STORE has begun (the instance is sent as
        # it is converted), a failure aborts the sub-association (test_dimse_streaming).
        if dcmread(path, stop_before_pixels=True).SOPInstanceUID == metas[0].SOPInstanceUID:
            raise TypeError("a value no codec expected")
        convert(path, made, target, *args, **kwargs)

    monkeypatch.setattr(conversion, "to_transfer_syntax", flaky)
    with running_peer([ImplicitVRLittleEndian, ExplicitVRLittleEndian]) as only_native:
        async with archive_with_peer(settings, only_native, tmp_path) as archive:
            for n, ds in zip(names, metas, strict=True):
                body = multipart_body([(samples / n).read_bytes()])
                r = await archive.http.post(f"{ROOT}/studies", content=body,
                                            headers=stow_headers())  # fmt: skip
                assert r.status_code == 200, r.text
                ident = identifier("IMAGE", StudyInstanceUID=ds.StudyInstanceUID,
                                   SeriesInstanceUID=ds.SeriesInstanceUID,
                                   SOPInstanceUID=ds.SOPInstanceUID)  # fmt: skip
                statuses = await in_thread(_move, archive, PEER, ident)
                final = statuses[-1]
                if ds is metas[0]:  # PS3.4 C.4.2.1.5: all sub-operations failed
                    assert final.Status == 0xA702, final
                    assert final.NumberOfFailedSuboperations == 1
                else:
                    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1
    assert list(only_native.received) == [metas[1].SOPInstanceUID]


async def test_get_decodes_for_a_requestor_taking_only_uncompressed(
    archive: Archive, samples: Path
) -> None:
    path = samples / "generated/coverage/ect_15frames_jpegls_lossless.dcm"
    ds = dcmread(path)
    body = multipart_body([path.read_bytes()])
    r = await archive.http.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    received: list[tuple[bytes, str]] = []

    def on_store(event: Event) -> int:
        received.append((received_data_set(event), str(event.context.transfer_syntax)))
        return 0x0000

    statuses = await in_thread(get_study, archive, ds.StudyInstanceUID, ds.SOPClassUID, on_store)
    assert statuses[-1].Status == 0x0000 and statuses[-1].NumberOfCompletedSuboperations == 1
    ((data_set, syntax),) = received
    assert syntax == ExplicitVRLittleEndian
    assert np.array_equal(as_part10(data_set, syntax).pixel_array, ds.pixel_array)


def _cancelled_after(
    responses: Iterator[tuple[Dataset, Dataset | None]], assoc: Association, model: str, n: int
) -> list[Dataset]:
    """The statuses of a C-MOVE/C-GET, with a C-CANCEL (PS3.7 9.3.2.3) sent after `n` pending
    responses."""
    (cx,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == model]
    statuses = []
    for status, _ in responses:
        statuses.append(status)
        if len(statuses) == n:
            assoc.send_c_cancel(1, cx.context_id)
    return statuses


async def test_move_and_get_stop_at_c_cancel(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C-CANCEL during a C-MOVE to a slow destination, and during a C-GET whose requestor is
    slow to store: the sub-operations stop, the final status is Cancel (0xFE00, PS3.4
    C.4.2.1.5 / C.4.3.1.4) with the remaining count, and fewer instances were sent."""
    study = "1.2.826.0.1.3680043.8.498.77"
    instances = [make_instance(study=study, patient_id="CANCEL-1") for _ in range(20)]
    with running_peer(store_delay_s=0.1) as slow:
        async with archive_with_peer(settings, slow, tmp_path) as archive:
            await stow(archive, *instances)
            ident = identifier("STUDY", StudyInstanceUID=study)

            def move() -> list[Dataset]:
                model = StudyRootQueryRetrieveInformationModelMove
                assoc = associate(scu(model), archive)
                try:
                    return _cancelled_after(assoc.send_c_move(ident, PEER, model), assoc, model, 2)
                finally:
                    assoc.release()

            got: list[str] = []

            def on_store(event: Event) -> int:
                time.sleep(0.1)
                got.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
                return 0x0000

            def get() -> list[Dataset]:
                model = StudyRootQueryRetrieveInformationModelGet
                ae = scu(model)
                ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
                role = build_role(CTImageStorage, scp_role=True)
                handlers = [requestor_store(on_store)]
                assoc = associate(ae, archive, ext_neg=[role], evt_handlers=handlers)
                try:
                    return _cancelled_after(assoc.send_c_get(ident, model), assoc, model, 2)
                finally:
                    assoc.release()

            for run, sent in ((move, slow.received), (get, got)):
                statuses = await in_thread(run)
                final = statuses[-1]
                assert final.Status == 0xFE00, (run.__name__, final)
                done = final.NumberOfCompletedSuboperations
                assert 2 <= done < len(instances), (run.__name__, final)
                assert final.NumberOfRemainingSuboperations == len(instances) - done
                assert len(sent) == done


async def test_get_with_a_lost_blob_counts_a_failure(archive: Archive) -> None:
    kept, lost = make_instance(patient_id="GET-3"), make_instance(patient_id="GET-3")
    await stow(archive, kept, lost)
    (inst,) = await archive.services.index.locate(lost.StudyInstanceUID)
    archive.services.blobs.local_path(inst.blob_key).unlink()

    def get() -> list[Dataset]:
        model = PatientRootQueryRetrieveInformationModelGet
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        on_store = requestor_store(lambda event: 0x0000)
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[on_store])
        try:
            ident = identifier("PATIENT", PatientID="GET-3")
            return [st for st, _ in assoc.send_c_get(ident, model)]
        finally:
            assoc.release()

    statuses = await in_thread(get)
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    assert statuses[-1].NumberOfFailedSuboperations == 1
    assert statuses[-1].Status == 0xB000  # PS3.4 C.4.3.1.4: sub-operations complete, failures


async def test_getscu(archive: Archive, tmp_path: Path) -> None:
    ds = make_instance(patient_id="GET-1")
    await stow(archive, ds)
    out = tmp_path / "got"
    out.mkdir()
    done = await dcmtk(
        "getscu", "-S", "-aet", SCU, "-aec", "DICOMWEB", "-od", str(out),
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
        "127.0.0.1", str(archive.port),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (got,) = list(out.iterdir())
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert dataset_bytes(got) == dataset_bytes(sent)


async def test_pynetdicom_get(archive: Archive) -> None:
    ds = make_instance(patient_id="GET-2")
    await stow(archive, ds)
    received: list[bytes] = []

    def on_store(event: Event) -> int:
        received.append(received_data_set(event))
        return 0x0000

    statuses = await in_thread(get_study, archive, ds.StudyInstanceUID, CTImageStorage, on_store)
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 1
    sent = await wado_instance(
        archive, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert received == [dataset_bytes(sent)]


def _counts_add_up(statuses: list[Dataset], total: int) -> None:
    """Every pending response counts each sub-operation once (PS3.4 C.4.2.1.6-9)."""
    for st in statuses[:-1]:
        assert st.Status == 0xFF00, st
        done = sum(
            int(st.get(k, 0))
            for k in ("NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
                      "NumberOfWarningSuboperations")
        )  # fmt: skip
        assert done + int(st.NumberOfRemainingSuboperations) == total, st


async def test_a_sub_operation_failed_here_is_listed_and_counted(
    archive: Archive, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: an instance the archive could not send (its blob lost) was reported
    to pynetdicom as a non-Dataset, which pynetdicom counts as failed without counting it
    done: every later response said one more remaining (the final C-GET one too, 1), and the
    Failed SOP Instance UID List held an empty string instead of its UID (PS3.4 C.4.2.1.4.2,
    C.4.3.1.3.2). C-MOVE and C-GET, all at once and with a C-CANCEL after the lost one."""
    study = "1.2.826.0.1.3680043.8.498.78"
    lost = make_instance(study=study, patient_id="LOST-1")
    kept = [make_instance(study=study, patient_id="LOST-1") for _ in range(3)]
    # Its own request first: the parts of one request are committed concurrently, so in one
    # request the lost instance's series (sent in series row order) was not always first.
    await stow(archive, lost)
    await stow(archive, *kept)
    (inst,) = await archive.services.index.locate(study, lost.SeriesInstanceUID)
    archive.services.blobs.local_path(inst.blob_key).unlink()
    ident = identifier("STUDY", StudyInstanceUID=study)
    start = await audit_seq(archive)

    def retrieve(kind: str, cancel_after: int | None) -> list[tuple[Dataset, Dataset | None]]:
        model = (StudyRootQueryRetrieveInformationModelGet if kind == "get"
                 else StudyRootQueryRetrieveInformationModelMove)  # fmt: skip
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        on_store = requestor_store(lambda event: 0x0000)
        role = build_role(CTImageStorage, scp_role=True)
        assoc = associate(ae, archive, ext_neg=[role], evt_handlers=[on_store])
        (cx,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == model]
        try:
            sent = (assoc.send_c_get(ident, model, msg_id=9) if kind == "get"
                    else assoc.send_c_move(ident, PEER, model, msg_id=9))  # fmt: skip
            out = []
            for st, found in sent:
                out.append((st, found))
                if cancel_after is not None and len(out) == cancel_after:
                    assoc.send_c_cancel(9, cx.context_id)
                    cancel_sent.set()
            return out
        finally:
            assoc.release()

    for kind in ("get", "move"):
        got = await in_thread(retrieve, kind, None)
        statuses = [st for st, _ in got]
        _counts_add_up(statuses, 4)
        final, failed = got[-1]
        assert final.Status == 0xB000, (kind, final)
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 1)
        assert "NumberOfRemainingSuboperations" not in final or (
            final.NumberOfRemainingSuboperations == 0
        ), (kind, final)
        assert failed is not None and failed.FailedSOPInstanceUIDList == lost.SOPInstanceUID
        # The audit trail has the status answered and the instances the peer stored.
        (row,) = (await audit_rows(archive, f"dimse_{kind}", start))[-1:]
        assert row["outcome"] == 0xB000
        assert sorted(row["uids"]) == sorted(
            f"{study}/{i.SeriesInstanceUID}/{i.SOPInstanceUID}" for i in kept
        )
        assert "matched=4 completed=3 warning=0 failed=1" in row["detail"]

    # The lost instance is the first sent (stored first); cancelled after the second. The
    # third waits until the C-CANCEL is on its way: on a loaded machine the archive sent all
    # four before it came (a 0xB000, failed once in CI).
    cancel_sent, sends = threading.Event(), [0]
    to_send = handlers.Handlers._to_send

    def to_send_third_after_the_cancel(self: Any, inst: Any, retrieval: Any) -> Dataset:
        sends[0] += 1
        if sends[0] == 3:
            cancel_sent.wait(10)
        return to_send(self, inst, retrieval)

    monkeypatch.setattr(handlers.Handlers, "_to_send", to_send_third_after_the_cancel)
    for kind in ("get", "move"):
        cancel_sent.clear()
        sends[0] = 0
        got = await in_thread(retrieve, kind, 2)
        statuses = [st for st, _ in got]
        _counts_add_up(statuses, 4)
        final, failed = got[-1]
        assert final.Status == 0xFE00, (kind, final)
        done = final.NumberOfCompletedSuboperations + final.NumberOfFailedSuboperations
        assert final.NumberOfFailedSuboperations == 1
        assert done + final.NumberOfRemainingSuboperations == 4, (kind, final)
        assert failed is not None and failed.FailedSOPInstanceUIDList == lost.SOPInstanceUID
        (row,) = (await audit_rows(archive, f"dimse_{kind}", start))[-1:]
        assert row["outcome"] == 0xFE00
        assert len(row["uids"]) == final.NumberOfCompletedSuboperations
        assert f"completed={final.NumberOfCompletedSuboperations}" in row["detail"]


@pytest.mark.parametrize(
    "destination",
    ["REFUSES", "NOSTORAGE",
     # pynetdicom drops the socket of a refused connection unclosed (AssociationSocket.connect:
     # its shutdown raises, so close is skipped); it is closed when collected.
     pytest.param("DOWN", marks=pytest.mark.filterwarnings("ignore::ResourceWarning"))],
)  # fmt: skip
async def test_move_to_a_destination_that_cannot_be_reached(
    settings: Settings, tmp_path: Path, destination: str
) -> None:
    """Found by review: a configured destination that rejects the association (REFUSES), that
    accepts none of its presentation contexts (NOSTORAGE) or where nothing listens (DOWN) was
    answered 0xA801, Move Destination Unknown, with no counts; an identifier the archive
    refuses was answered so too, before it was read. PS3.4 C.4.2.1.5: the destination is
    known, the sub-operations could not be performed: 0xA702 with every one counted failed
    and listed in the Failed SOP Instance UID List, as dcmtk's dcmqrscp answers. A refused
    identifier gets its own status."""
    import json

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.liveserver import free_port

    refuses = AE(ae_title="REFUSES")
    refuses.add_supported_context(CTImageStorage)
    refuses.require_calling_aet = ["SOMEONEELSE"]
    no_storage = AE(ae_title="NOSTORAGE")
    no_storage.add_supported_context(Verification)
    servers = [ae.start_server(("127.0.0.1", 0), block=False) for ae in (refuses, no_storage)]
    assert servers[0] is not None and servers[1] is not None
    ports = {"REFUSES": servers[0].server_address[1], "NOSTORAGE": servers[1].server_address[1]}
    peers = {t: {"host": "127.0.0.1", "port": int(port)} for t, port in ports.items()}
    peers["DOWN"] = {"host": "127.0.0.1", "port": free_port()}
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    study = "1.2.826.0.1.3680043.8.498.79"
    instances = [make_instance(study=study, patient_id="AWAY-1") for _ in range(3)]
    try:
        async with running_archive(settings, dimse_peers=tmp_path / "peers.json") as archive:
            await stow(archive, *instances)
            model = StudyRootQueryRetrieveInformationModelMove

            def move(ident: Dataset) -> list[tuple[Dataset, Dataset | None]]:
                assoc = associate(scu(model), archive)
                try:
                    return list(assoc.send_c_move(ident, destination, model))
                finally:
                    assoc.release()

            start = await audit_seq(archive)
            got = await in_thread(move, identifier("STUDY", StudyInstanceUID=study))
            refused = await in_thread(move, identifier("SERIES", StudyInstanceUID=study))
            moved, refusal = await audit_rows(archive, "dimse_move", start)
    finally:
        servers[0].shutdown()
        servers[1].shutdown()
    final, failed = got[-1]
    assert final.Status == 0xA702, final
    assert final.NumberOfFailedSuboperations == 3
    assert final.NumberOfCompletedSuboperations == 0
    assert failed is not None
    assert sorted(failed.FailedSOPInstanceUIDList) == sorted(i.SOPInstanceUID for i in instances)
    assert [int(st.Status) for st, _ in refused] == [0xA900]
    assert (moved["outcome"], moved["uids"]) == (0xA702, [])
    assert "failed=3 destination not reached" in moved["detail"]
    assert refusal["outcome"] == 0xA900
    # Why, as the peer was told (found by review: the destination only).
    assert refusal["detail"].startswith(f"destination={destination}; ")
    assert "SeriesInstanceUID" in refusal["detail"], refusal["detail"]


async def test_find_cancel_unknown_destination_and_get_without_role_are_audited(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the audit trail recorded a C-FIND stopped by C-CANCEL, and every
    C-MOVE/C-GET, as successes (0x0000) with every matched instance as sent, and a C-MOVE to
    an unknown destination not at all. The outcome is now the status answered: 0xFE00,
    0xA801, 0xA702 for a C-GET whose requestor took no SOP class of the study in the SCP
    role (every sub-operation failed, nothing sent)."""
    study = "1.2.826.0.1.3680043.8.498.80"
    instances = [make_instance(study=study, patient_id="AUDIT-2") for _ in range(300)]
    await stow(archive, *instances)
    find_model = StudyRootQueryRetrieveInformationModelFind
    start = await audit_seq(archive)
    # Each match a little slower to answer, so that the C-CANCEL sent after two comes before
    # the 300th: without it, a busy machine's client could read two only after the last was
    # sent, and the C-FIND ended in Success (seen in the full suite).
    made = handlers.find_response  # type: ignore[attr-defined]

    def slower(*args: Any) -> Dataset:
        time.sleep(0.005)
        return made(*args)

    monkeypatch.setattr(handlers, "find_response", slower)

    def find_then_cancel() -> list[int]:
        assoc = associate(scu(find_model), archive)
        try:
            query = identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID="")
            found = assoc.send_c_find(query, find_model)
            return [int(st.Status) for st in _cancelled_after(found, assoc, find_model, 2)]
        finally:
            assoc.release()

    statuses = await in_thread(find_then_cancel)
    assert statuses[-1] == 0xFE00
    (row,) = await audit_rows(archive, "dimse_find", start)
    assert row["outcome"] == 0xFE00 and f"matches={len(statuses) - 1}" in row["detail"]

    ident = identifier("STUDY", StudyInstanceUID=study)
    assert [int(s.Status) for s in await in_thread(_move, archive, "NOBODY", ident)] == [0xA801]
    (row,) = await audit_rows(archive, "dimse_move", start)
    assert row["outcome"] == 0xA801
    assert row["detail"] == "destination=NOBODY; Move Destination 'NOBODY' is not a known AE"

    def get_without_role() -> list[Dataset]:
        model = StudyRootQueryRetrieveInformationModelGet
        ae = scu(model)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # no SCP role asked
        assoc = associate(ae, archive)
        try:
            return [st for st, _ in assoc.send_c_get(ident, model)]
        finally:
            assoc.release()

    final = (await in_thread(get_without_role))[-1]
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 300
    (row,) = await audit_rows(archive, "dimse_get", start)
    assert (row["outcome"], row["uids"]) == (0xA702, [])
    assert "matched=300 completed=0 warning=0 failed=300" in row["detail"]


def _retrieve_responses(archive: Archive, ident: Dataset, get: bool) -> list[Dataset]:
    """The command sets of the responses to a Study Root C-GET or C-MOVE (to PEER), as
    received."""
    model = (
        StudyRootQueryRetrieveInformationModelGet if get
        else StudyRootQueryRetrieveInformationModelMove
    )  # fmt: skip
    ae = scu(model)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = [build_role(CTImageStorage, scp_role=True)] if get else []
    received: list[Dataset] = []

    def on_recv(event: Event) -> None:
        received.append(event.message.command_set)

    assoc = associate(ae, archive, ext_neg=role, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    try:
        sent = assoc.send_c_get(ident, model) if get else assoc.send_c_move(ident, PEER, model)
        assert len(list(sent)) == len(received)
        return received
    finally:
        assoc.release()


@pytest.mark.parametrize("get", [True, False], ids=["c-get", "c-move"])
async def test_a_refused_identifier_counts_no_failed_sub_operation(
    settings: Settings, tmp_path: Path, get: bool
) -> None:
    """An identifier refused as a whole (an unknown level, a missing unique key) has no
    sub-operations, and the counts are of sub-operations (PS3.7 9.1.3, 9.1.4): the final
    response said 1 failed (pynetdicom answers a failure only after a count of 1), with an
    Identifier of an empty Failed SOP Instance UID List that getscu never read (its A-RELEASE
    then failed: "DUL P-Data PDU arrived"). Now all counts are 0 and there is no Identifier,
    as dcmqrscp answers; a C-MOVE no longer associates with its destination first (one that
    cannot be reached made it 0xA801 instead of the identifier's failure)."""
    with socket.socket() as unused:  # a destination nothing listens on
        unused.bind(("127.0.0.1", 0))
        nobody = Peer(int(unused.getsockname()[1]))
    async with archive_with_peer(settings, nobody, tmp_path) as archive:
        for ident, code in (
            (identifier("FOO", StudyInstanceUID="1.2.3"), 0xA900),
            (identifier("SERIES", StudyInstanceUID="1.2.3"), 0xA900),  # no Series UID
            (identifier("STUDY", StudyInstanceUID="1.2.x"), 0xC000),
        ):
            (final,) = await in_thread(_retrieve_responses, archive, ident, get)
            assert final.Status == code, (ident.QueryRetrieveLevel, hex(final.Status))
            assert final.ErrorComment
            counts = ("Completed", "Failed", "Warning")
            assert [final.get(f"NumberOf{c}Suboperations") for c in counts] == [0, 0, 0]
            assert "NumberOfRemainingSuboperations" not in final
            assert final.CommandDataSetType == 0x0101  # no Identifier (PS3.7 E.1-1)
