"""The commands of the command line (cli) that work on the archive rather than serve it:
`initdb`, `load DIR...`, `reindex`, `check`, `apikey ...` and `audit ...`. Each opens the
services (app.open_services), does its work, prints what it did, and returns the exit
status; `reindex` and the creation and revocation of API keys are audited as the CLI's own
events. `check` opens the index alone, read-only (_reading_index): it changes nothing, not
even what a start does (the schema, the recovery of crashed stores)."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import anyio
from tqdm import tqdm

from dicomweb_server.app import open_services
from dicomweb_server.audit import AuditEvent, ChainVerifier, dicom_audit_messages, parse_anchor
from dicomweb_server.auth import create_api_key
from dicomweb_server.check import check_archive
from dicomweb_server.config import Settings, StartupError
from dicomweb_server.embedded_db import EmbeddedPostgres
from dicomweb_server.errors import DicomWebError
from dicomweb_server.index.database import Index
from dicomweb_server.ingest import Services, store_path
from dicomweb_server.reindex import reindex

__all__ = ["run_apikey", "run_audit", "run_check", "run_initdb", "run_load", "run_reindex"]

# Connections `check` opens to the database (it runs one statement at a time).
CHECK_POOL_SIZE = 2


async def run_initdb(settings: Settings) -> None:
    """`initdb`: the index schema created or brought up to date (open_services applies it)."""
    async with open_services(settings):
        print("schema applied")


async def _load_one(svc: Services, path: Path) -> tuple[str, str]:
    """One file stored through the STOW ingest path: its kind of outcome, and why it failed."""
    outcome = await store_path(svc, path)
    if outcome.failure is not None:
        return "failed", f"{path}: {outcome.reason} (0x{int(outcome.failure):04X})"
    return ("already present" if outcome.duplicate else "stored"), ""


async def run_load(settings: Settings, dirs: Sequence[str]) -> int:
    """`load DIR...`: every file under the directories stored; exit status 1 when none was
    stored or already present but some failed."""
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


async def run_reindex(settings: Settings, studies: Sequence[str] | None) -> int:
    """`reindex [--study UID ...]`: audited; exit status 1 when an instance could not be, or
    a study named is not in the index."""
    async with open_services(settings) as svc:
        total = (await svc.index.counts())["instances"] if studies is None else None
        try:
            unknown = await _unknown_studies(svc.index, studies)
            with tqdm(total=total, unit="instance", desc="reindex") as bar:
                report = await reindex(svc, studies, bar.update)
        except Exception as exc:  # e.g. the database went away: the run is audited still
            with contextlib.suppress(Exception):
                await svc.index.append_audit([_cli_event("reindex", 500, f"stopped: {exc}")])
            if not isinstance(exc, DicomWebError):
                raise
            # The database gone (503): said in a line, not a traceback. What was rewritten
            # stays (one transaction per instance), and a run again finds it unchanged.
            print(f"dicomweb-server: reindex stopped: {exc.message}", file=sys.stderr)
            return 1
        failed = len(report.failed)
        detail = f"updated={report.updated} unchanged={report.unchanged} failed={failed}"
        if studies is not None:
            detail += " studies=" + ",".join(studies)
        if unknown:
            detail += " not_in_index=" + ",".join(unknown)
        await svc.index.append_audit([_cli_event("reindex", 202 if failed else 200, detail)])
    print(f"updated {report.updated}, unchanged {report.unchanged}, failed {failed}")
    for line in report.failed:
        print(f"  failed: {line}")
    return 1 if failed or unknown else 0


async def run_check(settings: Settings, studies: Sequence[str] | None) -> int:
    """`check [--study UID ...]`: exit status 1 when an instance's file is missing or of
    another size than recorded, an orphan file was found (check.py), or a study named is not
    in the index; nothing is written."""
    if not settings.blob_dir.is_dir():
        raise StartupError(
            f"no blob directory at {settings.blob_dir.absolute()}: not an archive's data"
            " directory (check --data-dir or DICOMWEB_DATA_DIR)"
        )
    async with _reading_index(settings) as index:
        try:
            if not await index.has_schema():
                raise StartupError("the database holds no archive index (nothing to check)")
            unknown = await _unknown_studies(index, studies)
            report = await check_archive(index, settings.blob_dir, studies, print)
        except DicomWebError as exc:  # the database gone (503)
            print(f"dicomweb-server: check stopped: {exc.message}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # stdout closed (`check | head`): cli.main, not a directory
            raise
        except OSError as exc:  # a directory of the blob store unreadable
            why = f"{exc.filename}: {exc.strerror}"
            print(f"dicomweb-server: check stopped: {why}", file=sys.stderr)
            return 1
    print(report.summary())
    return 0 if report.clean and not unknown else 1


async def _unknown_studies(index: Index, studies: Sequence[str] | None) -> list[str]:
    """Those of the studies named (`--study` of `check` and `reindex`) that the index holds no
    instance of, each said on a line (stderr), so that the exit status is 1: a UID mistyped
    checked (or reindexed) nothing, and passed for a healthy study."""
    unknown = [] if studies is None else await index.unknown_studies(studies)
    for uid in unknown:
        print(f"dicomweb-server: no study {uid} in the index (--study)", file=sys.stderr)
    return unknown


@contextlib.asynccontextmanager
async def _reading_index(settings: Settings) -> AsyncIterator[Index]:
    """The index alone, its sessions read-only: no schema applied, no process lock taken, no
    recovery run (app.open_services does all three), so that a server using the same database
    and data directory is not disturbed. The embedded PostgreSQL is joined (or started) as
    `reindex` does, only if the data directory has one: none is created here."""
    embedded = None
    dsn = settings.database_url
    if dsn is None:
        if not (settings.pg_dir / "PG_VERSION").is_file():
            raise StartupError(
                f"no embedded PostgreSQL in {settings.pg_dir.absolute()}: not an archive's data"
                " directory (check --data-dir, or give --database-url)"
            )
        embedded = await anyio.to_thread.run_sync(EmbeddedPostgres, settings.pg_dir)
        dsn = embedded.dsn
    try:
        index = await Index.open(
            dsn, max_size=CHECK_POOL_SIZE, timeout_s=settings.query_timeout_s, read_only=True
        )
        try:
            yield index
        finally:
            await index.close()
    finally:
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)


def _cli_event(action: str, outcome: int, detail: str) -> AuditEvent:
    caller = f"cli:{getpass.getuser()}"
    return AuditEvent(datetime.now(UTC), caller, "local", action, (), outcome, 0, detail)


async def run_apikey(settings: Settings, args: argparse.Namespace) -> int:
    """`apikey create|revoke|list`; creation and revocation are audited."""
    async with open_services(settings) as svc:
        if args.action == "create":
            key_id, token = await create_api_key(svc.index, args.role, args.name)
            await svc.index.append_audit(
                [_cli_event("apikey_create", 201, f"role={args.role} key={key_id}")]
            )
            print(f"key {key_id} ({args.role}); the token is shown once, keep it safe:")
            print(token)
            return 0
        if args.action == "revoke":
            done = await svc.index.revoke_api_key(args.key_id)
            outcome = 204 if done else 404
            await svc.index.append_audit(
                [_cli_event("apikey_revoke", outcome, f"key={args.key_id}")]
            )
            print(f"revoked {args.key_id}" if done else f"no active key {args.key_id}")
            return 0 if done else 1
        for k in await svc.index.api_keys():
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            print(f"{k.key_id}  {k.role:5}  {state:24}  {k.name}")
        return 0


async def run_audit(settings: Settings, args: argparse.Namespace) -> int:
    """`audit verify [--anchor SEQ:HEX]`, `audit head`, `audit export [--after SEQ]`."""
    async with open_services(settings) as svc:
        if args.action == "export":
            with contextlib.ExitStack() as stack:
                out = (stack.enter_context(open(args.output, "w", encoding="utf-8"))
                       if args.output else sys.stdout)  # fmt: skip
                source = f"dicomweb-server@{settings.host}:{settings.port}"
                async for row in svc.index.audit_rows(args.after):
                    for message in dicom_audit_messages(row, source):  # one per patient
                        out.write(json.dumps(message, ensure_ascii=False))
                        out.write("\n")
            return 0
        anchors = dict(parse_anchor(a) for a in getattr(args, "anchor", None) or [])
        verifier = ChainVerifier(anchors)
        async for row in svc.index.audit_rows():
            if not verifier.feed(row):
                break
        problem = verifier.finish()
        seq, digest = verifier.head
        if args.action == "head":
            print(f"{seq}:{digest.hex()}")
        elif problem is None:
            print(f"audit trail intact: {verifier.count} rows, head {seq}:{digest.hex()}")
        else:
            print(f"audit trail TAMPERED: {problem} ({verifier.count} rows verified before it)")
        return 0 if problem is None else 1
