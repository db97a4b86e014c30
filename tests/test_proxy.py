"""Behind a trusted reverse proxy (field notes 13): client address, scheme and host forwarded."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from dicomweb_server.app import create_app
from dicomweb_server.config import ConfigError, Settings
from tests.helpers import ROOT, TEST_HOSTS, make_instance, multipart_body, stow_headers, to_bytes

pytestmark = pytest.mark.db

# `--auth none` answers only host names it knows (DNS rebinding): the public names used here.
_HOSTS = (*TEST_HOSTS, "pacs.example.org", "img.example.org")


@pytest.fixture
async def proxied(settings: Settings) -> AsyncIterator[Starlette]:
    app = create_app(dataclasses.replace(settings, trusted_proxies=("10.0.0.0/8",),
                                         allowed_hosts=_HOSTS))  # fmt: skip
    async with app.router.lifespan_context(app):
        yield app


def _client(app: Starlette, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://archive.internal:8080")


async def _retrieve_url(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    r = await client.get(f"{ROOT}/studies", headers=headers)
    assert r.status_code == 200
    return str(r.json()[0]["00081190"]["Value"][0])


async def test_forwarded_headers_from_a_trusted_proxy(proxied: Starlette) -> None:
    ds = make_instance()
    async with _client(proxied, "10.1.2.3") as client:
        r = await client.post(f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
                              headers=stow_headers())  # fmt: skip
        assert r.status_code == 200
        study = f"/dicom-web/studies/{ds.StudyInstanceUID}"
        cases = {
            "x-forwarded": ({"X-Forwarded-For": "203.0.113.9, 10.9.9.9",
                             "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"},
                            f"https://pacs.example.org{study}"),
            "x-forwarded with port": ({"X-Forwarded-Proto": "https",
                                       "X-Forwarded-Host": "pacs.example.org",
                                       "X-Forwarded-Port": "8443"},
                                      f"https://pacs.example.org:8443{study}"),
            "proto only, Host kept by the proxy": ({"X-Forwarded-Proto": "https",
                                                    "Host": "pacs.example.org"},
                                                   f"https://pacs.example.org{study}"),
            "nothing forwarded": ({}, f"http://archive.internal:8080{study}"),
        }  # fmt: skip
        for why, (headers, expected) in cases.items():
            assert await _retrieve_url(client, headers) == expected, why
    await proxied.state.audit.flush()
    rows = await proxied.state.services.index._fetch(
        "SELECT client FROM audit_log ORDER BY seq DESC LIMIT 6"
    )
    clients = [r["client"] for r in reversed(rows)]
    # STOW from the proxy itself, then the forwarded clients (the rightmost untrusted hop).
    assert clients[-5:] == ["10.1.2.3", "203.0.113.9", "10.1.2.3", "10.1.2.3", "10.1.2.3"]


async def test_untrusted_peers_cannot_forge_forwarded_headers(proxied: Starlette) -> None:
    ds = make_instance()
    async with _client(proxied, "198.51.100.20") as client:
        await client.post(f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
                          headers=stow_headers())  # fmt: skip
        forged = {
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=10.0.0.1;host=evil.example",
        }
        url = await _retrieve_url(client, forged)
        assert url.startswith("http://archive.internal:8080/")
    await proxied.state.audit.flush()
    (row,) = await proxied.state.services.index._fetch(
        "SELECT client FROM audit_log ORDER BY seq DESC LIMIT 1"
    )
    assert row["client"] == "198.51.100.20"


async def test_rfc_7239_when_the_proxy_writes_it(settings: Settings) -> None:
    s = dataclasses.replace(settings, trusted_proxies=("10.0.0.0/8",), allowed_hosts=_HOSTS)
    app = create_app(dataclasses.replace(s, proxy_headers="forwarded"))
    ds = make_instance()
    async with app.router.lifespan_context(app), _client(app, "10.1.2.3") as client:
        await client.post(f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
                          headers=stow_headers())  # fmt: skip
        headers = {"Forwarded": 'for="[2001:db8::7]";proto=https;host=img.example.org',
                   "X-Forwarded-Host": "ignored.example"}  # fmt: skip
        url = await _retrieve_url(client, headers)
        assert url.startswith("https://img.example.org/dicom-web/studies/")
        await app.state.audit.flush()
        (row,) = await app.state.services.index._fetch(
            "SELECT client FROM audit_log ORDER BY seq DESC LIMIT 1"
        )
        assert row["client"] == "2001:db8::7"


def test_trusted_proxies_setting() -> None:
    s = Settings.from_env({"DICOMWEB_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1,::1"})
    assert s.trusted_proxies == ("10.0.0.0/8", "192.0.2.1", "::1")
    with pytest.raises(ConfigError, match="not an address"):
        Settings(trusted_proxies=("proxy.example",))


async def test_only_the_configured_header_family_is_read(proxied: Starlette) -> None:
    """nginx writes X-Forwarded-* and passes a client's own Forwarded header through: with the
    default family, that Forwarded header must not win (found by review)."""
    ds = make_instance()
    async with _client(proxied, "10.1.2.3") as client:
        await client.post(f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]),
                          headers=stow_headers())  # fmt: skip
        sneaky = {"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https",
                  "X-Forwarded-Host": "pacs.example.org",
                  "Forwarded": "for=6.6.6.6;host=evil.example;proto=http"}  # fmt: skip
        url = await _retrieve_url(client, sneaky)
        assert url.startswith("https://pacs.example.org/")
        # A port that is a digit to str.isdigit but not to int() is ignored, not a 500.
        odd = {b"X-Forwarded-Host": b"pacs.example.org", b"X-Forwarded-Port": b"\xb2"}
        r = await client.get(f"{ROOT}/studies", headers=odd)
        assert r.status_code == 200
    await proxied.state.audit.flush()
    rows = await proxied.state.services.index._fetch(
        "SELECT client FROM audit_log ORDER BY seq DESC LIMIT 2"
    )
    assert rows[1]["client"] == "203.0.113.5"


def test_ipv4_mapped_peers_are_matched() -> None:
    from dicomweb_server.proxy import _trusted, parse_networks

    nets = parse_networks(["10.0.0.0/8"])
    assert _trusted("::ffff:10.0.0.5", nets) and not _trusted("::ffff:11.0.0.5", nets)


async def test_forwarded_prefix_from_a_trusted_proxy(proxied: Starlette) -> None:
    """A proxy serving the archive under a path (`location /pacs/`) says so with
    X-Forwarded-Prefix: every URL emitted carries it, and each one is served through the
    proxy (field notes 13). Not from an untrusted peer; not when it is not a plain path."""
    ds = make_instance()
    study = f"/dicom-web/studies/{ds.StudyInstanceUID}"
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"}
    async with _client(proxied, "10.1.2.3") as client:
        prefixed = {**stow_headers(), **https, "X-Forwarded-Prefix": "/pacs"}
        r = await client.post(
            f"{ROOT}/studies", content=multipart_body([to_bytes(ds)]), headers=prefixed
        )
        assert r.json()["00081190"]["Value"] == [f"https://pacs.example.org/pacs{study}"]
        cases = {
            "/pacs": f"https://pacs.example.org/pacs{study}",
            "/hospital/pacs/": f"https://pacs.example.org/hospital/pacs{study}",
            "/a, /pacs": f"https://pacs.example.org/pacs{study}",  # the nearest proxy's
            "pacs": f"https://pacs.example.org{study}",  # not a path: ignored
            "/pacs?x=1": f"https://pacs.example.org{study}",
            "//evil.example/x": f"https://pacs.example.org{study}",
        }
        for prefix, expected in cases.items():
            headers = {**https, "X-Forwarded-Prefix": prefix}
            assert await _retrieve_url(client, headers) == expected, prefix
        r = await client.get(f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata",
                             headers={**https, "X-Forwarded-Prefix": "/pacs"})  # fmt: skip
        bulk = r.json()[0]["7FE00010"]["BulkDataURI"]
        assert bulk.startswith(f"https://pacs.example.org/pacs{study}/series/")
    async with _client(proxied, "198.51.100.20") as client:
        url = await _retrieve_url(client, {"X-Forwarded-Prefix": "/evil"})
        assert url == f"http://archive.internal:8080{study}"
