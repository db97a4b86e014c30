"""The conformance statement agrees with the code's own tables (datasette's test_docs style)."""

from __future__ import annotations

import re
from pathlib import Path

from dicomweb_server import (
    app,
    auditlog,
    cli,
    config,
    dicom_json,
    dicom_xml,
    dicomfile,
    httpd,
    matching,
    multipart,
    query,
    render,
    rendered,
    search,
    stow_json,
)
from dicomweb_server.attributes import MATCHING_PATHS
from dicomweb_server.blobstore import hashing
from dicomweb_server.dimse import connections as dimse_connections
from dicomweb_server.dimse import handlers, identifier
from dicomweb_server.dimse import sending as dimse_sending
from dicomweb_server.dimse import server as dimse_server
from dicomweb_server.errors import FailureReason
from dicomweb_server.media import mediatypes, negotiate
from dicomweb_server.retrieve import frames as retrieve_frames
from dicomweb_server.retrieve import pixeldata
from dicomweb_server.routes import admin, common, stow
from dicomweb_server.transcode import codecs, convert, frames

STATEMENT = Path(__file__).resolve().parents[1] / "conformance" / "STATEMENT.md"


def table(heading: str) -> list[list[str]]:
    text = STATEMENT.read_text()
    start = text.index(f"\n{heading}\n")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not re.match(r"^\|[-|]+\|$", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]


def test_matching_keys() -> None:
    documented = {(k, t, vr, lvl) for k, t, vr, lvl in table("### Matching keys")}
    code = {
        (".".join(a.keyword for a in p), ".".join(f"{a.tag:08X}" for a in p), p[-1].vr,
         p[0].level.value)
        for p in MATCHING_PATHS
    }  # fmt: skip
    assert documented == code


def test_failure_reasons() -> None:
    documented = {(int(code, 16), name) for code, name, _ in table("### Failure reasons")}
    assert documented == {(int(r), r.name) for r in FailureReason}


def test_frame_media_types() -> None:
    documented = dict((ts, mt) for ts, mt in table("### Frame media types"))
    assert documented == {ts: negotiate.frame_media_type(ts) for ts in documented}
    assert set(documented) == set(negotiate._FRAME_MEDIA_TYPES)


def test_limits() -> None:
    modules = (config, multipart, query, matching, retrieve_frames, dicom_json, rendered,
               render, admin, auditlog, handlers, identifier, dimse_server, dimse_connections,
               common, stow_json, dicom_xml, dicomfile, stow, frames, convert, hashing, app, cli,
               httpd, mediatypes, dimse_sending, pixeldata, search)  # fmt: skip
    for name, value, _ in table("## Limits"):
        actual = [getattr(m, name) for m in modules if hasattr(m, name)]
        assert actual and set(actual) == {int(value)}, name  # a module may import another's


def test_encoders() -> None:
    documented = {(ts, lib) for ts, _name, lib, _ in table("### Encoders")}
    assert {ts for ts, _ in documented} == set(codecs.ENCODERS)
    for ts, library in documented:
        assert codecs.ENCODERS[ts].library.split("-")[-1] in library, ts


def test_version_matches_pyproject() -> None:
    import tomllib

    project = tomllib.loads((STATEMENT.parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == config.VERSION


def test_style_lists_every_module() -> None:
    """docs/STYLE.md section 1 names each module of the package, and nothing that is gone."""
    style = (STATEMENT.parents[1] / "docs" / "STYLE.md").read_text()
    block = style.split("## 1 Package layout", 1)[1].split("```")[1]
    listed: set[str] = set()
    package = ""
    for line in block.splitlines():
        if m := re.match(r"  (\w+)/\s", line):
            package = m[1] + "/"
        elif m := re.match(r"  ((?:\w+/)?\w+\.py)\s", line):
            listed.add(m[1])
            package = ""
        elif (m := re.match(r"    (\w+\.py)\s", line)) and package:
            listed.add(package + m[1])
    root = STATEMENT.parents[1] / "dicomweb_server"
    actual = {str(p.relative_to(root)) for p in root.rglob("*.py")}
    packages_described_by_their_init = {p for p in actual if p.endswith("/__init__.py")}
    assert listed == actual - packages_described_by_their_init | {"routes/__init__.py"}
