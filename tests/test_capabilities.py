"""The Retrieve Capabilities transaction (PS3.18 8.9): OPTIONS on the service's base URI
answers with a WADL Capabilities Description of the URL table (Annex H)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import httpx
import pytest

from dicomweb_server.openapi import openapi_document, wadl_document
from tests.helpers import ROOT

W = "{http://wadl.dev.java.net/2009/02}"


def _tree(body: bytes) -> dict[str, dict[str, str]]:
    """{resource path from the base: {method name: method id}} of a WADL document."""
    root = ET.fromstring(body)
    assert root.tag == f"{W}application"
    (resources,) = root.findall(f"{W}resources")
    out: dict[str, dict[str, str]] = {}

    def walk(node: ET.Element, prefix: str) -> None:
        for child in node.findall(f"{W}resource"):
            path = f"{prefix}/{child.get('path')}"
            out[path] = {m.get("name", ""): m.get("id", "") for m in child.findall(f"{W}method")}
            walk(child, path)

    walk(resources, "")
    return out


@pytest.mark.db
@pytest.mark.parametrize("path", [ROOT, ROOT + "/"])
async def test_options_on_the_base_uri_is_a_wadl_of_every_resource(
    app_client: httpx.AsyncClient, path: str
) -> None:
    r = await app_client.options(path, headers={"Accept": "application/vnd.sun.wadl+xml"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.sun.wadl+xml")
    root = ET.fromstring(r.content)
    assert root.find(f"{W}resources").get("base") == f"http://testserver{ROOT}/"  # type: ignore[union-attr]
    tree = _tree(r.content)
    assert tree["/studies"] == {"GET": "SearchForStudies", "POST": "StoreInstances"}
    assert tree["/studies/{study}"] == {"GET": "RetrieveStudy", "POST": "StoreStudyInstances"}
    assert tree["/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"] == {
        "GET": "RetrieveInstanceFrames"
    }
    assert tree["/studies/{study}/pixeldata"] == {"GET": "RetrieveStudyPixeldata"}
    assert tree["/instances"] == {"GET": "SearchForAllInstances"}
    # every DICOMweb route of the URL table is described, and nothing else
    from dicomweb_server.config import DICOMWEB_ROOT
    from dicomweb_server.routes import ROUTES
    from dicomweb_server.routes.info import route_rows

    described = {(p, m) for p, methods in tree.items() for m in methods}
    routed = {
        (path[len(DICOMWEB_ROOT) :].replace("{path:path}", "{path}"), method)
        for _, method, path, _ in route_rows(ROUTES)
        if path.startswith(DICOMWEB_ROOT + "/")
        and method != "OPTIONS"
        # the root itself (`/dicom-web/`, the service root) is the base, no resource
        and path != DICOMWEB_ROOT + "/"
    }
    assert described == routed and "/" not in tree
    # QIDO methods name their query parameters; retrieve methods the media types they send
    studies = root.find(f".//{W}resource[@path='studies']")
    assert studies is not None
    search = studies.find(f"{W}method[@name='GET']")
    assert search is not None
    names = {p.get("name") for p in search.iter(f"{W}param")}
    assert {"limit", "offset", "includefield", "PatientID", "Accept"} <= names
    # PS3.18 8.3.4.5 and 8.3.4.6: Empty and Multiple Value Matching, supported, are in the
    # Retrieve Capabilities response
    assert {"multiplevaluematching", "emptyvaluematching"} <= names


@pytest.mark.db
async def test_capabilities_negotiation_and_other_options(app_client: httpx.AsyncClient) -> None:
    for accept in (None, "*/*", "application/xml", "text/*"):
        r = await app_client.options(ROOT, headers={"Accept": accept} if accept else {})
        assert r.status_code == 200, accept
    r = await app_client.options(ROOT, headers={"Accept": "application/dicom+json"})
    assert r.status_code == 406 and "application/vnd.sun.wadl+xml" in r.text
    # a type refused with q=0 is not given through a wildcard (RFC 9110 12.5.1)
    refused = "application/vnd.sun.wadl+xml;q=0, application/*;q=0.1"
    r = await app_client.options(ROOT, headers={"Accept": refused})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    # other resources keep answering OPTIONS with 405 and their methods
    r = await app_client.options(f"{ROOT}/studies")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    # a CORS preflight of the root is still answered by the CORS layer, without a WADL
    r = await app_client.options(
        ROOT,
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert b"application" not in r.content


def test_wadl_is_built_from_the_rows_it_is_given() -> None:
    rows = [
        ("search_for_studies", "GET", "/r/studies", "read"),
        ("retrieve_study", "GET", "/r/studies/{study}", "read"),
        ("health", "GET", "/health", None),
    ]
    body = wadl_document(rows, "/r", "http://h/r").encode()
    assert _tree(body) == {
        "/studies": {"GET": "SearchForStudies"},
        "/studies/{study}": {"GET": "RetrieveStudy"},
    }
    assert b'base="http://h/r/"' in body
    assert b'name="study" style="template"' in body


def test_openapi_operation_ids_are_unique() -> None:
    """OpenAPI 3.0.3 4.7.10: operationId is unique; a route served at two paths (the DICOMweb
    root with and without its slash) is numbered the second time."""
    from dicomweb_server.routes import ROUTES
    from dicomweb_server.routes.info import route_rows

    doc = openapi_document(route_rows(ROUTES))
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert doc["paths"][ROOT]["get"]["operationId"] == "service_root"
    assert doc["paths"][ROOT + "/"]["get"]["operationId"] == "service_root_2"


def test_openapi_thumbnail_viewport_has_no_source_region() -> None:
    """PS3.18 8.3.5.1.3: a thumbnail's viewport is vw,vh (a source region is a 400); the
    rendered resources' takes the source region."""
    from dicomweb_server.routes import ROUTES
    from dicomweb_server.routes.info import route_rows

    doc = openapi_document(route_rows(ROUTES))
    seen = set()
    for ops in doc["paths"].values():
        for op in ops.values():
            for p in op["parameters"]:
                if p["name"] == "viewport":
                    kind = "thumbnail" if "thumbnail" in op["operationId"] else "rendered"
                    want = "vw,vh" if kind == "thumbnail" else "vw,vh[,[sx],[sy],[sw],[sh]]"
                    assert p["schema"]["description"] == want, op["operationId"]
                    seen.add(kind)
    assert seen == {"thumbnail", "rendered"}
