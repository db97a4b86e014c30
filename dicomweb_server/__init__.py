"""A DICOMweb (PS3.18) archive: STOW-RS, QIDO-RS and WADO-RS."""

from __future__ import annotations

from dicomweb_server.config import VERSION as __version__

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so that `import dicomweb_server.query` does not pull in Starlette and asyncpg.
    if name == "create_app":
        from dicomweb_server.app import create_app

        return create_app
    raise AttributeError(name)
