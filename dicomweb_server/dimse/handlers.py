"""pynetdicom event handlers: the DIMSE services over the archive's own pipelines.

pynetdicom calls each handler in the thread of its association. The archive's services are
async (the asyncpg pool belongs to the server's event loop), so a handler hands each piece of
work to that loop with `run_coroutine_threadsafe(...).result(timeout)` and waits. Reading a
blob to send it (C-MOVE, C-GET) stays in the association thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import StoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomweb_server.audit import ARCHIVE_FAULT, OVER_LIMIT, AuditEvent, Patient, PatientOfStudy
from dicomweb_server.auditlog import AuditLog
from dicomweb_server.blobstore.lost import LostBlobError
from dicomweb_server.config import MAX_PART_BYTES
from dicomweb_server.dimse import conversion
from dicomweb_server.dimse.association import (
    discard_unserved_stores,
    final_failure,
    no_delay,
    no_remaining_in_final,
)
from dicomweb_server.dimse.connections import DIMSE_MAX_IDENTIFIER_BYTES, Connections
from dicomweb_server.dimse.identifier import (
    UNABLE_TO_PROCESS,
    IdentifierError,
    Model,
    decode,
    find_response,
    parse_find,
    parse_retrieve,
)
from dicomweb_server.dimse.peers import Peer
from dicomweb_server.dimse.release import Releases, release_requested
from dicomweb_server.dimse.retrieval import BytesSent, Retrieval
from dicomweb_server.dimse.sending import conversion_failed, remove_scratch, send_stored_files
from dicomweb_server.dimse.statuses import (
    CANCEL,
    CANNOT_COUNT,
    CANNOT_PERFORM,
    DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_KEYS_UNSUPPORTED,
    PROCESSING_FAILURE,
    UNFINISHED,
    status,
)
from dicomweb_server.dimse.stores import DataSetWaits, refusal, serve_every_store
from dicomweb_server.errors import DicomWebError
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.ingest import Services, store_path
from dicomweb_server.query import Query
from dicomweb_server.search import search
from dicomweb_server.sql import compile_search
from dicomweb_server.transcode.codecs import TranscodeError

__all__ = [
    "DIMSE_QUERY_TIMEOUT_S",
    "DIMSE_STORE_TIMEOUT_S",
    "MAX_RETRIEVE_INSTANCES",
    "Handlers",
    "discard_unserved_stores",
    "no_delay",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds one C-STORE may take to be ingested (copy, parse, fsync, commit) before it fails.
DIMSE_STORE_TIMEOUT_S = 600
# Seconds one page of C-FIND matches, or the matching of a C-MOVE/C-GET, may take.
DIMSE_QUERY_TIMEOUT_S = 120
# Instances one C-MOVE/C-GET may send: the sub-operation counts are US (PS3.7 Table 9.1-4).
MAX_RETRIEVE_INSTANCES = 65535

_MODELS = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
}
QUERY_RETRIEVE_SOP_CLASSES = tuple(_MODELS)

FindResult = tuple[int | Dataset, Dataset | None]


@dataclass
class Handlers:
    services: Services
    loop: asyncio.AbstractEventLoop
    ae_title: str
    peers: dict[str, Peer]
    base_url: str  # of RetrieveURL, when a C-FIND asks for it
    audit: AuditLog | None = None  # the audit trail (issue 7): one event per operation
    # The largest data set received (a C-STORE's): the STOW part limit, DICOMWEB_MAX_PART_BYTES.
    max_data_set_bytes: int = MAX_PART_BYTES
    # Each connection: its data set size limit, how it ended, the C-STOREs it left unserved.
    connections: Connections = field(init=False, repr=False)
    # Each association's C-STORE awaiting its data set (one that never comes is refused).
    waits: DataSetWaits = field(default_factory=DataSetWaits, repr=False)

    def __post_init__(self) -> None:
        self.connections = Connections(self._record, self.max_data_set_bytes)

    def _audit(self, event: Event, action: str, code: int, uids: Sequence[str] = (),
               nbytes: int = 0, detail: str = "",
               patients: Sequence[PatientOfStudy] = ()) -> None:  # fmt: skip
        """Append an event for a DIMSE operation: the caller is the requestor's AE title.
        The patients of a C-STORE are its data set's; those of a C-GET or C-MOVE, the audit
        writer looks up (auditlog.py)."""
        if self.audit is None:
            return
        requestor = event.assoc.requestor
        self._record(AuditEvent(
            datetime.now(UTC), f"ae:{requestor.ae_title.strip()}", str(requestor.address),
            action, tuple(uids), code, nbytes, detail, tuple(patients),
        ))  # fmt: skip

    def _record(self, record: AuditEvent) -> None:
        """Queue an event on the audit trail, from any of pynetdicom's threads: immediate
        unless the queue is full (the database away), when it waits as requests do.

        Never raises: pynetdicom calls a notification event's handlers in one loop, and the
        first to raise skips the others (discard_unserved_stores among them). Found by
        review: an event recorded once the server's loop had stopped (a connection still
        open after shutdown) waited DIMSE_QUERY_TIMEOUT_S for a loop that never ran it, in a
        DUL thread that keeps the process alive; once the loop was closed, it raised."""
        if self.audit is None:
            return
        if not self.loop.is_running():
            log.error("audit trail: the server has stopped, not recorded: %r", record)
            return
        try:
            self._run(self.audit.record(record), DIMSE_QUERY_TIMEOUT_S)
        except TimeoutError:
            log.error("audit trail: could not queue %r", record)
        except Exception:  # the loop closed meanwhile, or the task was cancelled with it
            log.exception("audit trail: could not queue %r", record)

    def bindings(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_CONN_OPEN, no_remaining_in_final),
            (evt.EVT_CONN_OPEN, serve_every_store),
            (evt.EVT_CONN_OPEN, Releases.opened),
            *self.waits.bindings(),  # before the connections' data set count
            # Before discard_unserved_stores: EVT_ABORTED's handler marks the association
            # ending (no C-STORE taken up later is served) before the spool files go.
            *self.connections.bindings(),
            (evt.EVT_CONN_CLOSE, discard_unserved_stores),
            (evt.EVT_ABORTED, discard_unserved_stores),
            (evt.EVT_RELEASED, discard_unserved_stores),
            (evt.EVT_C_ECHO, self.echo),
            (evt.EVT_C_STORE, self.store),
            (evt.EVT_C_FIND, self.find),
            (evt.EVT_C_MOVE, self.move),
            (evt.EVT_C_GET, self.get),
        ]

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()  # a store rolls itself back when cancelled (ingest.store_file)
            raise

    def echo(self, event: Event) -> int:
        return 0x0000  # PS3.4 A.4: Success

    def store(self, event: Event) -> int | Dataset:
        """C-STORE: the very STOW ingest path. pynetdicom spooled the data set as received,
        behind a File Meta header of its own (STORE_RECV_CHUNKED_DATASET); the statuses are
        the STOW failure reasons, which are PS3.4 Table B.2-1 / PS3.7 C.4 codes already."""
        unserved = self.connections.claim(event)
        if unserved is not None:
            # Its association has ended, or is being aborted: not stored, and audited as
            # such (connections.py).
            return status(OUT_OF_RESOURCES, unserved)
        answer, touched, over_limit, patient = self._store(event)
        code = answer if isinstance(answer, int) else int(answer.Status)
        try:
            size = event.dataset_path.stat().st_size
        except (OSError, AttributeError):  # no data set (stores.refusal)
            size = 0
        sop = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        detail = _with_comment(f"sop={sop}", answer)
        if over_limit:  # first, where no text of the peer's can put it (audit.OVER_LIMIT)
            detail = f"{OVER_LIMIT}{detail}"
        self._audit(event, "dimse_store", code, [touched] if touched else [], size, detail,
                    [(*patient, touched.split("/")[0])] if patient and touched else [])  # fmt: skip
        return answer

    def _store(self, event: Event) -> tuple[int | Dataset, str | None, bool, Patient | None]:
        """(status, study/series/instance stored or None, whether refused for a limit the
        data set passed: a Deflated one inflating past MAX_INFLATED_BYTES, 0xA700 as STOW
        answers it, the peer's doing and not the archive out of resources; the patient the
        stored data set names, for the audit trail)."""
        refused = refusal(event, self.waits.never_came(event))
        if refused is not None:
            return refused, None, False, None
        try:
            outcome = self._run(
                store_path(self.services, event.dataset_path), DIMSE_STORE_TIMEOUT_S
            )
        except DicomWebError as exc:  # the database is unreachable: B.2-1 Out of Resources
            return status(OUT_OF_RESOURCES, exc.message), None, False, None
        except TimeoutError:
            late = status(OUT_OF_RESOURCES, "the archive did not store it in time")
            return late, None, False, None
        except Exception:
            log.exception("C-STORE failed")
            return status(PROCESSING_FAILURE, "processing failure"), None, False, None
        if outcome.failure is not None:
            sop = outcome.sop_instance_uid or cast(C_STORE, event.request).AffectedSOPInstanceUID
            log.info("C-STORE of %s refused: %s", sop, outcome.reason)
            return status(int(outcome.failure), outcome.reason), None, outcome.over_limit, None
        # A duplicate of the same bytes is a success too (as with STOW).
        path = outcome.retrieve_path
        return 0x0000, "/".join(path.split("/")[2::2]) if path else None, False, outcome.patient

    def find(self, event: Event) -> Iterator[FindResult]:
        """_find, audited with the status answered: pynetdicom's Success when the matches
        ran out, the failure or Cancel answered instead, UNFINISHED when the association
        ended first (found by review: a cancelled C-FIND was recorded as a success). The
        detail is the query and the match count, then, as a refused C-STORE's, the Error
        Comment of a failure (found by review: a failed C-FIND said only what was asked)."""
        matches, last = 0, cast(int | Dataset, UNFINISHED)
        sent = BytesSent()
        event.assoc.bind(evt.EVT_DIMSE_SENT, sent.on_sent)
        releases = Releases.install(event.assoc)
        releases.serving += 1  # pynetdicom not told of an A-RELEASE-RQ meanwhile (_find)
        try:
            for answer, identifier in self._find_or_fail(event):
                if identifier is None:
                    last = answer
                yield answer, identifier
                if identifier is not None:  # sent: pynetdicom resumes this once it has gone
                    matches += 1
            if isinstance(last, int) and last == UNFINISHED:
                last = 0x0000
        finally:
            releases.serving -= 1
            event.assoc.unbind(evt.EVT_DIMSE_SENT, sent.on_sent)
            final = last if isinstance(last, int) else int(last.Status)
            detail = _with_comment(f"{_identifier_text(event)} matches={matches}", last)
            self._audit(event, "dimse_find", final, nbytes=sent.total, detail=detail)

    def _find_or_fail(self, event: Event) -> Iterator[FindResult]:
        """_find, or 0x0110 Processing Failure (PS3.7 C.4.2) once it fails unexpectedly, as
        a C-STORE does. Found by review: the error reached pynetdicom, which answered 0xC311
        with no Error Comment, and the audit trail recorded 0xFF00 (the association ended
        first) and no reason, a refused request (4) where the archive had failed (8)."""
        try:
            yield from self._find(event)
        except Exception:
            log.exception("C-FIND failed")
            yield status(PROCESSING_FAILURE, "processing failure"), None

    def _find(self, event: Event) -> Iterator[FindResult]:
        """C-FIND: pages through the QIDO search of the identifier; one pending response per
        match (0xFF00; 0xFF01 when a key was ignored as unsupported for matching), 0xFE00
        after a C-CANCEL, then pynetdicom's final Success.
        0xFE00 too once the requestor has asked to release the association (release.py;
        PS3.8 7.2.2: it can send no C-CANCEL then, only wait for the release's answer).
        pynetdicom's Find SCP (3.0), seeing the request between two matches, took it off
        the queue, stopped, and answered Success after the matches sent so far (found by
        review: 147 of 300, audited as unfinished, 148 counted)."""
        try:
            req = parse_find(_identifier(event), _MODELS[event.request.AffectedSOPClassUID])
        except IdentifierError as exc:
            yield status(exc.status, exc.message), None
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            yield status(UNABLE_TO_PROCESS, f"cannot decode the identifier: {exc}"), None
            return
        offset = 0
        while True:
            if event.is_cancelled or release_requested(event.assoc):
                yield CANCEL, None
                return
            page_query = replace(req.query, offset=offset)
            try:
                page, more = self._run(
                    search(self.services.index, page_query, self.base_url), DIMSE_QUERY_TIMEOUT_S
                )
            except (DicomWebError, TimeoutError) as exc:
                yield status(OUT_OF_RESOURCES, f"search failed: {exc}"), None
                return
            for result in page:
                if event.is_cancelled or release_requested(event.assoc):
                    yield CANCEL, None
                    return
                pending = PENDING_KEYS_UNSUPPORTED if req.unsupported else PENDING
                yield pending, find_response(req, result, self.ae_title)
            if not more:
                return
            offset += len(page)

    def move(self, event: Event) -> Iterator[Any]:
        """C-MOVE to a configured peer over a sub-association proposing the stored
        (SOP Class, transfer syntax) pairs; unknown destination: 0xA801 (PS3.4 C.4.2.1.5),
        with an Error Comment naming it (found by review: pynetdicom's own 0xA801 had none)."""
        title = (event.move_destination or "").strip()
        detail = f"destination={title}"
        peer = self.peers.get(title)
        if peer is None:
            unknown = status(DESTINATION_UNKNOWN, f"Move Destination {title!r} is not a known AE")
            self._audit(
                event, "dimse_move", DESTINATION_UNKNOWN, detail=_with_comment(detail, unknown)
            )
            final_failure(event, unknown)  # the response pynetdicom sends now is this one
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        found = self._matching_instances(event)
        # A failure or zero matches is answered before pynetdicom would associate with the
        # destination (a count of 0 sub-operations; final_failure). The common storage
        # contexts are proposed when the instances name none.
        contexts = conversion.contexts(found) if isinstance(found, list) else []
        retrieval = Retrieval()

        def on_accepted(sub: Event) -> None:  # the sub-association, in this thread
            retrieval.accepted.update(_pairs(sub.assoc.accepted_contexts))
            retrieval.reached = bool(sub.assoc.accepted_contexts)  # else pynetdicom aborts
            retrieval.association = sub.assoc

        handlers = [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_ACCEPTED, on_accepted),
                    (evt.EVT_DIMSE_RECV, retrieval.on_response),
                    (evt.EVT_DIMSE_SENT, retrieval.nbytes.on_sent)]  # fmt: skip
        kwargs = {"contexts": contexts or StoragePresentationContexts, "evt_handlers": handlers}
        yield peer.host, peer.port, kwargs
        yield from self._send(event, found, "dimse_move", detail, retrieval)

    def get(self, event: Event) -> Iterator[Any]:
        """C-GET: C-STORE sub-operations on the same association, over the storage contexts
        the requestor proposed with the SCP role (PS3.4 C.4.3); their responses arrive on it."""
        retrieval = Retrieval(_pairs(event.assoc.accepted_contexts), reached=True,
                              association=event.assoc)  # fmt: skip
        send_stored_files(event.assoc)
        event.assoc.bind(evt.EVT_DIMSE_RECV, retrieval.on_response)
        event.assoc.bind(evt.EVT_DIMSE_SENT, retrieval.nbytes.on_sent)
        try:
            yield from self._send(event, self._matching_instances(event), "dimse_get", "",
                                  retrieval)  # fmt: skip
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, retrieval.on_response)
            event.assoc.unbind(evt.EVT_DIMSE_SENT, retrieval.nbytes.on_sent)

    def _send(self, event: Event, found: list[StoredInstance] | Dataset, action: str,
              detail: str, retrieval: Retrieval) -> Iterator[Any]:  # fmt: skip
        """The sub-operations, audited with the status answered (retrieval.py), the counts
        and the instances the peer stored (found by review: every C-MOVE/C-GET was recorded
        as a success with every matched instance, whatever was answered)."""
        if isinstance(found, Dataset):  # refused as a whole: no sub-operation (final_failure)
            self._audit(event, action, int(found.Status), detail=_with_comment(detail, found))
            final_failure(event, found)
            yield 0
            return
        releases = Releases.install(event.assoc)
        releases.serving += 1  # pynetdicom not told of an A-RELEASE-RQ meanwhile (release.py)
        try:
            yield from self._sub_operations(event, found, retrieval)
        finally:
            releases.serving -= 1
            outcome, summary = retrieval.outcome(len(found)), retrieval.summary(len(found))
            detail = f"{detail} {summary}".strip()
            if retrieval.unsent:  # first, where no text of the peer's can put it
                detail = f"{ARCHIVE_FAULT}{retrieval.unsent} not read or converted; {detail}"
            self._audit(event, action, outcome, retrieval.sent, retrieval.nbytes.total, detail)

    def _sub_operations(
        self, event: Event, found: list[StoredInstance], retrieval: Retrieval
    ) -> Iterator[Any]:
        """One C-STORE per instance, as stored when the peer accepted its transfer syntax (or,
        uncompressed, any little endian one: pynetdicom converts those); decoded to (Explicit,
        else Implicit) VR Little Endian into a scratch file when the peer takes its SOP Class
        only uncompressed (PS3.4 C.4.2.3.1: the SCP may convert to a syntax the destination
        accepted), which goes once pynetdicom resumes this or closes it. The accepted
        contexts are read when each instance is sent: a C-MOVE has them once its
        sub-association is up. pynetdicom resumes this after each sub-operation, its
        C-STORE-RSP received."""
        retrieval.finished = not found  # pynetdicom answers no match without resuming this
        yield len(found)
        for inst in found:
            if event.is_cancelled:
                retrieval.cancel()
                yield CANCEL, None
                return
            before = len(retrieval.responses)
            # The C-STOREs' association lost, or the requestor asking to release this one
            # (release.py): failed, not sent.
            ended = retrieval.lost() or release_requested(event.assoc)
            to_send = _failed(inst) if ended else self._to_send(inst, retrieval)
            try:
                yield PENDING, to_send
            finally:  # sent (send_stored_files removed it), or given up: closed here
                remove_scratch(to_send)
            if conversion_failed(to_send):  # while it was sent: the association aborted
                retrieval.unsent += 1
            path = f"{inst.study_uid}/{inst.series_uid}/{inst.sop_instance_uid}"
            retrieval.count(path, retrieval.responses[before:])
        retrieval.finished = True

    def _to_send(self, inst: StoredInstance, retrieval: Retrieval) -> Dataset:
        """The data set of one C-STORE sub-operation, or _failed(inst) when it cannot be sent:
        the peer took no context for it, or the archive could not read or convert it
        (counted in retrieval.unsent, the archive's own failure)."""
        accepted = retrieval.accepted
        if not any(sop_class == inst.sop_class_uid for sop_class, _ in accepted):
            log.info("no context for %s of %s", inst.sop_class_uid, inst.sop_instance_uid)
            return _failed(inst)  # pynetdicom would find no context either; nothing read
        blobs = self.services.blobs
        path = blobs.local_path(inst.blob_key)
        target = conversion.target_syntax(inst, accepted)
        try:
            # Checked first: a file cut short was read leniently, sent as it was and counted
            # completed; one missing failed with an OSError of its own words.
            path = blobs.checked_path_blocking(inst)
            if target is None:
                return conversion.as_stored_for_peer(inst, path, accepted)
            return conversion.converted_for_peer(inst, path, target, self.services.scratch_dir)
        except LostBlobError as exc:  # missing or cut short: the line the HTTP answer logs
            log.error("%s", exc.log_message)
        except OSError as exc:  # converted: the blob read, or the scratch file written (disk full)
            log.error(
                "cannot read blob %s of %s%s: %s",
                path,
                inst.sop_instance_uid,
                "" if target is None else f", or write it converted in {self.services.scratch_dir}",
                exc,
            )
        except InvalidDicomError as exc:
            log.error("cannot read blob %s of %s: %s", path, inst.sop_instance_uid, exc)
        except TranscodeError as exc:
            log.error("cannot send %s uncompressed: %s", inst.sop_instance_uid, exc)
        except ValueError as exc:  # conversion.as_stored_for_peer: not re-encodable
            log.error("cannot send %s: %s", inst.sop_instance_uid, exc)
        except Exception:  # data no codec foresaw: this sub-operation fails, not the rest
            log.exception("cannot send %s", inst.sop_instance_uid)
        retrieval.unsent += 1
        return _failed(inst)

    def _matching_instances(self, event: Event) -> list[StoredInstance] | Dataset:
        """The instances a C-MOVE/C-GET identifier names, or the failure status to answer."""
        try:
            q = parse_retrieve(_identifier(event), _MODELS[event.request.AffectedSOPClassUID])
        except IdentifierError as exc:
            return status(exc.status, exc.message)
        except Exception as exc:
            return status(UNABLE_TO_PROCESS, f"cannot decode the identifier: {exc}")
        try:
            found = self._run(_locate(self.services, q), DIMSE_QUERY_TIMEOUT_S)
        except (DicomWebError, TimeoutError) as exc:
            return status(CANNOT_COUNT, f"matching failed: {exc}")
        if len(found) > MAX_RETRIEVE_INSTANCES:
            too_many = f"{len(found)} instances match; at most 65535 per request"
            return status(CANNOT_PERFORM, too_many)
        return found


