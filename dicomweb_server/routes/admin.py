"""Administration over HTTP (role admin): API keys. The same as `dicomweb-server apikey`."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicomweb_server.auth import ROLES, create_api_key, is_key_id
from dicomweb_server.errors import (
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from dicomweb_server.media.headers import check_body_coding
from dicomweb_server.media.mediatypes import APPLICATION_JSON, parse_content_type
from dicomweb_server.routes.common import services

__all__ = ["create_key", "list_keys", "revoke_key"]

# Largest request body of a key creation, bytes.
MAX_ADMIN_BODY_BYTES = 4096
# Longest key name, characters.
MAX_KEY_NAME_CHARS = 200


async def list_keys(request: Request) -> Response:
    keys = await services(request).index.api_keys()
    return JSONResponse([
        {"key_id": k.key_id, "role": k.role, "name": k.name,
         "created": k.created_at.isoformat(),
         "revoked": k.revoked_at.isoformat() if k.revoked_at else None}
        for k in keys
    ])  # fmt: skip


async def create_key(request: Request) -> Response:
    """POST {"role": "read|write|admin", "name": "..."}: 201 with the token, shown only here."""
    _require_json(request.headers.get("content-type"))
    check_body_coding(request.headers.getlist("content-encoding"))
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ADMIN_BODY_BYTES:
            raise PayloadTooLargeError(f"a key request is at most {MAX_ADMIN_BODY_BYTES} bytes")
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):  # not Python's own words for `[]["role"]`
            raise ValueError("the body is not a JSON object")
        role, name = doc["role"], doc.get("name", "")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if not isinstance(name, str) or len(name) > MAX_KEY_NAME_CHARS or not name.isprintable():
            raise ValueError(
                f"name must be printable text of at most {MAX_KEY_NAME_CHARS} characters"
            )
        name.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequestError(f'expected {{"role": ..., "name": ...}}: {exc}') from None
    key_id, token = await create_api_key(services(request).index, role, name)
    request.state.audit_detail = f"role={role} key={key_id}"
    return JSONResponse({"key_id": key_id, "token": token, "role": role, "name": name}, 201)


def _require_json(content_type: str | None) -> None:
    """415 unless the body is declared `application/json` (RFC 9110 15.5.16), before it is
    read. Parameters such as `charset=utf-8` are allowed (RFC 8259 11 defines none, and JSON
    text is UTF-8 anyway)."""
    want = f"Content-Type: {APPLICATION_JSON}"
    try:
        essence = parse_content_type(content_type or "").essence
    except BadRequestError:  # malformed: not application/json either
        essence = repr((content_type or "")[:80])
    except UnsupportedMediaTypeError:  # none, or only parameters
        raise UnsupportedMediaTypeError(f"a key request needs {want}") from None
    if essence != APPLICATION_JSON:
        raise UnsupportedMediaTypeError(f"a key request needs {want}, not {essence}")


async def revoke_key(request: Request) -> Response:
    key_id = request.path_params["key_id"]
    request.state.audit_detail = f"key={key_id}"
    # Anything not shaped like a key id names no key (and may hold what PostgreSQL refuses).
    revoked = is_key_id(key_id) and await services(request).index.revoke_api_key(key_id)
    request.app.state.authenticator.forget(key_id)  # refused from the next request on
    if not revoked:
        raise NotFoundError(f"no active API key {key_id[:40]!r}")
    return Response(status_code=204)
