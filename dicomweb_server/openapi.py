"""Descriptions of the server built from the URL table and the QIDO attribute table, so that
they cannot drift from them: an OpenAPI 3.0 document (served at `GET /openapi.json`; fuzzed by
tests/test_schemathesis.py) and the WADL Capabilities Description of PS3.18 Annex H (the
Retrieve Capabilities transaction, `OPTIONS` on the DICOMweb root, 8.9). Pure: routes come in
as (name, method, path, role) rows."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

from dicomweb_server.attributes import MATCHING_PATHS, Level
from dicomweb_server.config import VERSION
from dicomweb_server.query import QIDO_MAX_OFFSET

__all__ = ["WADL_MEDIA_TYPE", "openapi_document", "wadl_document"]

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
    "503": "Service Unavailable (database away, scratch space full; Retry-After)",
}  # fmt: skip
# `window` as the server takes it (rendered.py): PS3.18 8.3.5.1.4's center,width,function,
# the function in any case and also as VOI LUT Function spells it (linear_exact), or
# center,width alone, read as linear. Numbers: ASCII decimals, an exponent allowed. In the
# syntax both ECMA-262 (OpenAPI's pattern) and Python read alike: no inline flags.
_NUMBER = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?"
_FUNCTION = r"([lL][iI][nN][eE][aA][rR]([-_][eE][xX][aA][cC][tT])?|[sS][iI][gG][mM][oO][iI][dD])"
_WINDOW_PATTERN = f"^{_NUMBER},{_NUMBER}(,{_FUNCTION})?$"
_ICC_VALUE = "(no|yes|srgb|adobergb|rommrgb)"
_RENDER_PARAMS: dict[str, dict[str, Any]] = {
    "window": {
        "type": "string",
        "pattern": _WINDOW_PATTERN,
        "description": "center,width[,function]: function linear (the default when omitted), "
        "linear-exact or sigmoid, in any case; width at least 1 for linear, more than 0 "
        "otherwise",
    },
    "viewport": {"type": "string", "description": "vw,vh[,[sx],[sy],[sw],[sh]]"},
    "quality": {"type": "integer", "minimum": 1, "maximum": 100},
    # PS3.18 8.3.5.1.5: a list; the first value applied here (no, yes, srgb) is applied.
    "iccprofile": {
        "type": "string",
        "pattern": f"^{_ICC_VALUE}(,{_ICC_VALUE})*$",
        "description": "no (the default), yes (the instance's ICC profile), srgb (converted "
        "to sRGB); adobergb and rommrgb are not supported (400 unless listed after one that "
        "is); any value but no passes over image/gif for an accepted type that embeds a "
        "profile (400 when image/gif is the only one)",
    },
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
            # PS3.18 8.3.4.5 and 8.3.4.6: supported, so listed in the Retrieve Capabilities
            # response too. With emptyvaluematching=true a key's value `""` matches the
            # resources without a value of it (PS3.4 C.2.2.2.7).
            param("emptyvaluematching", {"type": "string", "enum": ["true", "false"]}),
            param("multiplevaluematching", {"type": "string", "enum": ["true", "false"]}),
            param("includefield", {"type": "string"}),
        ]
        for path in MATCHING_PATHS:  # `Keyword`, or `Sequence.Keyword` (PS3.18 8.3.4.1)
            if _ORDER[path[0].level] <= _ORDER[level]:
                params.append(param(".".join(a.keyword for a in path), {"type": "string"}))
        return params
    if "rendered" in name or "thumbnail" in name:
        # A thumbnail's viewport is vw,vh only: no source region (PS3.18 8.3.5.1.3).
        thumb = (
            {"viewport": {"type": "string", "description": "vw,vh"}} if "thumbnail" in name else {}
        )
        return [param(k, v) for k, v in {**_RENDER_PARAMS, **thumb}.items()]
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


def _template(path: str) -> str:
    """A route path as a URI template: `{path:path}` -> `{path}`."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)


def openapi_document(routes: Iterable[tuple[str, str, str, str | None]]) -> dict[str, Any]:
    """The document for routes given as (name, method, path template, role)."""
    paths: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for name, method, path, role in routes:
        template = _template(path)
        op = _operation(name, method, path, role)
        # operationId is unique in a document (OpenAPI 3.0.3 4.7.10): a route served at two
        # paths (the DICOMweb root with and without its slash) is numbered the second time.
        seen[op["operationId"]] = seen.get(op["operationId"], 0) + 1
        if seen[op["operationId"]] > 1:
            op["operationId"] += f"_{seen[op['operationId']]}"
        paths.setdefault(template, {})[method.lower()] = op
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


