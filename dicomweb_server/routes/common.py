"""Request helpers shared by the handlers: services, base URL, Accept, UID parameters,
list-valued request fields; and the responses that carry no body of data sets: an error as
JSON, the routers' 404, the Warning header. Response bodies are in routes.responses."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from dicomweb_server.config import DICOMWEB_ROOT, FORWARDED_PREFIX_SCOPE_KEY
from dicomweb_server.errors import BadRequestError, DicomWebError, NotFoundError
from dicomweb_server.ingest import Services
from dicomweb_server.media.mediatypes import accept_then, check_charset

__all__ = [
    "accept_of",
    "base_url",
    "error_response",
    "not_found",
    "request_field",
    "services",
    "uid_param",
    "warning_header",
]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Longest Warning header sent, bytes. All response headers must fit a reverse proxy's buffer
# (nginx proxy_buffer_size is 4 KiB by default on most platforms; past it the client gets a
# 502 "upstream sent too big header") and clients' limits (httpx fails with "Receive buffer
# too long"). Warnings past it are summed up as one "... and N more".
WARNING_HEADER_MAX_BYTES = 2048
_WARN_AGENT = "dicomweb-server"


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


_DEFAULT_PORTS = {"http": 80, "https": 443}


# A Host header value (RFC 3986 3.2.2-3.2.3): a registered name or IPv4 address of the
# characters names use (no sub-delimiters: hosts do not have them), or an IPv6 literal; then
# an optional port.
_URI_HOST = re.compile(r"(?:[A-Za-z0-9._~%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")


def base_url(request: Request) -> str:
    """The public URL of the DICOMweb root, used in RetrieveURL and BulkDataURI values.

    The configured public URL wins (a reverse proxy in front). Otherwise the Host header, with
    the port the request actually reached when Host has none: dicomweb-client 0.61 sends
    `Host: <hostname>` without the port, which would make every URI we emit point at port 80.
    """
    public = request.app.state.settings.public_url
    if public:
        return str(public).rstrip("/")
    scheme = request.url.scheme
    host = request.headers.get("host", "")
    if host and not _URI_HOST.fullmatch(host):
        # RFC 9110 7.2: Host is uri-host [ ":" port ]. Anything else would be copied into
        # the URIs the body holds (a quote in Host made the metadata's JSON say what the
        # client wanted: found by review), and with a trusted proxy X-Forwarded-Host too.
        raise BadRequestError(f"the Host header {host[:100]!r} is not a host and port")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1]:
        port = int(server[1])
        if port != _DEFAULT_PORTS.get(scheme):
            host = f"{host}:{port}"
    prefix = str(request.scope.get(FORWARDED_PREFIX_SCOPE_KEY, ""))  # X-Forwarded-Prefix
    if not host:
        return str(request.base_url).rstrip("/") + prefix + DICOMWEB_ROOT
    return f"{scheme}://{host}{prefix}{DICOMWEB_ROOT}"


def error_response(exc: DicomWebError) -> Response:
    """A DicomWebError as JSON with its status and headers."""
    body = {"status": exc.status, "message": exc.message}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The default of the app's routers (app.py, routes/__init__.py): a path matching no
    route is a 404 in JSON like every other error, raised for the app's exception handler.
    Found by review: it was Starlette's plain-text "Not Found". With their redirect_slashes
    off, a route's path with a trailing slash is one too, not a 307 to the path without it
    (whose Location was built from the client's Host): DICOMweb clients never add one."""
    if scope["type"] != "http":  # no websocket route; a lifespan never comes here
        await Router().not_found(scope, receive, send)
        return
    raise NotFoundError(f"no resource at {scope['path']}")


def accept_of(request: Request) -> str | None:
    """What a request accepts: the media types of the `accept` query parameter (PS3.18
    8.3.3.1), then, when none of those is supported, the Accept header's (8.7.8.1). The
    `charset` query parameter is checked on the way (8.3.3.2: 400 unless UTF-8 is allowed).
    Each is a list (1#): given more than once, one list in order, as RFC 9110 5.3 combines a
    list header field's lines (read as the last, `accept=a/b&accept=c/d` dropped a/b)."""
    q = request.query_params
    charset, accept = (",".join(q.getlist(k)) if k in q else None for k in ("charset", "accept"))
    check_charset(charset)
    return accept_then(accept, request.headers.get("accept"))


def uid_param(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    if len(value) > 64 or not _UID.match(value):
        raise BadRequestError(f"{name} {value[:80]!r} is not a valid UID")
    return value


def warning_header(texts: list[str]) -> dict[str, str]:
    """A Warning header (RFC 9111 5.5, code 299 as PS3.18 8.3.4.4 uses it) per text, in order,
    at most WARNING_HEADER_MAX_BYTES long: put the warnings that matter most first."""
    if not texts:
        return {}
    values = [_warning_value(_warn_text(t)) for t in texts]
    joined = ", ".join(values)
    return {"Warning": joined if len(joined) <= WARNING_HEADER_MAX_BYTES else _capped(values)}


def _warn_text(text: str) -> str:
    """`text` as the inside of a quoted-string (RFC 9110 5.6.4) of visible ASCII (5.5): line
    breaks dropped, other characters escaped, `"` made `'`, and `\\` doubled so that no
    backslash escapes the closing quote."""
    ascii_text = _CONTROL.sub(" ", text.replace('"', "'")).encode("ascii", "backslashreplace")
    return ascii_text.decode().replace("\\", "\\\\")


def _warning_value(text: str) -> str:
    return f'299 {_WARN_AGENT} "{text}"'


def _capped(values: list[str]) -> str:
    """The leading `values` that fit WARNING_HEADER_MAX_BYTES with a count of the others
    (a first value too long on its own is cut)."""
    room = WARNING_HEADER_MAX_BYTES - len(", " + _warning_value(f"... and {len(values)} more"))
    kept: list[str] = []
    size = -2  # no separator before the first value
    for value in values:
        size += 2 + len(value)
        if size > room:
            break
        kept.append(value)
    if not kept:
        kept = [values[0][: room - len('..."')] + '..."']
    rest = len(values) - len(kept)
    return ", ".join([*kept, *([_warning_value(f"... and {rest} more")] if rest else [])])


def request_field(request: Request, name: str) -> str | None:
    """A list-valued request field, its lines joined (RFC 9110 5.3); None when absent."""
    lines = request.headers.getlist(name)
    return ", ".join(lines) if lines else None
