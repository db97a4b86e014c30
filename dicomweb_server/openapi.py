"""An OpenAPI 3.0 description of the server, built from the URL table and the QIDO attribute
table, so that it cannot drift from them (served at `GET /openapi.json`; fuzzed by
tests/test_schemathesis.py). Pure: routes come in as (name, method, path, role) rows."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from dicomweb_server.attributes import MATCHING_PATHS, Level
from dicomweb_server.config import VERSION
from dicomweb_server.query import QIDO_MAX_OFFSET

__all__ = ["openapi_document"]

_UID_SCHEMA = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)*$", "maxLength": 64}
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "study": _UID_SCHEMA,
    "series": _UID_SCHEMA,
    "instance": _UID_SCHEMA,
    "frames": {"type": "string", "pattern": r"^[0-9]+(,[0-9]+)*$"},
    "path": {"type": "string"},
    "key_id": {"type": "string"},
}
_ORDER = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_STATUS = {
    "200": "OK", "201": "Created", "202": "Accepted (some instances failed)",
    "204": "No Content (no match, or nothing to return)", "304": "Not Modified",
    "400": "Bad Request (the message says why)", "401": "Unauthorized", "403": "Forbidden",
    "404": "Not Found", "406": "Not Acceptable", "409": "Conflict (no instance stored)",
    "413": "Content Too Large", "415": "Unsupported Media Type",
    "503": "Service Unavailable (database away; Retry-After)",
}  # fmt: skip
_RENDER_PARAMS: dict[str, dict[str, Any]] = {
    "window": {"type": "string", "description": "center,width[,LINEAR|LINEAR_EXACT|SIGMOID]"},
    "viewport": {"type": "string", "description": "vw,vh[,sx,sy,sw,sh]"},
    "quality": {"type": "integer", "minimum": 1, "maximum": 100},
    "accept": {"type": "string"},
}


def _level_of(name: str) -> Level | None:
    if name == "search_for_studies":
        return Level.STUDY
    if name.startswith("search_for") and "series" in name:
        return Level.SERIES
    if name.startswith("search_for"):
        return Level.INSTANCE
    return None


def _query_params(name: str) -> list[dict[str, Any]]:
    def param(pname: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": pname, "in": "query", "required": False, "schema": schema}

    level = _level_of(name)
    if level is not None:  # QIDO-RS, PS3.18 8.3.4 and Table 10.6.1-5
        params = [
            param("limit", {"type": "integer", "minimum": 0}),
            param("offset", {"type": "integer", "minimum": 0, "maximum": QIDO_MAX_OFFSET}),
            param("fuzzymatching", {"type": "string", "enum": ["true", "false"]}),
            param("includefield", {"type": "string"}),
        ]
        for path in MATCHING_PATHS:  # `Keyword`, or `Sequence.Keyword` (PS3.18 8.3.4.1)
            if _ORDER[path[0].level] <= _ORDER[level]:
                params.append(param(".".join(a.keyword for a in path), {"type": "string"}))
        return params
    if "rendered" in name or "thumbnail" in name:
        return [param(k, v) for k, v in _RENDER_PARAMS.items()]
    if name.startswith("retrieve_"):
        return [param("accept", {"type": "string"})]
    return []


def _operation(name: str, method: str, path: str, role: str | None) -> dict[str, Any]:
    params = [{"name": p, "in": "path", "required": True, "schema": _PATH_PARAMS[p]}
              for p in re.findall(r"{(\w+)(?::\w+)?}", path)]  # fmt: skip
    op: dict[str, Any] = {
        "operationId": name,
        "parameters": params + _query_params(name),
        "responses": {code: {"description": text} for code, text in _STATUS.items()},
    }
    if name.startswith("store_"):
        op["requestBody"] = {"required": True, "content": {
            "multipart/related": {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip
    elif name == "apikey_create":
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"type": "string", "enum": ["read", "write", "admin"]},
                           "name": {"type": "string"}}}}}}  # fmt: skip
    if role is None:
        op["security"] = []
    else:
        op["description"] = f"Needs the {role} role when authentication is on."
    return op


def openapi_document(routes: Iterable[tuple[str, str, str, str | None]]) -> dict[str, Any]:
    """The document for routes given as (name, method, path template, role)."""
    paths: dict[str, dict[str, Any]] = {}
    for name, method, path, role in routes:
        template = re.sub(r"{(\w+):\w+}", r"{\1}", path)
        paths.setdefault(template, {})[method.lower()] = _operation(name, method, path, role)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dicomweb-server",
            "version": VERSION,
            "description": "DICOMweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS; see the "
            "conformance statement for every choice.",
        },
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