WADL_MEDIA_TYPE = "application/vnd.sun.wadl+xml"
_WADL_NS = "http://wadl.dev.java.net/2009/02"
_XML_PARTS = 'multipart/related; type="application/dicom+xml"'
_OCTETS = 'multipart/related; type="application/octet-stream"'
_IMAGES = [
    f'multipart/related; type="image/{t}"' for t in ("jpeg", "jls", "jp2", "jphc", "dicom-rle")
]
_INSTANCES = 'multipart/related; type="application/dicom"'
_MODEL = ["application/dicom+json", "application/json", _XML_PARTS]
_RENDERED = ["image/jpeg", "image/png", "image/gif"]


def _representations(name: str) -> tuple[list[str], list[str]]:
    """(request media types, response media types) of a route, defaults first (the statement
    gives the details: transfer syntaxes, parameters)."""
    if name.startswith("store_"):
        types = [_INSTANCES, 'multipart/related; type="application/dicom+json"', _XML_PARTS]
        return types, ["application/dicom+json", "application/dicom+xml"]
    if name.startswith("search_for") or name.endswith("_metadata"):
        return [], _MODEL
    if name == "retrieve_rendered_instance":  # documents too (PS3.18 Table 8.7.4-1)
        return [], [*_RENDERED, "text/html", "text/plain", "application/pdf", "text/xml"]
    if "rendered" in name or "thumbnail" in name:
        return [], _RENDERED
    if name in ("retrieve_study", "retrieve_series", "retrieve_instance"):
        return [], [_INSTANCES, f"{_INSTANCES}; transfer-syntax=*", _OCTETS, *_IMAGES]
    if name == "retrieve_instance_frames" or name.endswith(("_bulkdata", "_pixeldata")):
        return [], [_OCTETS, f"{_OCTETS}; transfer-syntax=*", *_IMAGES]
    return [], [_OCTETS]


def _method_id(name: str) -> str:
    """`retrieve_study_metadata` -> `RetrieveStudyMetadata` (the transaction names of PS3.18
    Table H-1 where they differ only in spelling)."""
    return "".join(word.capitalize() for word in name.split("_"))


def wadl_document(routes: Iterable[tuple[str, str, str, str | None]], root: str, base: str) -> str:
    """The Capabilities Description (PS3.18 Annex H): one `application` with one `resources`
    whose base is the service's base URL, and a `resource` per path segment under the DICOMweb
    root `root`, each with its methods and child resources."""
    ET.register_namespace("", _WADL_NS)
    application = ET.Element(f"{{{_WADL_NS}}}application")
    application.set("xmlns:xsd", "http://www.w3.org/2001/XMLSchema")  # the params' types
    resources = ET.SubElement(application, f"{{{_WADL_NS}}}resources", base=base.rstrip("/") + "/")
    nodes: dict[str, ET.Element] = {"": resources}
    for name, method, path, _role in routes:
        # Resources under the root only: not the root itself (`/dicom-web/`, the service
        # root's and this description's other spelling).
        if not path.startswith(root + "/") or path == root + "/" or method == "OPTIONS":
            continue
        parent = ""
        for segment in _template(path[len(root) + 1 :]).split("/"):
            key = f"{parent}/{segment}"
            if key not in nodes:
                node = ET.SubElement(nodes[parent], f"{{{_WADL_NS}}}resource", path=segment)
                if segment.startswith("{"):
                    ET.SubElement(node, f"{{{_WADL_NS}}}param", name=segment.strip("{}"),
                                  style="template", type="xsd:string", required="true")  # fmt: skip
                nodes[key] = node
            parent = key
        _wadl_method(nodes[parent], name, method)
    ET.indent(application)
    return ET.tostring(application, encoding="unicode", xml_declaration=True) + "\n"


def _wadl_method(resource: ET.Element, name: str, method: str) -> None:
    requests, responses = _representations(name)
    node = ET.SubElement(resource, f"{{{_WADL_NS}}}method", name=method, id=_method_id(name))
    request = ET.SubElement(node, f"{{{_WADL_NS}}}request")
    if responses:
        accept = ET.SubElement(request, f"{{{_WADL_NS}}}param", name="Accept", style="header",
                               type="xsd:string", default=responses[0])  # fmt: skip
        for media in responses:
            ET.SubElement(accept, f"{{{_WADL_NS}}}option", value=media)
    for query in _query_params(name):
        if query["name"] != "accept":
            ET.SubElement(request, f"{{{_WADL_NS}}}param", name=query["name"], style="query",
                          type="xsd:string")  # fmt: skip
    for media in requests:
        ET.SubElement(request, f"{{{_WADL_NS}}}representation", mediaType=media)
    response = ET.SubElement(node, f"{{{_WADL_NS}}}response", status="200")
    for media in responses:
        ET.SubElement(response, f"{{{_WADL_NS}}}representation", mediaType=media)
