"""DICOM JSON: the walker's BulkDataURIs, URI absolutisation, the STOW response document."""

from __future__ import annotations

import json

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb_server.dicom_json import (
    InstanceOutcome,
    absolutize_bulk_uris,
    dataset_to_json,
    stow_response,
)
from dicomweb_server.errors import FailureReason


def test_walker_matches_pydicom_and_names_nested_bulk_paths() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.add_new(0x00091010, "OB", b"\x01" * 2000)  # private, large: bulk data
    item = Dataset()
    item.add_new(0x54001010, "OW", b"\x00\x01" * 1000)
    item.add_new(0x003A0005, "US", 2)
    ds.WaveformSequence = Sequence([item])
    ds.add_new(0x00091011, "OB", b"\x02" * 10)  # small: inline
    doc = dataset_to_json(ds, lambda path: f"/bulk/{path}")
    assert doc["00091010"] == {"vr": "OB", "BulkDataURI": "/bulk/00091010"}
    assert doc["54000100"]["Value"][0]["54001010"] == {
        "vr": "OW",
        "BulkDataURI": "/bulk/54000100/0/54001010",
    }
    theirs = ds.to_json_dict(1024, lambda _e: "x")
    for key in ("00100010", "00091011"):
        assert doc[key] == theirs[key]


def test_absolutize_only_touches_bulk_data_uris() -> None:
    text = json.dumps(
        {
            "a": {"vr": "OB", "BulkDataURI": "/studies/1/bulk/x"},
            "b": {"Value": ['"BulkDataURI": "/']},
        }
    )
    out = json.loads(absolutize_bulk_uris(text, "http://h:1/dicom-web"))
    assert out["a"]["BulkDataURI"] == "http://h:1/dicom-web/studies/1/bulk/x"
    assert out["b"]["Value"] == ['"BulkDataURI": "/']


def test_stow_response_document() -> None:
    doc = stow_response(
        [
            InstanceOutcome("1.2", "1.2.3", retrieve_path="/studies/9/series/8/instances/1.2.3"),
            InstanceOutcome("1.2", "1.2.4", FailureReason.DUPLICATE_SOP_INSTANCE, reason="dup"),
            InstanceOutcome(None, None, FailureReason.CANNOT_UNDERSTAND, reason="garbage"),
        ],
        "http://h/dicom-web",
        "/studies/9",
    )
    assert doc["00081190"]["Value"] == ["http://h/dicom-web/studies/9"]
    (ok,) = doc["00081199"]["Value"]
    assert ok["00081190"]["Value"] == ["http://h/dicom-web/studies/9/series/8/instances/1.2.3"]
    failed = doc["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0x0111], [0xC000]]
    assert "00081155" not in failed[1]
