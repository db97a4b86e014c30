"""`make e2e`: OHIF v3 in headless Chromium against the archive, loaded with sample studies.

Starts the archive (a real hypercorn subprocess), stores one decodable sample of every
compressed transfer syntax of ../shared/samples plus CT, MR and multi-frame studies, starts the
viewer (viewer/viewer.py) on another port, so that every request is cross-origin, runs
run.mjs (playwright-core driving Debian's chromium) and checks its report: every patient in the
study list, every study drawn (a viewport canvas that is not blank), no failed request.
Screenshots and report.json land in e2e/results/.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.liveserver import free_port, start  # noqa: E402

SAMPLES = Path(os.environ.get("DICOMWEB_SAMPLES", ROOT.parent / "shared" / "samples"))
RESULTS = ROOT / "e2e" / "results"
BOUNDARY = "e2e-boundary"
MODALITY_PICKS = ("generated/coverage/ct_explicit_le_signed_utf8_private.dcm",
                  "generated/coverage/mr_implicit_le_unsigned_oddpn.dcm",
                  "generated/coverage/xa_20frames_8bit.dcm",
                  "generated/coverage/us_multiframe_jpeg_baseline_ybr422.dcm",
                  "generated/coverage/ect_15frames_jpegls_lossless.dcm")  # fmt: skip


def pick_samples() -> list[Path]:
    """One decodable image per transfer syntax (with a Patient ID to look for), plus the
    CT, MR and multi-frame coverage files."""
    with (SAMPLES / "MANIFEST.tsv").open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    chosen: dict[str, str] = {}
    for r in rows:
        if r["decodes"] == "yes" and r["patient_id"] and r["frames"] and int(r["rows"] or 0) >= 64:
            chosen.setdefault(r["transfer_syntax_uid"], r["path"])
    paths = list(dict.fromkeys([*MODALITY_PICKS, *chosen.values()]))
    return [SAMPLES / p for p in paths]


def main() -> int:
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        raise SystemExit(f"{chromium} not found (make e2e installs Debian's chromium)")
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    files = pick_samples()
    with tempfile.TemporaryDirectory() as tmp:
        server = start(Path(tmp) / "data", os.environ.get("DATABASE_URL"))
        viewer = None
        try:
            body = b"".join(
                f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + f.read_bytes() + b"\r\n" for f in files
            ) + f"--{BOUNDARY}--\r\n".encode()  # fmt: skip
            ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            r = httpx.post(f"{server.url}/studies", content=body, headers={"Content-Type": ctype},
                           timeout=300)  # fmt: skip
            r.raise_for_status()
            studies: dict[str, tuple[str, str]] = {}
            for f in files:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                family = str(ds.PatientName).split("^")[0]
                studies[ds.StudyInstanceUID] = (str(ds.PatientID), family)
            listing = [
                {"study": k, "patientId": pid, "patientName": name}
                for k, (pid, name) in studies.items()
            ]
            (RESULTS / "studies.json").write_text(json.dumps(listing, indent=2))
            port = free_port()
            env = {**os.environ, "DICOMWEB_URL": server.url, "VIEWER_PORT": str(port)}
            viewer = subprocess.Popen([sys.executable, str(ROOT / "viewer" / "viewer.py")], env=env)
            viewer_url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(viewer_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            subprocess.run(
                ["node", str(ROOT / "e2e" / "run.mjs"), viewer_url, str(RESULTS / "studies.json"),
                 str(RESULTS)], check=True, timeout=1800, env={**os.environ, "CHROMIUM": chromium},
            )  # fmt: skip
        finally:
            if viewer is not None:
                viewer.send_signal(signal.SIGINT)
                viewer.wait(timeout=30)
            server.kill()
    report = json.loads((RESULTS / "report.json").read_text())
    missing = [p for p, ok in report["studyList"].items() if not ok]
    if report.get("studyCount") != str(len(report["studies"])):
        missing.append(f"study count {report.get('studyCount')} != {len(report['studies'])}")
    blank = [s["study"] for s in report["studies"] if not s["drawn"]]
    print(f"{len(report['studies'])} studies, {report['requests']['total']} requests "
          f"({report['requests']['preflight']} preflights)")  # fmt: skip
    print(f"study list: {report.get('studyCount')} studies; missing: {missing or 'none'}")
    print(f"not drawn: {blank or 'none'}")
    print(f"failed requests: {report['failures'] or 'none'}")
    return 1 if missing or blank or report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