def _failed(inst: StoredInstance) -> Dataset:
    """What a sub-operation that cannot be sent yields: the instance's UIDs and no File Meta
    Information, which pynetdicom's send_c_store refuses before sending anything (no
    Transfer Syntax UID to choose a context by). pynetdicom then counts a failed
    sub-operation done, and lists its SOP Instance UID as failed (PS3.4 C.4.2.1.4.2,
    C.4.3.1.3.2). Found by review: a result that is not a Dataset, yielded before, was
    counted failed but not done (every later response had one more remaining, the final one
    too), and listed as an empty UID."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_instance_uid
    return ds


def _with_comment(detail: str, answer: int | Dataset) -> str:
    """The audit detail of an operation answered `answer`, with why when it was refused: the
    Error Comment the peer was told, after the archive's own text (found by review: the
    export's EventOutcomeDescription of a refused C-STORE, C-MOVE or C-GET said only which
    instance or destination, not why)."""
    comment = str(answer.get("ErrorComment", "")) if isinstance(answer, Dataset) else ""
    return f"{detail}; {comment}" if detail and comment else detail or comment


# Where an event keeps its request's identifier as decoded (pynetdicom's own
# event.identifier kept its decoding too, in the event): a C-FIND's is read for its search
# and again for its audit detail, and one of up to DIMSE_MAX_IDENTIFIER_BYTES was decoded
# (inflated, when Deflated) twice.
_DECODED = "_dicomweb_identifier"


def _identifier(event: Event) -> Dataset:
    """The request's identifier decoded whole, or IdentifierError (identifier.decode), in
    place of pynetdicom's lenient event.identifier; decoded once per event."""
    kept = vars(event)
    ds = kept.get(_DECODED)
    if not isinstance(ds, Dataset):
        raw = getattr(event.request, "Identifier", None)
        syntax = event.context.transfer_syntax
        ds = decode(
            raw.getvalue() if raw is not None else b"",
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
            DIMSE_MAX_IDENTIFIER_BYTES,
        )
        kept[_DECODED] = ds
    return ds


