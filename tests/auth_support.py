"""Shared by the authentication tests (tests/test_auth*.py): an app of the settings given and
an in-process client of it (its name is the one the tests had when they were one file)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette

from dicomweb_server.app import create_app
from dicomweb_server.config import Settings


@contextlib.asynccontextmanager
async def _client(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield app, client
