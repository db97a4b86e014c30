"""Authentication and roles (issue 7): API keys, OIDC bearer JWTs, 401/403, open endpoints."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import http.server
import json
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import jwt.api_jwk
import jwt.jwk_set_cache
import jwt.jwks_client
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from dicomweb_server import auth
from dicomweb_server.app import create_app
from dicomweb_server.auth import _roles, create_api_key, is_loopback
from dicomweb_server.cli import main, unsafe_serving
from dicomweb_server.config import ConfigError, Settings
from dicomweb_server.errors import UnauthorizedError
from dicomweb_server.response_json import absolutize_bulk_uris, absolutize_bulk_uris_bytes
from dicomweb_server.routes import ROUTE_ROLES, ROUTES
from dicomweb_server.routes.admin import MAX_ADMIN_BODY_BYTES, MAX_KEY_NAME_CHARS
from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers, to_bytes

JSON = {"Content-Type": "application/json"}

pytestmark = pytest.mark.db

VIEWER = "http://localhost:3000"
ISSUER = "https://idp.example.org/realms/radiology"
AUDIENCE = "dicomweb"
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


@contextlib.asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client


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


# OIDC


@dataclasses.dataclass
class Issuer:
    key: rsa.RSAPrivateKey
    kid: str
    jwks: dict[str, Any]

    def token(self, *, key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now,
                   "exp": now + 300, "scope": "openid dicomweb.read"} | claims  # fmt: skip
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": self.kid})


def _new_issuer(kid: str = "k1") -> Issuer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk |= {"kid": kid, "use": "sig", "alg": "RS256"}
    return Issuer(key, kid, {"keys": [jwk]})


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return _new_issuer()


@pytest.fixture
async def oidc_app(
    settings: Settings, issuer: Issuer, tmp_path: Path
) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks))
    oidc = dataclasses.replace(settings, auth="oidc", oidc_issuer=ISSUER,
                               oidc_audience=AUDIENCE, oidc_jwks=str(jwks))  # fmt: skip
    async with _client(oidc) as pair:
        yield pair


async def test_oidc_tokens(oidc_app: tuple[Starlette, httpx.AsyncClient], issuer: Issuer) -> None:
    _, client = oidc_app

    async def status(token: str, path: str = f"{ROOT}/studies") -> int:
        r = await client.get(path, headers={"Authorization": f"Bearer {token}"})
        return r.status_code

    now = int(time.time())
    assert await status(issuer.token()) == 204
    assert await status(issuer.token(scope="openid")) == 403  # no role
    assert await status(issuer.token(scope="dicomweb.admin"), "/admin/apikeys") == 200
    refused = {
        "expired": issuer.token(exp=now - 3600),
        "not yet valid": issuer.token(nbf=now + 3600),
        "no expiry": issuer.token(exp=None),
        "expiry as a string": issuer.token(exp=str(now + 3600)),  # RFC 7519 4.1.4: a number
        "not-before as a string": issuer.token(nbf=str(now - 60)),
        "other audience": issuer.token(aud="another-service"),
        "other issuer": issuer.token(iss="https://evil.example"),
        "wrong signature": issuer.token(key=_new_issuer().key),  # same kid, another key
        "unknown kid": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60},
                                  issuer.key, algorithm="RS256", headers={"kid": "k9"}),
        "HS256 with the public key": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "scope": "dicomweb.admin"},
            "x" * 32, algorithm="HS256", headers={"kid": issuer.kid}),
        "alg none": _unsigned({"alg": "none", "kid": issuer.kid},
                              {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}),
        "garbage": "abc.def.ghi",
    }  # fmt: skip
    for why, token in refused.items():
        r = await client.get(f"{ROOT}/studies", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, why
        assert 'error="invalid_token"' in r.headers["www-authenticate"], why


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def b64(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def test_roles_from_claims() -> None:
    assert _roles({"scope": "openid dicomweb.read dicomweb.write"}, "scope", "dicomweb.") == {
        "read", "write"}  # fmt: skip
    keycloak = {"realm_access": {"roles": ["offline_access", "admin"]}}
    assert _roles(keycloak, "realm_access.roles", "") == {"admin"}
    assert _roles({"scope": "dicomweb.root read"}, "scope", "dicomweb.") == frozenset()
    assert _roles({"roles": 7}, "roles", "") == frozenset()


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    gets = 0  # requests served, over all servers

    def do_GET(self) -> None:
        type(self).gets += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def _jwks_server(issuer: Issuer) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A local JWKS endpoint serving the issuer's keys, and its URL (close it when done)."""
    _JwksHandler.body = json.dumps(issuer.jwks).encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JwksHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/certs"


