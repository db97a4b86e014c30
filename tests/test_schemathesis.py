"""Every operation of the OpenAPI description the server ships (`GET /openapi.json`), fuzzed by
schemathesis against a real server (issue 6): never a 5xx, every status documented, no hang.
Positive and negative cases: values the description allows and values it forbids."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from dicomweb_server.app import create_app
from dicomweb_server.config import Settings
from dicomweb_server.openapi import openapi_document
from dicomweb_server.routes.info import route_rows
from tests.liveserver import ServerProcess, running

pytestmark = pytest.mark.db

# Examples per operation (about 30 operations): the run stays near a minute.
EXAMPLES_PER_OPERATION = 25
# Seconds any one answer may take.
RESPONSE_TIMEOUT_S = 10

# STOW bodies are sent as the bytes generated (the multipart reader has its own fuzz tests).
schemathesis.serializer.alias("multipart/related", "application/octet-stream")

# The description, built the way the server builds it (no server needed at collection).
schema = schemathesis.openapi.from_dict(openapi_document(route_rows(create_app(Settings()).routes)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Iterator[ServerProcess]:
    with running(tmp_path_factory.mktemp("fuzz") / "data", pg_dsn) as proc:
        yield proc


def test_the_served_description_is_the_tested_one(server: ServerProcess) -> None:
    root = server.url.removesuffix("/dicom-web")
    served = httpx.get(f"{root}/openapi.json", timeout=30).json()
    assert served == schema.raw_schema
    assert len(served["paths"]) >= 28


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_every_operation(case: schemathesis.Case[Any], server: ServerProcess) -> None:
    root = server.url.removesuffix("/dicom-web")
    with requests.Session() as session:
        case.call_and_validate(
            base_url=root,
            session=session,
            timeout=RESPONSE_TIMEOUT_S,
            checks=[not_a_server_error, status_code_conformance],
        )
