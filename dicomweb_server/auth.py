"""Who is asking, and with which roles: API keys or OpenID Connect bearer JWTs.

Roles: `read` (QIDO-RS, WADO-RS), `write` (STOW-RS), `admin` (everything, key management).
Credentials travel as `Authorization: Bearer <token>` (RFC 6750); missing or bad ones are a 401
with a `WWW-Authenticate` challenge, a caller without the role a 403.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import jwt

from dicomweb_server.config import ConfigError, Settings
from dicomweb_server.errors import ForbiddenError, ServiceUnavailableError, UnauthorizedError
from dicomweb_server.index.database import Index
from dicomweb_server.index.rows import ApiKey

__all__ = [
    "API_KEY_PREFIX",
    "ROLES",
    "Authenticator",
    "Principal",
    "authenticator_for",
    "create_api_key",
    "describe",
    "is_key_id",
    "is_loopback",
    "require",
]

log = logging.getLogger(__name__)

ROLES = ("read", "write", "admin")
# API keys read `dwk_<key id>_<secret>`; the id finds the row, the secret is compared hashed.
API_KEY_PREFIX = "dwk_"
API_KEY_ID_BYTES = 6
API_KEY_SECRET_BYTES = 32
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
# Seconds a looked-up API key is trusted before it is read again: a key revoked by another
# process is refused within this time (by this process's own /admin at once). Saves a database
# round trip on most requests (about 1 ms, docs/benchmarks.md).
API_KEY_CACHE_S = 2.0
# Keys kept in that cache, at most.
API_KEY_CACHE_MAX = 1024
# Signature algorithms accepted on OIDC tokens: asymmetric only (a shared-secret HS256 token
# signed with a public key is the classic JWT confusion attack).
OIDC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA"]  # fmt: skip
# Clock skew tolerated on exp/nbf/iat, seconds.
OIDC_LEEWAY_S = 30
# Seconds a JWKS fetched from a URL is kept before it is fetched again.
JWKS_CACHE_S = 300
# Seconds to wait for the issuer's JWKS endpoint.
JWKS_TIMEOUT_S = 10
# Seconds after a failed JWKS fetch before the endpoint is tried again (meanwhile: the last good
# set, or 503 with a Retry-After of as many seconds).
JWKS_RETRY_S = 5
# Seconds after its last successful fetch that a JWKS is still used while the endpoint cannot
# be reached (an issuer outage must not lock out tokens already issued); past it, 503.
JWKS_STALE_MAX_S = 3600
# Claims that are NumericDates when present (RFC 7519 4.1.4-4.1.6).
_NUMERIC_DATES = ("exp", "nbf", "iat")
_REALM = 'Bearer realm="dicomweb"'


@dataclass(frozen=True)
class Principal:
    name: str  # as written to the audit trail
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles


def require(principal: Principal, role: str) -> None:
    """403 (RFC 6750 3.1 insufficient_scope) unless the caller holds the role."""
    if not principal.may(role):
        raise ForbiddenError(
            f"{principal.name} lacks the {role} role",
            headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{role}"'},
        )


def _challenge(why: str | None, detail: str = "") -> UnauthorizedError:
    """401 with an RFC 6750 challenge. `why` is one of our fixed phrases (it goes into the
    header); `detail`, which may echo what the caller sent, is only logged."""
    if why is None:
        return UnauthorizedError("credentials required", headers={"WWW-Authenticate": _REALM})
    if detail:
        log.info("refused credentials: %s (%r)", why, detail[:200])
    header = f'{_REALM}, error="invalid_token", error_description="{why}"'
    return UnauthorizedError(f"invalid credentials: {why}", headers={"WWW-Authenticate": header})


def bearer_token(authorization: str | None) -> str:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else a 401."""
    if not authorization:
        raise _challenge(None)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _challenge("the Authorization header must be 'Bearer <token>'")
    return token


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal: ...

    def forget(self, key_id: str) -> None:
        """Drop what is cached about an API key (it was just revoked)."""


class NoAuth:
    """`--auth none`: everyone is an anonymous administrator (served on loopback only)."""

    async def authenticate(self, authorization: str | None) -> Principal:
        return Principal("anonymous", frozenset({"admin"}))

    def forget(self, key_id: str) -> None:
        pass


def _digest(secret: str) -> bytes:
    # The secret has 256 random bits: one SHA-256 is enough (no password stretching needed).
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def is_key_id(text: str) -> bool:
    """The form of the key ids create_api_key makes (12 hex digits)."""
    return bool(_KEY_ID.match(text))


