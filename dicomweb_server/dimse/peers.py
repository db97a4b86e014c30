"""C-MOVE destinations: AE title -> host and port, from a small JSON file.

{"WORKSTATION": {"host": "10.0.0.7", "port": 104}, "STORESCP": {"host": "pacs", "port": 11113}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dicomweb_server.config import ConfigError, check_ae_title

__all__ = ["Peer", "load_peers", "parse_peers"]


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int


def parse_peers(text: str, source: str = "peers") -> dict[str, Peer]:
    """Peers by AE title, or ConfigError naming what is wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f'{source}: expected {{"AE_TITLE": {{"host": ..., "port": ...}}}}')
    peers = {}
    for title, entry in doc.items():
        check_ae_title(title)
        host = entry.get("host") if isinstance(entry, dict) else None
        port = entry.get("port") if isinstance(entry, dict) else None
        if not isinstance(host, str) or not host or not isinstance(port, int):
            raise ConfigError(f"{source}: {title} needs a host (string) and a port (integer)")
        if not 0 < port <= 65535:
            raise ConfigError(f"{source}: {title}: port {port} is not 1 to 65535")
        peers[title.strip()] = Peer(title.strip(), host, port)
    return peers


def load_peers(path: Path | None) -> dict[str, Peer]:
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the DIMSE peers file {path}: {exc.strerror}") from None
    return parse_peers(text, str(path))
