"""Authentication by OIDC bearer JWTs (issue 7): tokens checked (signature, algorithm,
issuer, audience, times), roles read from claims, and the issuer's key set (JWKS) fetched,
cached and kept through the issuer's failures. API keys and roles: test_auth.py."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import threading
import time
import types
from collections.abc import AsyncIterator
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

from dicomweb_server import auth
from dicomweb_server.auth import _roles
from dicomweb_server.config import ConfigError, Settings
from tests.auth_support import _client
from tests.helpers import ROOT

pytestmark = pytest.mark.db

ISSUER = "https://idp.example.org/realms/radiology"
AUDIENCE = "dicomweb"


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
