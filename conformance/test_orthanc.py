"""Orthanc (with its DICOMweb plugin) as a client of this server: it pushes a study to us
(STOW-RS), searches us (QIDO-RS) and pulls a study from us (WADO-RS) (issue 5).

Uses ../shared/peers/orthanc/start.sh, which installs Debian's orthanc and orthanc-dicomweb when
they are missing and starts a throw-away Orthanc on loopback.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.liveserver import free_port

pytestmark = pytest.mark.conformance

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "orthanc"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (PEERS / "start.sh").exists():
        pytest.fail(f"Orthanc peer scripts not found at {PEERS}")
    port, dicom_port = free_port(), free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "DICOM_PORT": str(dicom_port),
        "ORTHANC_STATE_DIR": str(tmp_path_factory.mktemp("orthanc")),
    }
    subprocess.run(["bash", str(PEERS / "start.sh")], env=env, check=True, timeout=900,
                   capture_output=True)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(PEERS / "stop.sh")], env=env, check=False, timeout=120,
                       capture_output=True)  # fmt: skip


def call(method: str, url: str, **kwargs: Any) -> Any:
    r = httpx.request(method, url, timeout=120, **kwargs)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    return r.json()


def test_orthanc_pushes_searches_and_pulls(
    orthanc: str, dicomweb_url: str, client: DICOMwebClient, samples: Path
) -> None:
    call("PUT", f"{orthanc}/dicom-web/servers/archive", json={"Url": dicomweb_url + "/"})

    # Push: a study uploaded to Orthanc, sent to us with STOW-RS.
    pushed = samples / "real/pydicom/MR_small.dcm"
    ds = pydicom.dcmread(pushed)
    uploaded = call("POST", f"{orthanc}/instances", content=pushed.read_bytes())
    sent = call(
        "POST", f"{orthanc}/dicom-web/servers/archive/stow",
        json={"Resources": [uploaded["ParentStudy"]]},
    )  # fmt: skip
    assert sent["InstancesCount"] == "1"
    found = client.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID})
    assert len(found) == 1

    # Search: Orthanc's QIDO-RS against us.
    hits = call(
        "POST", f"{orthanc}/dicom-web/servers/archive/qido",
        json={"Uri": "/studies", "Arguments": {"StudyInstanceUID": ds.StudyInstanceUID}},
    )  # fmt: skip
    # Orthanc re-renders the answer in its own format: {"Name", "Type", "Value": "<uid>"}.
    assert [h["0020000D"]["Value"] for h in hits] == [ds.StudyInstanceUID]

    # Pull: a study only we have, retrieved by Orthanc with WADO-RS.
    pulled = pydicom.dcmread(samples / "generated/coverage/ct_j2k_lossless_signed.dcm")
    client.store_instances([pulled])
    call(
        "POST", f"{orthanc}/dicom-web/servers/archive/retrieve",
        json={"Resources": [{"Study": pulled.StudyInstanceUID}]},
    )  # fmt: skip
    lookup = call("POST", f"{orthanc}/tools/lookup", content=pulled.SOPInstanceUID)
    assert [x["Type"] for x in lookup] == ["Instance"]
    tags = call("GET", f"{orthanc}/instances/{lookup[0]['ID']}/simplified-tags")
    assert tags["SOPInstanceUID"] == pulled.SOPInstanceUID
    assert tags["StudyInstanceUID"] == pulled.StudyInstanceUID