def _oidc_with(settings: Settings, jwks: str) -> Settings:
    return dataclasses.replace(settings, auth="oidc", oidc_issuer=ISSUER,
                               oidc_audience=AUDIENCE, oidc_jwks=jwks)  # fmt: skip


async def test_oidc_jwks_from_a_url(settings: Settings, issuer: Issuer) -> None:
    server, url = _jwks_server(issuer)
    oidc = _oidc_with(settings, url)
    try:
        async with _client(oidc) as (_, client):
            ok = {"Authorization": f"Bearer {issuer.token()}"}
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            server.shutdown()
            server.server_close()
            # Keys are cached: the issuer going away does not fail known tokens.
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
        dead = dataclasses.replace(oidc, oidc_jwks=url + "-gone")
        async with _client(dead) as (_, client):
            r = await client.get(f"{ROOT}/studies", headers=ok)
            assert r.status_code == 503 and "Retry-After" in r.headers
    finally:
        server.server_close()


class _Clock:
    """time.monotonic for the modules that keep JWKS times (auth and PyJWT's cache)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        fake = types.SimpleNamespace(monotonic=lambda: self.now)
        for module in (auth, jwt.api_jwk, jwt.jwk_set_cache, jwt.jwks_client):
            monkeypatch.setattr(module, "time", fake)


@pytest.mark.parametrize("failure", ["unreachable", "not a key set"])
async def test_oidc_jwks_failing_after_expiry_uses_the_last_good_set(
    settings: Settings, issuer: Issuer, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """The cached set expires while the issuer fails: known tokens still pass with the set
    of the last successful fetch until JWKS_STALE_MAX_S after it, even while that stale
    copy is itself cached; then 503."""
    clock = _Clock(monkeypatch)
    server, url = _jwks_server(issuer)
    ok = {"Authorization": f"Bearer {issuer.token()}"}
    try:
        async with _client(_oidc_with(settings, url)) as (_, client):
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            if failure == "unreachable":
                server.shutdown()
                server.server_close()
            else:  # a maintenance page answered with 200
                _JwksHandler.body = b"<html>down for maintenance</html>"
            clock.now += auth.JWKS_STALE_MAX_S - 1  # the cached copy expired long ago
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            clock.now += 2  # past the limit, though the stale copy was cached a second ago
            r = await client.get(f"{ROOT}/studies", headers=ok)
            assert r.status_code == 503 and "Retry-After" in r.headers
    finally:
        server.server_close()


async def test_oidc_unknown_key_while_the_issuer_fails_is_503(
    settings: Settings, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token signed by a key the last good set lacks, while the endpoint fails: perhaps a
    rotated key the endpoint could not give, so 503 (retry), not 401 (log in again)."""
    clock = _Clock(monkeypatch)
    server, url = _jwks_server(issuer)
    rotated = _new_issuer("k2")
    try:
        async with _client(_oidc_with(settings, url)) as (_, client):
            ok = {"Authorization": f"Bearer {issuer.token()}"}
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            _JwksHandler.body = b"<html>down for maintenance</html>"
            clock.now += auth.JWKS_CACHE_S + 1
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            clock.now += 60  # past PyJWT's cooldown between refreshes for unknown keys
            new = {"Authorization": f"Bearer {rotated.token()}"}
            r = await client.get(f"{ROOT}/studies", headers=new)
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert url not in r.text and "Expecting value" not in r.text  # logged, not told
    finally:
        server.shutdown()
        server.server_close()


