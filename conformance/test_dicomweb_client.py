"""Every transaction the server supports, driven through dicomweb-client's DICOMwebClient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.helpers import make_instance

pytestmark = pytest.mark.conformance

FILES = (
    "real/pydicom/CT_small.dcm",
    "real/pydicom/MR_small_RLE.dcm",
    "real/pydicom/MR_small_jp2klossless.dcm",
    "generated/coverage/ect_15frames_jpegls_lossless.dcm",
    "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm",
    "generated/coverage/mr_iso2022_ir87_japanese.dcm",
)


def uid(doc: dict[str, Any], tag: str) -> str:
    return str(doc[tag]["Value"][0])


@pytest.fixture(scope="module")
def stored(client: DICOMwebClient, samples: Path) -> list[Dataset]:
    datasets: list[Dataset] = [pydicom.dcmread(samples / f) for f in FILES]
    response = client.store_instances(datasets)  # the Store Instances Response, as a Dataset
    assert "FailedSOPSequence" not in response, response
    assert len(response.ReferencedSOPSequence) == len(datasets)
    return datasets


def test_search_at_every_level(client: DICOMwebClient, stored: list[Dataset]) -> None:
    ct = stored[0]
    studies = client.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert ct.StudyInstanceUID in {uid(s, "0020000D") for s in studies}
    series = client.search_for_series(ct.StudyInstanceUID)
    assert ct.SeriesInstanceUID in {uid(s, "0020000E") for s in series}
    all_series = client.search_for_series(
        search_filters={"SeriesInstanceUID": ct.SeriesInstanceUID}
    )
    assert [uid(s, "0020000D") for s in all_series] == [ct.StudyInstanceUID]
    for found in (
        client.search_for_instances(ct.StudyInstanceUID, ct.SeriesInstanceUID),
        client.search_for_instances(ct.StudyInstanceUID),
        client.search_for_instances(search_filters={"SOPInstanceUID": ct.SOPInstanceUID}),
    ):
        assert ct.SOPInstanceUID in {uid(i, "00080018") for i in found}


def test_search_with_a_list_of_values(client: DICOMwebClient, stored: list[Dataset]) -> None:
    """dicomweb-client sends a list in search_filters as the key repeated
    (`ModalitiesInStudy=CT&ModalitiesInStudy=MR`): any of the values matches, as `CT,MR` does.
    It was a 400 ("given 2 times") for every key but a UID."""
    ct, mr = stored[0], stored[1]
    by_patient = {"PatientID": [ct.PatientID, mr.PatientID]}
    assert ct.PatientID != mr.PatientID
    for modality, wanted in (("CT", [ct]), ("MR", [mr]), (["CT", "MR"], [ct, mr])):
        hits = client.search_for_studies(
            search_filters={
                "ModalitiesInStudy": modality,
                "StudyInstanceUID": [ct.StudyInstanceUID, mr.StudyInstanceUID],
            }
        )
        assert {uid(s, "0020000D") for s in hits} == {d.StudyInstanceUID for d in wanted}
    with pytest.raises(requests.HTTPError) as info:  # one value would be dropped silently
        client.search_for_studies(search_filters=by_patient)
    response = info.value.response
    assert response is not None and response.status_code == 400
    assert "PatientID is given 2 times" in response.json()["message"]


def test_search_fuzzy_wildcard_and_fields(client: DICOMwebClient, stored: list[Dataset]) -> None:
    japanese = stored[5]
    family = str(japanese.PatientName).split("^")[0]
    hits = client.search_for_studies(
        search_filters={"PatientName": family.lower()[:3] + "*"}, fields=["StudyDescription"]
    )
    assert japanese.StudyInstanceUID in {uid(s, "0020000D") for s in hits}
    hits = client.search_for_studies(
        search_filters={"PatientName": family[:2]}, fuzzymatching=True, limit=1000
    )
    assert japanese.StudyInstanceUID in {uid(s, "0020000D") for s in hits}


def test_retrieve_study_series_instance(client: DICOMwebClient, stored: list[Dataset]) -> None:
    rle = stored[1]
    ids = (rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID)
    explicit_le = "1.2.840.10008.1.2.1"
    instance = client.retrieve_instance(*ids, media_types=(("application/dicom", explicit_le),))
    assert instance.SOPInstanceUID == rle.SOPInstanceUID
    assert instance.file_meta.TransferSyntaxUID == explicit_le
    assert np.array_equal(instance.pixel_array, rle.pixel_array)
    # dicomweb-client 0.61 asks for transfer-syntax=* by default: the stored bytes.
    as_stored = client.retrieve_instance(*ids)
    assert as_stored.file_meta.TransferSyntaxUID == rle.file_meta.TransferSyntaxUID
    series = client.retrieve_series(rle.StudyInstanceUID, rle.SeriesInstanceUID)
    assert rle.SOPInstanceUID in {d.SOPInstanceUID for d in series}
    study = client.retrieve_study(rle.StudyInstanceUID)
    assert rle.SOPInstanceUID in {d.SOPInstanceUID for d in study}


def test_metadata_and_bulkdata(client: DICOMwebClient, stored: list[Dataset]) -> None:
    ct = stored[0]
    (meta,) = [
        m
        for m in client.retrieve_series_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID)
        if uid(m, "00080018") == ct.SOPInstanceUID
    ]
    assert client.retrieve_study_metadata(ct.StudyInstanceUID)
    assert (
        client.retrieve_instance_metadata(
            ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID
        )["00100010"]
        == meta["00100010"]
    )
    (pixels,) = client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert pixels == ct.PixelData


def test_frames_uncompressed_and_as_stored(client: DICOMwebClient, stored: list[Dataset]) -> None:
    jls = stored[3]
    ids = (jls.StudyInstanceUID, jls.SeriesInstanceUID, jls.SOPInstanceUID)
    frames = client.retrieve_instance_frames(*ids, frame_numbers=[1, 15])
    assert frames == [jls.pixel_array[0].tobytes(), jls.pixel_array[14].tobytes()]
    stored_frames = client.retrieve_instance_frames(
        *ids, frame_numbers=[2], media_types=(("image/jls", "1.2.840.10008.1.2.4.80"),)
    )
    assert stored_frames[0][:2] == b"\xff\xd8"  # a JPEG-LS codestream starts with SOI


def test_store_into_wrong_study_fails(client: DICOMwebClient) -> None:
    ds = make_instance()
    with pytest.raises(requests.HTTPError) as exc:
        client.store_instances([ds], study_instance_uid=generate_uid())
    assert exc.value.response is not None and exc.value.response.status_code == 409


def test_unknown_uids_are_404(client: DICOMwebClient) -> None:
    with pytest.raises(requests.HTTPError) as exc:
        client.retrieve_study_metadata(generate_uid())
    assert exc.value.response is not None and exc.value.response.status_code == 404


def test_rendered_and_thumbnails(client: DICOMwebClient, stored: list[Dataset]) -> None:
    jls = stored[3]
    ids = (jls.StudyInstanceUID, jls.SeriesInstanceUID, jls.SOPInstanceUID)
    jpeg = client.retrieve_instance_rendered(*ids, media_types=("image/jpeg",))
    assert jpeg[:2] == b"\xff\xd8"
    png = client.retrieve_instance_frames_rendered(
        *ids, frame_numbers=[2], media_types=("image/png",)
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    series = client.retrieve_series_rendered(jls.StudyInstanceUID, jls.SeriesInstanceUID)
    assert series[:2] == b"\xff\xd8"
    # dicomweb-client 0.61 has no thumbnail method: the transport it uses, with its URL.
    thumb = client._http_get(client.base_url + "/studies/" + ids[0] + "/thumbnail")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