def _identifier_text(event: Event) -> str:
    """The identifier's non-empty keys, for the audit trail."""
    try:
        ds = _identifier(event)
        return " ".join(f"{e.keyword}={e.value}" for e in ds if e.VR != "SQ" and e.value)[:1000]
    except Exception:  # an identifier that does not decode: its failure is audited anyway
        return ""


async def _locate(svc: Services, q: Query) -> list[StoredInstance]:
    """The stored instances an instance-level Query matches (same compiler as QIDO)."""
    by_study: dict[str, set[str]] = {}
    offset, count = 0, 0
    while count <= MAX_RETRIEVE_INSTANCES:
        sql_text, args = compile_search(replace(q, offset=offset))
        rows = await svc.index.search(sql_text, args)
        for row in rows[: q.limit]:
            by_study.setdefault(row["study_instance_uid"], set()).add(row["sop_instance_uid"])
        count += min(len(rows), q.limit)
        if len(rows) <= q.limit:
            break
        offset += q.limit
    found: list[StoredInstance] = []
    for study, sops in by_study.items():
        found += [i for i in await svc.index.locate(study) if i.sop_instance_uid in sops]
    return found


def _pairs(contexts: Sequence[PresentationContext]) -> set[tuple[str, str]]:
    """(SOP Class, transfer syntax) of the accepted presentation contexts over which we may
    send a C-STORE (we are their SCU: on a C-GET association, the storage contexts the
    requestor proposed with the SCP role for itself)."""
    return {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in contexts
        if cx.abstract_syntax is not None and cx.transfer_syntax and cx.as_scu
    }