async def test_oidc_failed_jwks_endpoint_is_not_asked_again_at_once(
    settings: Settings, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the stale limit, a failed fetch is not repeated for JWKS_RETRY_S: requests get 503
    at once instead of queueing for a failing endpoint; once it works again, so do tokens."""
    clock = _Clock(monkeypatch)
    server, url = _jwks_server(issuer)
    good = _JwksHandler.body
    ok = {"Authorization": f"Bearer {issuer.token()}"}
    try:
        async with _client(_oidc_with(settings, url)) as (_, client):
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            _JwksHandler.body = b"<html>down for maintenance</html>"
            clock.now += auth.JWKS_STALE_MAX_S + 1
            asked = _JwksHandler.gets
            for _ in range(3):
                r = await client.get(f"{ROOT}/studies", headers=ok)
                assert r.status_code == 503 and r.headers["Retry-After"] == str(auth.JWKS_RETRY_S)
            assert _JwksHandler.gets == asked + 1  # one attempt for the three requests
            _JwksHandler.body = good
            clock.now += auth.JWKS_RETRY_S
            assert (await client.get(f"{ROOT}/studies", headers=ok)).status_code == 204
            assert _JwksHandler.gets == asked + 2
    finally:
        server.shutdown()
        server.server_close()


async def test_oidc_jwks_not_a_key_set_at_first_is_503(settings: Settings, issuer: Issuer) -> None:
    server, url = _jwks_server(issuer)
    _JwksHandler.body = b"<html>down for maintenance</html>"
    try:
        async with _client(_oidc_with(settings, url)) as (_, client):
            r = await client.get(f"{ROOT}/studies",
                                 headers={"Authorization": f"Bearer {issuer.token()}"})  # fmt: skip
            assert r.status_code == 503 and "Retry-After" in r.headers  # the token may be fine
            assert url not in r.text and "Expecting value" not in r.text
    finally:
        server.shutdown()
        server.server_close()


def test_oidc_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="DICOMWEB_OIDC_ISSUER"):
        Settings(auth="oidc", oidc_audience="a", oidc_jwks="f")
    with pytest.raises(ConfigError, match="auth must be"):
        Settings.from_env({"DICOMWEB_AUTH": "ldap"})
    s = Settings.from_env({"DICOMWEB_AUTH": "oidc", "DICOMWEB_OIDC_ISSUER": ISSUER,
                           "DICOMWEB_OIDC_AUDIENCE": AUDIENCE, "DICOMWEB_OIDC_JWKS": "/k.json",
                           "DICOMWEB_OIDC_ROLE_PREFIX": ""})  # fmt: skip
    assert (s.auth, s.oidc_role_prefix, s.oidc_roles_claim) == ("oidc", "", "scope")


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


async def test_tokens_for_another_key_type_or_with_hostile_fields_are_401(
    oidc_app: tuple[Starlette, httpx.AsyncClient], issuer: Issuer
) -> None:
    _, client = oidc_app
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}
    hostile = {
        "ES256 named for an RSA key": _unsigned({"alg": "ES256", "kid": issuer.kid}, claims),
        "EdDSA named for an RSA key": _unsigned({"alg": "EdDSA", "kid": issuer.kid}, claims),
        "CRLF in crit": _unsigned(
            {"alg": "RS256", "kid": issuer.kid, "crit": ["x\r\nSet-Cookie: a=b"]}, claims
        ),
        "non-ASCII kid": _unsigned({"alg": "RS256", "kid": "€"}, claims),
        "non-ASCII crit": _unsigned({"alg": "RS256", "kid": issuer.kid, "crit": ["€"]}, claims),
    }
    for why, token in hostile.items():
        r = await client.get(f"{ROOT}/studies", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, why
        challenge = r.headers["www-authenticate"]
        assert "\r" not in challenge and "\n" not in challenge and "Set-Cookie" not in challenge
        assert all(32 <= ord(c) < 127 for c in challenge), why


def test_jwks_over_plain_http_only_on_loopback(tmp_path: Path) -> None:
    from dicomweb_server.auth import OidcAuth

    s = Settings(auth="oidc", oidc_issuer=ISSUER, oidc_audience=AUDIENCE,
                 oidc_jwks="http://idp.example.org/certs")  # fmt: skip
    with pytest.raises(ConfigError, match="https"):
        OidcAuth(s)
    OidcAuth(dataclasses.replace(s, oidc_jwks="http://127.0.0.1:9/certs"))


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
