"""Settings: the only reader of the process environment."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from dicomweb_server.errors import DicomWebError

__all__ = [
    "AUTH_MODES",
    "BODY_IDLE_TIMEOUT_S",
    "DEFAULT_AE_TITLE",
    "DEFAULT_DATA_DIR",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DICOMWEB_ROOT",
    "DIMSE_MAX_ASSOCIATIONS",
    "DIMSE_MAX_ASSOCIATIONS_PER_PEER",
    "DIMSE_PDU_DEADLINE_S",
    "FORWARDED_PREFIX_SCOPE_KEY",
    "FRAME_CACHE_BYTES",
    "IMAGE_CACHE_BYTES",
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_MAX_MOST",
    "MAX_PART_BYTES",
    "MAX_PORT",
    "MAX_REQUEST_BYTES",
    "METADATA_CACHE_BYTES",
    "SEND_STALL_TIMEOUT_S",
    "VERSION",
    "ConfigError",
    "Settings",
    "StartupError",
    "ae_title_list",
    "check_ae_title",
]

# The server's version (also `dicomweb_server.__version__`).
VERSION = "0.1.0"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# The largest TCP port number.
MAX_PORT = 65535
DEFAULT_DATA_DIR = Path("data")
# The DICOMweb root (PS3.18 8.2: the "base URI" of the origin server's services).
DICOMWEB_ROOT = "/dicom-web"
# The scope key under which proxy.ProxyHeaders leaves a trusted proxy's X-Forwarded-Prefix (the
# path the proxy serves the archive under), read by routes.common.base_url.
FORWARDED_PREFIX_SCOPE_KEY = "dicomweb.forwarded_prefix"
# Largest single instance (one part of a STOW request), in bytes. Above it: 413.
MAX_PART_BYTES = 4 * 1024**3
# Largest STOW request body, in bytes. Above it: 413.
MAX_REQUEST_BYTES = 64 * 1024**3
# Seconds of waiting for a request body (the time the server waits for it, not the time it
# spends on what came) in which the body must bring at least app.BODY_MIN_BYTES_PER_S times
# as many bytes: a body that stops, or trickles slower, is answered 408 with `Connection:
# close` (app._RequestBody). Slow bodies that keep coming are never cut, however long they
# take. hypercorn's own read_timeout cannot do this: it also ends downloads, during which the
# client sends nothing.
BODY_IDLE_TIMEOUT_S = 60.0
# Seconds the kernel keeps trying to send response bytes that the client does not take (its
# receive window stays shut, or nothing is acknowledged) before it drops the connection
# (TCP_USER_TIMEOUT, RFC 5482, set on the listening sockets by `serve`). A client that stops
# reading a download would otherwise hold its request, its open file and its buffers
# forever. nginx's send_timeout is the same 60 s; a download that keeps being read is never
# cut, however slow.
SEND_STALL_TIMEOUT_S = 60.0
# Memory for cached rendered images and thumbnails, bytes.
IMAGE_CACHE_BYTES = 64 * 1024**2
# Memory for cached decoded or re-encoded frames, bytes.
FRAME_CACHE_BYTES = 64 * 1024**2
# Memory for cached series metadata (DICOM JSON) and its gzip-compressed responses, bytes.
METADATA_CACHE_BYTES = 32 * 1024**2
# asyncpg pool size.
DEFAULT_POOL_SIZE = 10
# glibc malloc arenas a serving process may use (mallopt M_ARENA_MAX, set at startup by
# blobstore.reading.tune_allocator, before the server's threads start). Unlimited, glibc gives
# each new thread that allocates an arena of its own, up to 8 per core, and the reader and
# worker threads did: the freed chunks of one arena are no use to the others, so peak memory
# grew with the number of arenas (9-15 after 100 parallel downloads) and varied from run to
# run. With 2, 100 parallel downloads of a 42 MB instance peaked at 292 MB against 324 MB
# (medians of 10 interleaved runs each, every limited run below every unlimited one), at the
# same download, STOW and frame-decode speed and CPU time (docs/benchmarks.md, "Malloc arenas",
# 2026-12-05). MALLOC_ARENA_MAX in the environment (glibc's own variable) overrides it; 0
# leaves glibc's default.
MALLOC_ARENA_MAX = 2
# The largest MALLOC_ARENA_MAX taken: mallopt's value is a C int, and ctypes passes only the
# low 32 bits of a larger Python int. Found by review: MALLOC_ARENA_MAX=4294967298, which glibc
# itself reads as a limit beyond any thread count, reached mallopt as 2.
MALLOC_ARENA_MAX_MOST = 2**31 - 1
# The viewer `make viewer` starts.
DEFAULT_VIEWER_URL = "http://127.0.0.1:3000"
# Seconds browsers may cache a CORS preflight answer (Access-Control-Max-Age).
CORS_MAX_AGE_S = 86400
# Origins allowed when DICOMWEB_CORS_ORIGINS is unset: any port on this machine.
LOCAL_ORIGINS_REGEX = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
# Seconds a single database statement may run before the request fails with 503.
DEFAULT_QUERY_TIMEOUT_S = 30.0
# The DIMSE Application Entity title when none is configured (PS3.8 9.3.2: 1 to 16 characters
# of the default character repertoire, no backslash, not all spaces).
DEFAULT_AE_TITLE = "DICOMWEB"
# Simultaneous DIMSE associations accepted; one more is rejected (A-ASSOCIATE-RJ, transient,
# local limit exceeded; PS3.8 Table 9-21). An association counts once its A-ASSOCIATE-RQ has
# arrived whole and been let in, not while its connection is still sending it (dimse/admission.py).
DIMSE_MAX_ASSOCIATIONS = 10
# Of those, held at once by the peers of one IP address; one more from it is rejected the same
# way. A modality holds one to three (images, MPPS, a query), a PACS or router sending in
# parallel a few (Orthanc runs 2 jobs at once by default): 4 serves them, and leaves most of the
# default 10 to the others when one peer misbehaves. Raise it for a router, or for modalities
# behind one NAT address, which share it.
DIMSE_MAX_ASSOCIATIONS_PER_PEER = 4
# Seconds within which a PDU must arrive whole once its first byte has: a later one aborts the
# association (A-ABORT). pynetdicom's 60 s network timeout bounds each read, so a peer sending a
# byte every 20 s held its association, and its slot, for as long as it liked. 60 s passes a
# PDU of the archive's Maximum Length (16382 bytes, PS3.8 D.1) at 273 bytes a second (STOW-RS
# asks 512, app.BODY_MIN_BYTES_PER_S), and one of DIMSE_MAX_PDU_BYTES (4 MiB, from a peer that
# ignores that length) at 70 KB a second.
DIMSE_PDU_DEADLINE_S = 60.0
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


# `--auth` values: no authentication (loopback only), API keys, OpenID Connect bearer JWTs.
AUTH_MODES = ("none", "apikey", "oidc")
# The OIDC claim that carries roles, and the prefix that marks ours ("scope": "dicomweb.read").
DEFAULT_OIDC_ROLES_CLAIM = "scope"
DEFAULT_OIDC_ROLE_PREFIX = "dicomweb."


class ConfigError(DicomWebError):
    """An environment variable holds a value we cannot use."""


class StartupError(Exception):
    """The settings are valid but cannot work on this machine now: the port is taken, the data
    directory is not writable, the database does not answer. The message names the cause and
    the way out; the command line prints it alone and exits with status 1."""


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = DEFAULT_DATA_DIR
    # None: start an embedded PostgreSQL with its cluster under data_dir/postgres.
    database_url: str | None = None
    max_part_bytes: int = MAX_PART_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S
    send_stall_timeout_s: float = SEND_STALL_TIMEOUT_S
    # Public URL of the DICOMweb root (e.g. behind a reverse proxy); None: from the request.
    public_url: str | None = None
    # Origins allowed by CORS: a comma list, or "*"; None: any http(s) origin on localhost or
    # 127.0.0.1, whatever the port (a viewer served next to the archive works out of the box).
    cors_origins: tuple[str, ...] | None = None
    # Where the landing page sends people for a viewer (`make viewer` serves OHIF there).
    viewer_url: str = DEFAULT_VIEWER_URL
    pool_size: int = DEFAULT_POOL_SIZE
    # glibc malloc arenas per serving process (0: glibc's default, up to 8 per core).
    malloc_arena_max: int = MALLOC_ARENA_MAX
    # Server processes sharing the database and the blob store (`serve --workers N`).
    workers: int = 1
    image_cache_bytes: int = IMAGE_CACHE_BYTES
    frame_cache_bytes: int = FRAME_CACHE_BYTES
    metadata_cache_bytes: int = METADATA_CACHE_BYTES
    query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S
    # Authentication (AUTH_MODES); "none" serves only loopback addresses unless `insecure`.
    auth: str = "none"
    insecure: bool = False
    # OIDC: the issuer and audience tokens must carry, the JWKS (an https URL or a file), and
    # where roles are read from (a claim, dotted for nested ones: "realm_access.roles").
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks: str | None = None
    oidc_roles_claim: str = DEFAULT_OIDC_ROLES_CLAIM
    oidc_role_prefix: str = DEFAULT_OIDC_ROLE_PREFIX
    # TLS: PEM certificate chain and private key served by hypercorn; None: plain HTTP.
    certfile: Path | None = None
    keyfile: Path | None = None
    # The audit trail (on by default; off only for measurements).
    audit: bool = True
    # Reverse proxies (addresses or CIDR blocks) whose Forwarded / X-Forwarded-* headers are
    # believed: the client address, scheme and host of requests that come through them.
    trusted_proxies: tuple[str, ...] = ()
    # Which headers the trusted proxies write: "x-forwarded" (X-Forwarded-For/-Proto/-Host/
    # -Port, nginx's and most proxies' way) or "forwarded" (RFC 7239). The other family is
    # ignored: a proxy passes through what a client sent in the headers it does not write.
    proxy_headers: str = "x-forwarded"
    # Host names (besides localhost ones and the public URL's) that `--auth none` answers.
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if self.auth == "oidc":
            missing = [n for n, v in (("DICOMWEB_OIDC_ISSUER", self.oidc_issuer),
                                      ("DICOMWEB_OIDC_AUDIENCE", self.oidc_audience),
                                      ("DICOMWEB_OIDC_JWKS", self.oidc_jwks)) if not v]  # fmt: skip
            if missing:
                raise ConfigError(f"auth oidc needs {', '.join(missing)}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError("TLS needs both a certificate file and a key file")
        if self.proxy_headers not in ("x-forwarded", "forwarded"):
            raise ConfigError(
                f"proxy headers must be x-forwarded or forwarded, got {self.proxy_headers!r}"
            )
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    f"trusted proxy {entry!r} is not an address or a CIDR block"
                ) from None

    @property
    def scheme(self) -> str:
        return "http" if self.certfile is None else "https"

    # DIMSE front door (`serve --dimse-port`): None = off.
    dimse_port: int | None = None
    ae_title: str = DEFAULT_AE_TITLE
    # JSON file of C-MOVE destinations: {"AE_TITLE": {"host": "...", "port": 104}, ...}.
    dimse_peers: Path | None = None
    # Calling AE titles accepted; None = any.
    dimse_allowed_aes: tuple[str, ...] | None = None
    dimse_max_associations: int = DIMSE_MAX_ASSOCIATIONS
    dimse_max_associations_per_peer: int = DIMSE_MAX_ASSOCIATIONS_PER_PEER
    dimse_pdu_deadline_s: float = DIMSE_PDU_DEADLINE_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        s = cls()
        if "DICOMWEB_HOST" in env:
            s = replace(s, host=env["DICOMWEB_HOST"])
        if "DICOMWEB_PORT" in env:
            s = replace(s, port=_int(env, "DICOMWEB_PORT"))
        if env.get("DICOMWEB_DATA_DIR"):
            s = replace(s, data_dir=Path(env["DICOMWEB_DATA_DIR"]))
        if env.get("DATABASE_URL"):
            s = replace(s, database_url=env["DATABASE_URL"])
        if env.get("DICOMWEB_CORS_ORIGINS"):
            origins = tuple(o.strip() for o in env["DICOMWEB_CORS_ORIGINS"].split(",") if o.strip())
            s = replace(s, cors_origins=origins)
        if env.get("DICOMWEB_VIEWER_URL"):
            s = replace(s, viewer_url=env["DICOMWEB_VIEWER_URL"])
        if env.get("DICOMWEB_PUBLIC_URL"):
            s = replace(s, public_url=env["DICOMWEB_PUBLIC_URL"])
        if "DICOMWEB_WORKERS" in env:
            s = replace(s, workers=_int(env, "DICOMWEB_WORKERS"))
        if env.get("MALLOC_ARENA_MAX"):
            s = replace(s, malloc_arena_max=_int(env, "MALLOC_ARENA_MAX"))
        if "DICOMWEB_MAX_PART_BYTES" in env:
            s = replace(s, max_part_bytes=_int(env, "DICOMWEB_MAX_PART_BYTES"))
        if "DICOMWEB_MAX_REQUEST_BYTES" in env:
            s = replace(s, max_request_bytes=_int(env, "DICOMWEB_MAX_REQUEST_BYTES"))
        if "DICOMWEB_BODY_IDLE_TIMEOUT_S" in env:
            s = replace(s, body_idle_timeout_s=_seconds(env, "DICOMWEB_BODY_IDLE_TIMEOUT_S"))
        if "DICOMWEB_SEND_STALL_TIMEOUT_S" in env:
            s = replace(s, send_stall_timeout_s=_seconds(env, "DICOMWEB_SEND_STALL_TIMEOUT_S"))
        return _security_from_env(s, env)._dimse_from_env(env)

    def _dimse_from_env(self, env: Mapping[str, str]) -> Settings:
        s = self
        if env.get("DICOMWEB_DIMSE_PORT"):
            s = replace(s, dimse_port=_int(env, "DICOMWEB_DIMSE_PORT"))
        if env.get("DICOMWEB_AE_TITLE"):
            s = replace(s, ae_title=env["DICOMWEB_AE_TITLE"])
        if env.get("DICOMWEB_DIMSE_PEERS"):
            s = replace(s, dimse_peers=Path(env["DICOMWEB_DIMSE_PEERS"]))
        if env.get("DICOMWEB_DIMSE_ALLOWED_AES"):
            s = replace(s, dimse_allowed_aes=ae_title_list(env["DICOMWEB_DIMSE_ALLOWED_AES"]))
        if "DICOMWEB_DIMSE_MAX_ASSOCIATIONS" in env:
            n = _int(env, "DICOMWEB_DIMSE_MAX_ASSOCIATIONS")
            s = replace(s, dimse_max_associations=n)
        if "DICOMWEB_DIMSE_MAX_ASSOCIATIONS_PER_PEER" in env:
            n = _int(env, "DICOMWEB_DIMSE_MAX_ASSOCIATIONS_PER_PEER")
            s = replace(s, dimse_max_associations_per_peer=n)
        if "DICOMWEB_DIMSE_PDU_DEADLINE_S" in env:
            s = replace(s, dimse_pdu_deadline_s=_seconds(env, "DICOMWEB_DIMSE_PDU_DEADLINE_S"))
        return s.checked()

    def checked(self) -> Settings:
        """These settings, or ConfigError naming the first value that cannot work."""
        check_ae_title(self.ae_title)
        if not 1 <= self.port <= MAX_PORT:
            raise ConfigError(f"the port must be 1 to {MAX_PORT}, got {self.port}")
        if self.workers < 1:
            raise ConfigError(f"the number of workers must be at least 1, got {self.workers}")
        if not 0 <= self.malloc_arena_max <= MALLOC_ARENA_MAX_MOST:
            most, got = MALLOC_ARENA_MAX_MOST, self.malloc_arena_max
            raise ConfigError(f"MALLOC_ARENA_MAX must be 0 to {most}, got {got}")
        for title in self.dimse_allowed_aes or ():
            check_ae_title(title)
        if self.dimse_port is not None and not 0 <= self.dimse_port <= MAX_PORT:
            raise ConfigError(f"the DIMSE port must be 0 to {MAX_PORT}, got {self.dimse_port}")
        if self.dimse_max_associations < 1:
            raise ConfigError("the DIMSE association limit must be at least 1")
        if self.dimse_max_associations_per_peer < 1:
            raise ConfigError("the DIMSE association limit per peer must be at least 1")
        if not 0 < self.dimse_pdu_deadline_s < math.inf:
            raise ConfigError(
                f"the DIMSE PDU deadline must be a positive number of seconds,"
                f" got {self.dimse_pdu_deadline_s}"
            )
        return self

    def export(self) -> None:
        """Put these settings into this process's environment, where the worker processes
        `serve --workers N` spawns read them back with `from_env` (hypercorn's spawn model)."""
        values = {
            "DICOMWEB_HOST": self.host,
            "DICOMWEB_PORT": str(self.port),
            "DICOMWEB_DATA_DIR": str(self.data_dir.resolve()),
            "DATABASE_URL": self.database_url or "",
            "DICOMWEB_PUBLIC_URL": self.public_url or "",
            "DICOMWEB_CORS_ORIGINS": ",".join(self.cors_origins or ()),
            "DICOMWEB_VIEWER_URL": self.viewer_url,
            "DICOMWEB_MAX_PART_BYTES": str(self.max_part_bytes),
            "DICOMWEB_MAX_REQUEST_BYTES": str(self.max_request_bytes),
            "DICOMWEB_BODY_IDLE_TIMEOUT_S": str(self.body_idle_timeout_s),
            "DICOMWEB_SEND_STALL_TIMEOUT_S": str(self.send_stall_timeout_s),
            "DICOMWEB_AUTH": self.auth,
            "DICOMWEB_INSECURE": "1" if self.insecure else "",
            "DICOMWEB_OIDC_ISSUER": self.oidc_issuer or "",
            "DICOMWEB_OIDC_AUDIENCE": self.oidc_audience or "",
            "DICOMWEB_OIDC_JWKS": self.oidc_jwks or "",
            "DICOMWEB_OIDC_ROLES_CLAIM": self.oidc_roles_claim,
            "DICOMWEB_OIDC_ROLE_PREFIX": self.oidc_role_prefix,
            "DICOMWEB_CERTFILE": str(self.certfile.resolve()) if self.certfile else "",
            "DICOMWEB_KEYFILE": str(self.keyfile.resolve()) if self.keyfile else "",
            "DICOMWEB_AUDIT": "1" if self.audit else "0",
            "DICOMWEB_TRUSTED_PROXIES": ",".join(self.trusted_proxies),
            "DICOMWEB_PROXY_HEADERS": self.proxy_headers,
            "DICOMWEB_ALLOWED_HOSTS": ",".join(self.allowed_hosts),
            # glibc reads it as a worker starts, before any of its threads.
            "MALLOC_ARENA_MAX": str(self.malloc_arena_max),
        }
        os.environ.update(values)

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "postgres"


def _security_from_env(s: Settings, env: Mapping[str, str]) -> Settings:
    """Authentication, TLS and audit settings (DICOMWEB_AUTH, DICOMWEB_OIDC_*, …)."""
    texts = {
        "auth": "DICOMWEB_AUTH",
        "oidc_issuer": "DICOMWEB_OIDC_ISSUER",
        "oidc_audience": "DICOMWEB_OIDC_AUDIENCE",
        "oidc_jwks": "DICOMWEB_OIDC_JWKS",
        "oidc_roles_claim": "DICOMWEB_OIDC_ROLES_CLAIM",
    }
    values: dict[str, object] = {k: env[n] for k, n in texts.items() if env.get(n)}
    if "DICOMWEB_OIDC_ROLE_PREFIX" in env:  # may be empty: roles named plainly
        values["oidc_role_prefix"] = env["DICOMWEB_OIDC_ROLE_PREFIX"]
    for key, name in (("certfile", "DICOMWEB_CERTFILE"), ("keyfile", "DICOMWEB_KEYFILE")):
        if env.get(name):
            values[key] = Path(env[name])
    if env.get("DICOMWEB_INSECURE"):
        values["insecure"] = _bool(env, "DICOMWEB_INSECURE")
    if env.get("DICOMWEB_AUDIT"):
        values["audit"] = _bool(env, "DICOMWEB_AUDIT")
    if env.get("DICOMWEB_TRUSTED_PROXIES"):
        values["trusted_proxies"] = _list(env["DICOMWEB_TRUSTED_PROXIES"])
    if env.get("DICOMWEB_PROXY_HEADERS"):
        values["proxy_headers"] = env["DICOMWEB_PROXY_HEADERS"].strip().lower()
    if env.get("DICOMWEB_ALLOWED_HOSTS"):
        values["allowed_hosts"] = tuple(h.lower() for h in _list(env["DICOMWEB_ALLOWED_HOSTS"]))
    return replace(s, **values)  # type: ignore[arg-type]


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _bool(env: Mapping[str, str], name: str) -> bool:
    value = env[name].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {env[name]!r}")


def check_ae_title(title: str) -> str:
    """`title`, or ConfigError when it is not a valid AE title (PS3.5 Table 6.2-1, AE)."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise ConfigError(f"{title!r} is not an AE title (1 to 16 characters, no backslash)")
    return title


def ae_title_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of AE titles (spaces around each are not part of it)."""
    return tuple(check_ae_title(t.strip()) for t in text.split(",") if t.strip())


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None


def _seconds(env: Mapping[str, str], name: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(env[name])
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a positive number of seconds, got {env[name]!r}")
    return value
