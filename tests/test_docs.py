"""The conformance statement agrees with the code's own tables (datasette's test_docs style)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dicomweb_server import (
    app,
    auditlog,
    cli,
    config,
    dicom_json,
    dicom_xml,
    dicomfile,
    headersize,
    httpd,
    iccprofile,
    matching,
    metadata,
    multipart,
    query,
    render,
    rendered,
    search,
    stow_json,
)
from dicomweb_server.attributes import MATCHING_PATHS
from dicomweb_server.blobstore import budget as blob_budget
from dicomweb_server.blobstore import files as blob_files
from dicomweb_server.blobstore import hashing
from dicomweb_server.dimse import connections as dimse_connections
from dicomweb_server.dimse import conversion as dimse_conversion
from dicomweb_server.dimse import handlers, identifier
from dicomweb_server.dimse import sending as dimse_sending
from dicomweb_server.dimse import server as dimse_server
from dicomweb_server.dimse import stores as dimse_stores
from dicomweb_server.errors import FailureReason
from dicomweb_server.media import mediatypes, negotiate
from dicomweb_server.retrieve import frames as retrieve_frames
from dicomweb_server.retrieve import instances as retrieve_instances
from dicomweb_server.retrieve import pixeldata
from dicomweb_server.routes import admin, common, metadata_body, stow
from dicomweb_server.transcode import codecs, convert, fragments, frames, inflated, pixelwrite

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
               httpd, mediatypes, dimse_sending, pixeldata, search, metadata,
               metadata_body, inflated, fragments, pixelwrite, dimse_conversion,
               retrieve_instances, blob_files, blob_budget, iccprofile, headersize,
               dimse_stores)  # fmt: skip
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


# README's Settings table, row by row: the environment variable -> (Settings field, its default
# as the README writes it, that default in the code, a value to set, the value read from it).
README_SETTINGS: dict[str, tuple[str, str, object, str, object]] = {
    "DICOMWEB_HOST": ("host", "`127.0.0.1`", "127.0.0.1", "0.0.0.0", "0.0.0.0"),
    "DICOMWEB_PORT": ("port", "`8080`", 8080, "9000", 9000),
    "DICOMWEB_DATA_DIR": ("data_dir", "`./data`", Path("data"), "/srv/d", Path("/srv/d")),
    "DICOMWEB_WORKERS": ("workers", "`1`", 1, "2", 2),
    "DATABASE_URL": ("database_url", "none: embedded PostgreSQL", None, "postgresql://h/d",
                     "postgresql://h/d"),
    "DICOMWEB_PUBLIC_URL": ("public_url", "from the request", None, "https://p/dw", "https://p/dw"),
    "DICOMWEB_CORS_ORIGINS": ("cors_origins", "any port of localhost / 127.0.0.1", None,
                              "https://a, https://b", ("https://a", "https://b")),
    "DICOMWEB_VIEWER_URL": ("viewer_url", "`http://127.0.0.1:3000`", "http://127.0.0.1:3000",
                            "http://v", "http://v"),
    "DICOMWEB_MAX_PART_BYTES": ("max_part_bytes", "4 GiB", 4 << 30, "5000", 5000),
    "DICOMWEB_MAX_REQUEST_BYTES": ("max_request_bytes", "64 GiB", 64 << 30, "9000", 9000),
    "DICOMWEB_BODY_IDLE_TIMEOUT_S": ("body_idle_timeout_s", "`60`", 60.0, "7.5", 7.5),
    "DICOMWEB_SEND_STALL_TIMEOUT_S": ("send_stall_timeout_s", "`60`", 60.0, "8", 8.0),
    "DICOMWEB_AUTH": ("auth", "`none`", "none", "apikey", "apikey"),
    "DICOMWEB_INSECURE": ("insecure", "off", False, "1", True),
    "DICOMWEB_OIDC_ISSUER": ("oidc_issuer", "", None, "https://i", "https://i"),
    "DICOMWEB_OIDC_AUDIENCE": ("oidc_audience", "", None, "dw", "dw"),
    "DICOMWEB_OIDC_JWKS": ("oidc_jwks", "", None, "jwks.json", "jwks.json"),
    "DICOMWEB_CERTFILE": ("certfile", "none: plain HTTP", None, "c.pem", Path("c.pem")),
    "DICOMWEB_KEYFILE": ("keyfile", "none: plain HTTP", None, "k.pem", Path("k.pem")),
    "DICOMWEB_AUDIT": ("audit", "`1`", True, "0", False),
    "MALLOC_ARENA_MAX": ("malloc_arena_max", "`2`", 2, "8", 8),
    "DICOMWEB_TRUSTED_PROXIES": ("trusted_proxies", "none", (), "10.0.0.1,10.1.0.0/16",
                                 ("10.0.0.1", "10.1.0.0/16")),
    "DICOMWEB_PROXY_HEADERS": ("proxy_headers", "`x-forwarded`", "x-forwarded", "forwarded",
                               "forwarded"),
    "DICOMWEB_ALLOWED_HOSTS": ("allowed_hosts", "none", (), "pacs.example", ("pacs.example",)),
    "DICOMWEB_DIMSE_PORT": ("dimse_port", "none: DIMSE off", None, "11112", 11112),
    "DICOMWEB_AE_TITLE": ("ae_title", "`DICOMWEB`", "DICOMWEB", "ARCHIVE", "ARCHIVE"),
    "DICOMWEB_DIMSE_PEERS": ("dimse_peers", "none", None, "peers.json", Path("peers.json")),
    "DICOMWEB_DIMSE_ALLOWED_AES": ("dimse_allowed_aes", "any", None, "CT1, MR2", ("CT1", "MR2")),
    "DICOMWEB_DIMSE_MAX_ASSOCIATIONS": ("dimse_max_associations", "`10`", 10, "3", 3),
    "DICOMWEB_DIMSE_MAX_ASSOCIATIONS_PER_PEER": ("dimse_max_associations_per_peer", "`4`", 4,
                                                 "2", 2),
    "DICOMWEB_DIMSE_PDU_DEADLINE_S": ("dimse_pdu_deadline_s", "`60`", 60.0, "5", 5.0),
}  # fmt: skip
# Variables read together: one alone is refused (TLS needs both files).
COMPANIONS = {"DICOMWEB_CERTFILE": {"DICOMWEB_KEYFILE": "k.pem"},
              "DICOMWEB_KEYFILE": {"DICOMWEB_CERTFILE": "c.pem"}}  # fmt: skip
FLAG_COMPANIONS = {"--certfile": ["--keyfile", "k.pem"], "--keyfile": ["--certfile", "c.pem"]}


def readme_settings() -> list[tuple[list[str], list[str], str]]:
    """README's Settings table: (flags, environment variables, default) per row, the
    `DICOMWEB_OIDC_ISSUER`, `_AUDIENCE` shorthand written out."""
    text = (STATEMENT.parents[1] / "README.md").read_text()
    rows = []
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    for line in [line for line in section.splitlines() if line.startswith("|")][2:]:
        flags, envs, default, _meaning = (c.strip() for c in line.strip("|").split("|", 3))
        names: list[str] = []
        for name in re.findall(r"`([A-Z_]+)`", envs):
            names.append(names[0].rsplit("_", 1)[0] + name if name.startswith("_") else name)
        rows.append((re.findall(r"`(--[a-z-]+)`", flags), names, default))
    return rows


def test_readme_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable of README's Settings table is read by that name, with the default the
    README gives, and each flag of a row sets what that row's variable sets."""
    rows = readme_settings()
    assert {n for _, names, _ in rows for n in names} == set(README_SETTINGS)
    defaults = config.Settings()
    monkeypatch.setattr(os, "environ", {})
    for flags, names, default in rows:
        assert not flags or len(flags) == len(names), flags
        for i, name in enumerate(names):
            field, documented, code_default, value, read = README_SETTINGS[name]
            assert (default, getattr(defaults, field)) == (documented, code_default), name
            env = {name: value, **COMPANIONS.get(name, {})}
            assert getattr(config.Settings.from_env(env), field) == read, name
            if flags:
                given = [value] if flags[i] != "--insecure" else []
                argv = ["serve", flags[i], *given, *FLAG_COMPANIONS.get(flags[i], [])]
                assert getattr(cli._settings(cli._parser().parse_args(argv)), field) == read, flags