def is_loopback(host: str) -> bool:
    """`localhost`, or a loopback address (brackets allowed around IPv6)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_url(url: str) -> bool:
    return is_loopback(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0])


async def create_api_key(index: Index, role: str, name: str = "") -> tuple[str, str]:
    """(key id, token) of a new key; the token is shown once and only its hash is kept."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key_id = secrets.token_hex(API_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(API_KEY_SECRET_BYTES)
    await index.add_api_key(key_id, _digest(secret), role, name)
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secret}"


class ApiKeyAuth:
    def __init__(self, index: Index) -> None:
        self._index = index
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        # Bumped by forget(): a lookup that was in flight across a revocation is not cached.
        self._generation = 0

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)
        self._generation += 1

    async def _lookup(self, key_id: str) -> ApiKey | None:
        if not is_key_id(key_id):
            return None
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and now - hit[0] < API_KEY_CACHE_S:
            return hit[1]
        generation = self._generation
        key = await self._index.api_key(key_id)
        if key is not None and generation == self._generation:
            if len(self._cache) >= API_KEY_CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache.pop(key_id, None)
            self._cache[key_id] = (now, key)
        return key

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        key_id, _, secret = token.removeprefix(API_KEY_PREFIX).partition("_")
        key = await self._lookup(key_id) if token.startswith(API_KEY_PREFIX) else None
        expected = key.secret_sha256 if key is not None else bytes(32)
        # Constant time whatever the key: an unknown id costs the same comparison.
        if not hmac.compare_digest(_digest(secret), expected) or key is None:
            raise _challenge("unknown API key")
        if key.revoked_at is not None:
            raise _challenge("revoked API key")
        return Principal(f"apikey:{key.key_id}", frozenset({key.role}))


