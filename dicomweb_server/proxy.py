"""Requests that came through a trusted reverse proxy (field notes 13): the client's address,
the scheme and the host it asked for, from `Forwarded` (RFC 7239) or `X-Forwarded-For/-Proto/
-Host/-Port/-Prefix`. Only when the direct peer is in DICOMWEB_TRUSTED_PROXIES; from anyone else
these headers are ignored, since a client could claim any address with them. Only the family of
headers the proxies write is read (DICOMWEB_PROXY_HEADERS): a proxy that writes X-Forwarded-*
passes a client's own `Forwarded` header through, and the other way round.

Pure ASGI: the scope is rewritten before anything else sees it, so that emitted URLs
(RetrieveURL, BulkDataURI) and the audit trail's client address are the real ones.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from dicomweb_server.config import FORWARDED_PREFIX_SCOPE_KEY

__all__ = ["ProxyHeaders", "parse_networks"]

# An absolute path of RFC 3986 segments (pchar), no query or fragment: what a prefix may be.
_PATH_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks; ValueError names a bad one."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted proxy {entry!r} is not an address or a CIDR block") from None
    return tuple(out)


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d.
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


def _forwarded(value: str) -> list[dict[str, str]]:
    """RFC 7239 elements, in order: `for=1.2.3.4;proto=https, for="[::1]"`."""
    elements = []
    for element in value.split(","):
        pairs = {}
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            if key.strip():
                pairs[key.strip().lower()] = val.strip().strip('"')
        if pairs:
            elements.append(pairs)
    return elements


class ProxyHeaders:
    def __init__(
        self, app: ASGIApp, networks: Sequence[Network], family: str = "x-forwarded"
    ) -> None:
        self.app = app
        self.networks = tuple(networks)
        self.family = family  # the headers our proxies write; the other family is ignored

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if (
            scope["type"] == "http"
            and self.networks
            and client
            and _trusted(client[0], self.networks)
        ):
            scope = self._rewrite(scope)
        await self.app(scope, receive, send)

    def _rewrite(self, scope: Scope) -> Scope:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        hops: list[str]
        if self.family == "forwarded":
            elements = _forwarded(headers.get("forwarded", ""))
            hops = [e["for"] for e in elements if e.get("for")]
            nearest = elements[-1] if elements else {}
            proto, host, port, prefix = nearest.get("proto"), nearest.get("host"), None, None
        else:
            hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
            proto = _last(headers.get("x-forwarded-proto"))
            host = _last(headers.get("x-forwarded-host"))
            port = _last(headers.get("x-forwarded-port"))
            prefix = _last(headers.get("x-forwarded-prefix"))
        scope = dict(scope)
        if prefix and _PATH_PREFIX.fullmatch(prefix):
            # The path the proxy serves us under (`location /pacs/` -> `X-Forwarded-Prefix:
            # /pacs`): emitted URLs carry it. RFC 7239 has no such parameter.
            scope[FORWARDED_PREFIX_SCOPE_KEY] = prefix.rstrip("/")
        # The client is the nearest hop that is not one of our proxies (X-Forwarded-For is
        # appended to by each proxy; anything left of an untrusted hop could be made up).
        for i in range(len(hops) - 1, -1, -1):
            address = _host_of(hops[i])
            if i == 0 or not _trusted(address, self.networks):
                scope["client"] = (address, 0)
                break
        if proto in _DEFAULT_PORTS:
            scope["scheme"] = proto
        if host:
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"]
            scope["headers"].append((b"host", host.encode("latin-1")))
        if proto or host or port:
            # The port the client reached: named, else in the host, else the scheme's own.
            name, host_port = _split_host(host) if host else (None, None)
            port = port or host_port
            server = scope.get("server") or ("", 0)
            scope["server"] = (name or server[0], _port(port) or _DEFAULT_PORTS[scope["scheme"]])
        return scope


def _split_host(host: str) -> tuple[str, str | None]:
    """`example.org:8443` -> (example.org, 8443); `[::1]:80` -> ([::1], 80)."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest.removeprefix(":") or None
    name, _, port = host.partition(":")
    return name, port or None


def _port(text: str | None) -> int | None:
    """A TCP port, or None for anything else ("²" is a digit to str.isdigit, not to int)."""
    if text and text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def _last(value: str | None) -> str | None:
    """The value the nearest proxy set (the last of a comma list)."""
    if not value:
        return None
    return value.split(",")[-1].strip() or None


def _host_of(hop: str) -> str:
    """`1.2.3.4:5678` / `[::1]:80` / `::1` -> the address alone."""
    hop = hop.strip()
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop
