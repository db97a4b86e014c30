"""Authentication and roles (issue 7): API keys, 401/403, open endpoints, serving without
authentication (loopback only, local host names), the Host header. OIDC bearer JWTs:
test_auth_oidc.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from dicomweb_server import auth
from dicomweb_server.auth import create_api_key, is_loopback
from dicomweb_server.cli import main, unsafe_serving
from dicomweb_server.config import Settings
from dicomweb_server.errors import UnauthorizedError
from dicomweb_server.response_json import absolutize_bulk_uris, absolutize_bulk_uris_bytes
from dicomweb_server.routes import ROUTE_ROLES, ROUTES
from dicomweb_server.routes.admin import MAX_ADMIN_BODY_BYTES, MAX_KEY_NAME_CHARS
from tests.auth_support import _client
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

JSON = {"Content-Type": "application/json"}

pytestmark = pytest.mark.db

VIEWER = "http://localhost:3000"

_UID_PARAMS = {"study": "1.2.3", "series": "1.2.3.4", "instance": "1.2.3.4.5", "frames": "1",
               "path": "7FE00010", "key_id": "abc"}  # fmt: skip


def _all_routes() -> Iterator[tuple[str, str, str]]:
    """(route name, method, concrete path) of every route of the URL table."""
    for top in ROUTES:
        inner = top.routes if isinstance(top, Mount) else [top]
        prefix = top.path if isinstance(top, Mount) else ""
        for route in inner:
            assert isinstance(route, Route)
            path = prefix + route.path
            for key, value in _UID_PARAMS.items():
                path = path.replace("{" + key + "}", value).replace("{" + key + ":path}", value)
            for method in sorted((route.methods or set()) - {"HEAD"}):
                yield route.name, method, path


@pytest.fixture
async def apikey_app(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    async with _client(dataclasses.replace(settings, auth="apikey")) as pair:
        yield pair


async def _key(app: Starlette, role: str) -> dict[str, str]:
    _, token = await create_api_key(app.state.services.index, role, f"test {role}")
    return {"Authorization": f"Bearer {token}"}


def test_every_route_has_a_role() -> None:
    names = {name for name, _, _ in _all_routes()}
    assert names == set(ROUTE_ROLES), names ^ set(ROUTE_ROLES)
    # open: the health check and the two descriptions of the URL table (nothing of the data)
    assert [n for n, role in ROUTE_ROLES.items() if role is None] == [
        "health", "openapi", "retrieve_capabilities"
    ]  # fmt: skip


async def test_every_route_without_credentials_is_401(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    _, client = apikey_app
    checked = set()  # names: a route may be served at two paths (`/dicom-web`, `/dicom-web/`)
    for name, method, path in _all_routes():
        r = await client.request(method, path, headers={"Origin": VIEWER})
        if ROUTE_ROLES[name] is None:
            assert r.status_code == 200, path
            continue
        assert r.status_code == 401, (name, method, path, r.status_code)
        assert r.headers["www-authenticate"] == 'Bearer realm="dicomweb"'
        assert r.headers["access-control-allow-origin"] == VIEWER  # field notes 2
        checked.add(name)
    assert checked == {name for name, role in ROUTE_ROLES.items() if role is not None}
    # A path no route serves needs credentials too: probing answers 401, not 404.
    r = await client.get(f"{ROOT}/no-such-thing")
    assert r.status_code == 401


async def test_preflight_stays_open(apikey_app: tuple[Starlette, httpx.AsyncClient]) -> None:
    _, client = apikey_app
    r = await client.options(
        f"{ROOT}/studies",
        headers={"Origin": VIEWER, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )  # fmt: skip
    assert r.status_code == 200
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


async def test_each_role_gets_exactly_what_it_may(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = apikey_app
    ds = make_instance()
    body, headers = multipart_body([to_bytes(ds)]), stow_headers()
    expected = {  # role -> (QIDO, WADO metadata, STOW, admin)
        "read": (200, 200, 403, 403),
        "write": (403, 403, 200, 403),
        "admin": (200, 200, 200, 200),
    }
    admin = await _key(app, "admin")
    r = await client.post(f"{ROOT}/studies", content=body, headers=headers | admin)
    assert r.status_code == 200
    meta = f"{ROOT}/studies/{ds.StudyInstanceUID}/metadata"
    for role, (qido, wado, stow, adm) in expected.items():
        creds = await _key(app, role)
        assert (await client.get(f"{ROOT}/studies", headers=creds)).status_code == qido, role
        assert (await client.get(meta, headers=creds)).status_code == wado, role
        r = await client.post(f"{ROOT}/studies", content=body, headers=headers | creds)
        assert r.status_code == stow, role
        if stow == 403:
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert (await client.get("/admin/apikeys", headers=creds)).status_code == adm, role


async def test_bad_and_revoked_keys_are_401(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = apikey_app
    good = await _key(app, "read")
    token = good["Authorization"].removeprefix("Bearer ")
    key_id = token.split("_")[1]
    for header in (
        f"Bearer {token[:-1]}x",  # wrong secret
        f"Bearer dwk_000000000000_{token.split('_', 2)[2]}",  # unknown id, real secret
        "Bearer not-a-key",
        f"Basic {token}",  # wrong scheme
        "Bearer ",
    ):
        r = await client.get(f"{ROOT}/studies", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.headers["www-authenticate"].startswith('Bearer realm="dicomweb"')
    assert (await client.get(f"{ROOT}/studies", headers=good)).status_code == 204
    # Revoked over HTTP by an admin: refused at once.
    admin = await _key(app, "admin")
    assert (await client.delete(f"/admin/apikeys/{key_id}", headers=admin)).status_code == 204
    assert (await client.delete(f"/admin/apikeys/{key_id}", headers=admin)).status_code == 404
    r = await client.get(f"{ROOT}/studies", headers=good)
    assert r.status_code == 401 and "revoked" in r.json()["message"]


async def test_keys_revoked_elsewhere_are_refused_within_the_cache_time(
    apikey_app: tuple[Starlette, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "API_KEY_CACHE_S", 0.5)
    app, client = apikey_app
    good = await _key(app, "read")
    assert (await client.get(f"{ROOT}/studies", headers=good)).status_code == 204
    key_id = good["Authorization"].split("_")[1]
    # Revoked by another process (the command line): this process still has it cached ...
    assert await app.state.services.index.revoke_api_key(key_id)
    assert (await client.get(f"{ROOT}/studies", headers=good)).status_code == 204
    await asyncio.sleep(0.6)
    # ... for at most API_KEY_CACHE_S.
    assert (await client.get(f"{ROOT}/studies", headers=good)).status_code == 401


async def test_admin_creates_keys_over_http(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = apikey_app
    admin = await _key(app, "admin")
    r = await client.post("/admin/apikeys", json={"role": "write", "name": "CT1"}, headers=admin)
    assert r.status_code == 201
    new = {"Authorization": f"Bearer {r.json()['token']}"}
    assert (await client.get(f"{ROOT}/studies", headers=new)).status_code == 403
    listing = (await client.get("/admin/apikeys", headers=admin)).json()
    assert {"role": "write", "name": "CT1"}.items() <= next(
        k for k in listing if k["key_id"] == r.json()["key_id"]
    ).items()
    assert all("token" not in k and "secret" not in json.dumps(k) for k in listing)
    for bad in ({"role": "root"}, {"name": "x"}, [1], {"role": "read", "name": "a\x00b"},
                {"role": "read", "name": 7}, {"role": "read", "name": "n" * 201}):  # fmt: skip
        r = await client.post("/admin/apikeys", json=bad, headers=admin)
        assert r.status_code == 400, bad
    not_objects: list[object] = [[], "read", 7]  # found by review: Python's text was the reason
    for not_object in not_objects:
        r = await client.post("/admin/apikeys", json=not_object, headers=admin)
        assert r.status_code == 400 and "not a JSON object" in r.text, not_object
    longest = {"role": "read", "name": "n" * MAX_KEY_NAME_CHARS}
    r = await client.post("/admin/apikeys", json=longest, headers=admin)
    assert r.status_code == 201, r.text
    largest = json.dumps({"role": "read", "name": "big"}).encode()
    largest += b" " * (MAX_ADMIN_BODY_BYTES - len(largest))
    r = await client.post("/admin/apikeys", content=largest, headers={**admin, **JSON})
    assert r.status_code == 201, r.text
    r = await client.post("/admin/apikeys", content=largest + b" ", headers={**admin, **JSON})
    assert r.status_code == 413


async def test_key_creation_needs_a_json_body(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    """POST /admin/apikeys takes application/json only (parameters allowed): any other
    Content-Type, or none, is a 415 that says what is needed (RFC 9110 15.5.16), and no key is
    made. It used to take the JSON of a text/plain body, or of one with no type."""
    app, client = apikey_app
    admin = await _key(app, "admin")
    body = json.dumps({"role": "read", "name": "typed"}).encode()
    before = len(await app.state.services.index.api_keys())
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                         "application/jsonx", "application/json-seq", "application/*",
                         "multipart/form-data; boundary=x", "json", "; charset=utf-8"):  # fmt: skip
        headers = dict(admin) if content_type is None else {**admin, "Content-Type": content_type}
        r = await client.post("/admin/apikeys", content=body, headers=headers)
        assert r.status_code == 415, content_type
        assert "Content-Type: application/json" in r.json()["message"], content_type
    assert len(await app.state.services.index.api_keys()) == before
    for content_type in ("application/json", "Application/JSON", "application/json; charset=utf-8",
                         'application/json;charset="UTF-8"'):  # fmt: skip
        headers = {**admin, "Content-Type": content_type}
        r = await client.post("/admin/apikeys", content=body, headers=headers)
        assert r.status_code == 201, content_type


async def test_keys_are_stored_hashed(apikey_app: tuple[Starlette, httpx.AsyncClient]) -> None:
    app, _ = apikey_app
    token = (await _key(app, "read"))["Authorization"].removeprefix("Bearer ")
    secret = token.split("_", 2)[2]
    (key,) = await app.state.services.index.api_keys()
    assert secret.encode() not in key.secret_sha256 and len(key.secret_sha256) == 32


# Serving without authentication


def test_no_auth_only_on_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert unsafe_serving(Settings()) is None
    assert unsafe_serving(Settings(host="0.0.0.0", insecure=True)) is None
    assert unsafe_serving(Settings(host="0.0.0.0", auth="apikey")) is None
    refusal = unsafe_serving(Settings(host="0.0.0.0"))
    assert refusal and "--insecure" in refusal
    # DIMSE has no credentials: off loopback, only with an AE allow-list (or --insecure).
    dimse = Settings(host="0.0.0.0", auth="apikey", dimse_port=11112)
    assert "--dimse-allowed-aes" in (unsafe_serving(dimse) or "")
    assert unsafe_serving(dataclasses.replace(dimse, dimse_allowed_aes=("CT1",))) is None
    assert unsafe_serving(dataclasses.replace(dimse, insecure=True)) is None
    # The command refuses before it binds anything.
    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "without authentication" in capsys.readouterr().err
    assert main(["serve", "--auth", "oidc"]) == 2
    assert "DICOMWEB_OIDC_ISSUER" in capsys.readouterr().err


def test_no_auth_refuses_cors_for_every_origin() -> None:
    """Found by review: `--auth none` with DICOMWEB_CORS_ORIGINS=* let any web site the user
    opens read the archive through the browser (the page's request names 127.0.0.1, so the
    DNS rebinding check passes it, and `Access-Control-Allow-Origin: *` lets it read the
    answer), store, and mint admin keys that outlive `--auth none`."""
    everyone = Settings(cors_origins=("*",))
    refusal = unsafe_serving(everyone)
    assert refusal and "DICOMWEB_CORS_ORIGINS" in refusal and "--insecure" in refusal
    assert unsafe_serving(dataclasses.replace(everyone, insecure=True)) is None
    assert unsafe_serving(dataclasses.replace(everyone, auth="apikey")) is None
    assert unsafe_serving(Settings(cors_origins=("https://viewer.example.org",))) is None
    assert unsafe_serving(Settings(cors_origins=("http://localhost:3000", "*"))) is not None
    # `null`: any site, from a sandboxed iframe (found by review)
    assert unsafe_serving(Settings(cors_origins=("http://localhost:3000", "null"))) is not None
    assert unsafe_serving(Settings(cors_origins=("null",), insecure=True)) is None


# Found by review: none of these may be a 500, and none may echo the caller's text in headers.


async def test_revocation_during_a_lookup_is_not_cached(settings: Settings) -> None:
    from dicomweb_server.auth import ApiKeyAuth
    from dicomweb_server.index.database import Index

    index = await Index.open(settings.database_url or "", max_size=2, timeout_s=30)
    try:
        await index.apply_schema((Path(__file__).parents[1] / "schema.sql").read_text())
        key_id, token = await create_api_key(index, "read")
        authenticator = ApiKeyAuth(index)
        real_lookup = index.api_key
        gate = asyncio.Event()

        async def slow_lookup(kid: str) -> Any:
            found = await real_lookup(kid)  # read before the revocation ...
            await gate.wait()  # ... and answered after it
            return found

        index.api_key = slow_lookup  # type: ignore[method-assign,assignment]
        pending = asyncio.create_task(authenticator.authenticate(f"Bearer {token}"))
        await asyncio.sleep(0.05)
        await real_lookup(key_id)
        assert await index.revoke_api_key(key_id)
        authenticator.forget(key_id)
        gate.set()
        await pending  # that request was in flight before the revocation: it passes
        index.api_key = real_lookup  # type: ignore[method-assign]
        with pytest.raises(UnauthorizedError, match="revoked"):
            await authenticator.authenticate(f"Bearer {token}")
    finally:
        await index.close()


async def test_no_auth_answers_only_local_host_names(settings: Settings) -> None:
    async with _client(dataclasses.replace(settings, allowed_hosts=())) as (_, client):
        for host, status in (("localhost:8080", 204), ("127.0.0.1", 204), ("[::1]:80", 204),
                             ("viewer.localhost", 204), ("evil.example", 403),
                             ("127.0.0.1.nip.io", 403)):  # fmt: skip
            r = await client.get(f"{ROOT}/studies", headers={"Host": host})
            assert r.status_code == status, host
        assert "DNS" not in r.text and "not this server's name" in r.json()["message"]
        assert (await client.get("/health", headers={"Host": "evil.example"})).status_code == 200
    for opened in ({"insecure": True}, {"allowed_hosts": ("*",)}):
        async with _client(dataclasses.replace(settings, **opened)) as (_, client):
            r = await client.get(f"{ROOT}/studies", headers={"Host": "192.0.2.8:8080"})
            assert r.status_code == 204, opened
    assert "--trusted-proxies" in (unsafe_serving(Settings(trusted_proxies=("10.0.0.1",))) or "")


async def test_options_and_bad_admin_input_are_not_free(
    apikey_app: tuple[Starlette, httpx.AsyncClient],
) -> None:
    app, client = apikey_app
    # A plain OPTIONS (not a CORS preflight) needs credentials like any other method.
    assert (await client.options("/admin/apikeys")).status_code == 401
    assert (await client.options(f"{ROOT}/no/such")).status_code == 401
    admin = await _key(app, "admin")
    assert (await client.delete("/admin/apikeys/%00", headers=admin)).status_code == 404
    deep = b"[" * 3000
    r = await client.post("/admin/apikeys", content=deep, headers={**admin, **JSON})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "host", ['x","BulkDataURI":"http://evil/","y":"', 'a"b', "a\\b", "a b", "a<b>", "h:99999x"]
)
async def test_a_host_header_that_is_no_host_is_a_400(
    apikey_app: tuple[Starlette, httpx.AsyncClient], host: str
) -> None:
    """With API keys any Host is served (no allow-list), and it is copied into the URIs of
    response bodies: one holding a quote rewrote the metadata's JSON, and made the XML
    metadata a 500 (found by review). RFC 9110 7.2: Host is uri-host [":" port]."""
    app, client = apikey_app
    headers = await _key(app, "write")
    ds = make_instance(rows=64, cols=64)  # Pixel Data over the bulk data threshold
    r = await client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(ds)]),
        headers=stow_headers() | headers,
    )
    assert r.status_code == 200, r.text
    read = await _key(app, "read")
    url = f"{inst_url(ds).removesuffix('/instances/' + ds.SOPInstanceUID)}/metadata"
    for accept in ("application/dicom+json", 'multipart/related; type="application/dicom+xml"'):
        r = await client.get(url, headers=read | {"Host": host, "Accept": accept})
        assert r.status_code == 400, (accept, r.status_code, r.text[:300])
        assert "Host header" in r.json()["message"]
    # A STOW is refused before anything is stored (it was stored, then answered 400).
    other = make_instance()
    r = await client.post(
        f"{ROOT}/studies",
        content=multipart_body([to_bytes(other)]),
        headers=stow_headers() | headers | {"Host": host},
    )
    assert r.status_code == 400
    r = await client.get(f"{ROOT}/studies/{other.StudyInstanceUID}/metadata", headers=read)
    assert r.status_code == 404
    r = await client.get(url, headers=read | {"Host": "[::1]:8080"})
    assert r.status_code == 200
    uri = r.json()[0]["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://[::1]:8080/dicom-web/studies/")


def test_bulk_uris_made_absolute_stay_json() -> None:
    """The base URL is escaped as JSON text where it is put into stored JSON (a second line
    of defence behind the Host check)."""
    text = '{"7FE00010": {"vr": "OW", "BulkDataURI": "/studies/1/bulk/7FE00010"}}'
    base = 'http://a"b\\c/dicom-web'
    doc = json.loads(absolutize_bulk_uris(text, base))
    assert doc["7FE00010"]["BulkDataURI"] == base + "/studies/1/bulk/7FE00010"
    raw = absolutize_bulk_uris_bytes(text.encode(), base)
    assert json.loads(raw)["7FE00010"]["BulkDataURI"] == base + "/studies/1/bulk/7FE00010"