class _LastGoodJWKClient(jwt.PyJWKClient):
    """A PyJWKClient that, when a refresh fails (the endpoint unreachable or reset, or its
    answer not a key set), goes on with the key set of its last successful fetch for up to
    JWKS_STALE_MAX_S after that fetch, trying again each time its cached copy expires. A key
    the issuer removed meanwhile stays usable that long at most; a token signed by a key not
    in that set is refused as before. With no such set, or an older one, the failure is a
    PyJWKClientConnectionError (503). Runs under the client's lock (get_signing_key)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_good: tuple[float, Any] | None = None
        self._stale = False  # the cached set is the last good one, kept over a failure
        self._failed_at: float | None = None  # the last failed fetch, if none succeeded since

    def _age(self) -> float:
        assert self._last_good is not None
        return time.monotonic() - self._last_good[0]

    def get_jwk_set(self, refresh: bool = False) -> jwt.PyJWKSet:
        if self._stale and self._age() > JWKS_STALE_MAX_S:
            refresh = True  # the stale copy's cache lifetime must not carry it past the limit
        return super().get_jwk_set(refresh)

    def get_signing_key(self, kid: str) -> jwt.PyJWK:
        try:
            return super().get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise
        except jwt.PyJWKClientError as exc:
            if self._stale:  # maybe a new key, which the failing endpoint could not give
                raise jwt.PyJWKClientConnectionError(f"{exc}; the JWKS endpoint fails") from exc
            raise

    def fetch_data(self) -> Any:
        if self._failed_at is not None and time.monotonic() - self._failed_at < JWKS_RETRY_S:
            # Not again so soon: requests would queue under the client's lock, each waiting
            # up to JWKS_TIMEOUT_S for an endpoint that just failed.
            return self._instead(jwt.PyJWKClientConnectionError("it failed moments ago"))
        try:
            data = super().fetch_data()
        except (
            jwt.PyJWKClientError, jwt.PyJWKSetError, OSError, ValueError, RecursionError
        ) as exc:  # fmt: skip
            self._failed_at = time.monotonic()
            return self._instead(exc)
        self._last_good, self._stale, self._failed_at = (time.monotonic(), data), False, None
        return data

    def _instead(self, exc: Exception) -> Any:
        """What a failed fetch gives: the last good set while it is young enough, else 503."""
        if self._last_good is None or self._age() > JWKS_STALE_MAX_S:
            raise jwt.PyJWKClientConnectionError(f"the JWKS endpoint failed: {exc}") from exc
        self._stale = True
        log.warning("the issuer's JWKS endpoint failed (%s): using the key set fetched"
                    " %.0f s ago", exc, self._age())  # fmt: skip
        return self._last_good[1]


class OidcAuth:
    """Bearer JWTs of an OpenID Connect issuer, checked against its JWKS with PyJWT: signature,
    `iss`, `aud`, `exp` (required), `nbf` and `iat` when present."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_jwks and settings.oidc_issuer and settings.oidc_audience
        self._issuer = settings.oidc_issuer
        self._audience = settings.oidc_audience
        self._claim = settings.oidc_roles_claim
        self._prefix = settings.oidc_role_prefix
        source = settings.oidc_jwks
        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if source.startswith("http://") and not _loopback_url(source):
            raise ConfigError("the JWKS URL must be https:// (http:// only on this machine)")
        if source.startswith(("https://", "http://")):
            self._client = _LastGoodJWKClient(
                source, cache_jwk_set=True, lifespan=JWKS_CACHE_S, timeout=JWKS_TIMEOUT_S
            )
        else:
            self._keys = jwt.PyJWKSet.from_json(Path(source).read_text())

    async def _key(self, token: str) -> jwt.PyJWK:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise _challenge("malformed token", str(exc)) from None
        if self._client is not None:
            try:
                return await anyio.to_thread.run_sync(self._client.get_signing_key_from_jwt, token)
            except jwt.PyJWKClientConnectionError as exc:
                # The reason names the issuer's endpoint and what failed inside the network:
                # logged here, not told to whoever sent the token.
                log.warning("the issuer's JWKS is unreachable: %s", exc)
                raise ServiceUnavailableError(
                    "the issuer's JWKS is unreachable; try again later",
                    headers={"Retry-After": str(JWKS_RETRY_S)},
                ) from None
            except (jwt.PyJWTError, TypeError, ValueError) as exc:
                raise _challenge("no signing key for this token", str(exc)) from None
        assert self._keys is not None
        keys = self._keys.keys
        for key in keys:
            if key.key_id == kid or (kid is None and len(keys) == 1):
                return key
        raise _challenge("no signing key for this token", str(kid))

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        key = await self._key(token)
        algorithms = _algorithms_for(key)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key.key, algorithms=algorithms, audience=self._audience,
                issuer=self._issuer, leeway=OIDC_LEEWAY_S,
                options={"require": ["exp", "iss", "aud"]},
            )  # fmt: skip
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise _challenge("invalid token", str(exc)) from None
        for name in _NUMERIC_DATES:
            # RFC 7519 4.1.4-4.1.6: a NumericDate is a JSON number; PyJWT takes int() of a
            # string, so `"exp": "99999999999"` would pass as a date far in the future.
            value = claims.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _challenge("invalid token", f"the {name} claim is not a NumericDate")
        subject = str(claims.get("sub") or claims.get("client_id") or claims.get("azp") or "?")
        return Principal(f"oidc:{subject}", _roles(claims, self._claim, self._prefix))

    def forget(self, key_id: str) -> None:
        pass


def _algorithms_for(key: jwt.PyJWK) -> list[str]:
    """The algorithms a token verified with this key may name: the key's own `alg` when the
    JWK declares one, else every algorithm of its type (RSA: RS*/PS*; EC: the ES* of its curve;
    OKP: EdDSA). A token naming another is refused before verification: no algorithm
    confusion, and no key-type errors inside PyJWT."""
    if key.key_type == "RSA" and key.algorithm_name == "RS256":  # "RS256" may be a default
        return [a for a in OIDC_ALGORITHMS if a[:2] in ("RS", "PS")]
    return [a for a in OIDC_ALGORITHMS if a == key.algorithm_name]


def _roles(claims: Mapping[str, Any], claim: str, prefix: str) -> frozenset[str]:
    """Roles named in a claim (dotted path): a space-separated string (OAuth `scope`) or a list
    (`roles`, `groups`), each value our role name after `prefix`."""
    value: Any = claims
    for part in claim.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    names = {item[len(prefix):] for item in items if isinstance(item, str)
             and item.startswith(prefix)}  # fmt: skip
    return frozenset(names & set(ROLES))


def authenticator_for(settings: Settings, index: Index) -> Authenticator:
    if settings.auth == "apikey":
        return ApiKeyAuth(index)
    if settings.auth == "oidc":
        return OidcAuth(settings)
    return NoAuth()


def describe(settings: Settings) -> str:
    """One line for the log: how callers are authenticated."""
    if settings.auth == "oidc":
        return f"OIDC bearer tokens of {settings.oidc_issuer} for {settings.oidc_audience}"
    return {"apikey": "API keys", "none": "none (loopback only)"}[settings.auth]
