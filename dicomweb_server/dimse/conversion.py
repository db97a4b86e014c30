"""The transfer syntaxes of C-MOVE/C-GET sub-operations: the presentation contexts a C-MOVE
sub-association proposes, the syntax each instance is sent in, and the instance converted to
a little endian syntax the peer took when it did not take the stored one (decoded, or
uncompressed written in the other little endian syntax: into a scratch file a frame, or a
chunk, at a time, conversions taking turns a frame at a time, sent from it as it is written,
streaming.py)."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext, build_context

from dicomweb_server.blobstore.files import scratch_file
from dicomweb_server.config import MAX_PART_BYTES
from dicomweb_server.dimse.sending import StoredFile
from dicomweb_server.dimse.streaming import Growing
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.reservations import Reservations
from dicomweb_server.transcode.codecs import TranscodeError, decodable
from dicomweb_server.transcode.convert import to_transfer_syntax
from dicomweb_server.transcode.frames import decoded_bytes, read_stored
from dicomweb_server.transcode.writable import check_writable

__all__ = [
    "DIMSE_CONVERTED_MAX_BYTES",
    "DIMSE_CONVERTING_MAX_BYTES",
    "DIMSE_DECODE_MAX_BYTES",
    "as_stored_for_peer",
    "contexts",
    "converted_for_peer",
    "decoded_at_once",
    "target_syntax",
]

log = logging.getLogger(__name__)

# Bytes a conversion for a C-MOVE/C-GET peer that did not take the stored syntax holds at
# once (decoded_at_once): a decoded frame, the instance being converted a frame at a time
# into a scratch file (converted_for_peer); the whole instance where it is converted in
# memory (Deflated, compressed 1-bit pixels, no Pixel Data); for uncompressed pixels copied
# into the other little endian syntax (or swapped from big endian) in chunks of
# convert.CONVERT_COPY_BYTES, the rest of the file. More is a failed sub-operation. It
# bounded the instance's decoded size, held about 3.5 times over: a C-GET of a 125 MiB
# instance took the server from 103 to 571 MB; and a 240 MB Explicit VR Little Endian
# instance for a peer taking only Implicit VR, re-encoded whole by pynetdicom, from 103 to
# 847 MB.
DIMSE_DECODE_MAX_BYTES = 128 * 1024 * 1024
# Conversions take turns a frame (a chunk) at a time in a process (_DECODING, first come
# first served), not an instance at a time: a 1 GiB JPEG 2000 instance decodes at about
# 2.6 MiB/s here, and held the process's one conversion for 6 minutes, while another
# association's C-GET waited past the 30 s DIMSE timeout of a typical SCU. One frame is
# decoded at a time (about 6 times its size at its peak); a conversion waiting for its turn
# holds about 4 decoded frames (pydicom's decoder keeps the frame it gave, and its bytes;
# the frame being written). Measured with frames of 32 MiB: one conversion took the process
# 198 MB over idle, four at once 596 MB. Up to DIMSE_MAX_ASSOCIATIONS (10 by default)
# associations convert at once: of 128 MiB frames, about 5 GB. So conversions under way
# hold at most this many bytes at once between them (decoded_at_once each, reserved first
# come first served; _RESERVED): one of the largest frames runs alone, as all did before,
# and conversions of frames of usual sizes (CT's 0.5 MiB) all run, interleaved; at most
# about 6 times this is held (768 MB), as one conversion of such frames held before.
DIMSE_CONVERTING_MAX_BYTES = DIMSE_DECODE_MAX_BYTES
# The scratch file of one conversion grows to at most this many bytes (convert's
# max_bytes): the sub-operation fails before it begins when the decoded pixels alone would
# pass it, else, sent as it is written (streaming.py), its association is aborted as soon as
# a write would pass it (a header or trailing elements that large): the largest
# instance STOW takes in a part; a highly compressible instance of 10,000 frames of 8 MB
# decoded would have written 80 GB. WADO-RS converts to the same bound in effect: the
# 32-bit length of uncompressed Pixel Data (PS3.5 7.1.2), checked as each frame is written.
DIMSE_CONVERTED_MAX_BYTES = MAX_PART_BYTES


class _Turns:
    """A lock taken first come, first served: a thread that releases it and asks again at
    once goes behind those already waiting (a threading.Lock may be taken again by the
    thread that released it, frame after frame, while another waits)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._held = False

    @contextmanager
    def turn(self) -> Iterator[None]:
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                self._cond.wait_for(lambda: not self._held and self._queue[0] is me)
            finally:  # an exception while waiting leaves no place that blocks the rest
                self._queue.remove(me)
                self._cond.notify_all()
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


_DECODING = _Turns()
_RESERVED = Reservations(DIMSE_CONVERTING_MAX_BYTES)
# Presentation contexts of a C-MOVE sub-association (PS3.8 9.3.2.2: odd IDs 1 to 255).
_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Uncompressed syntaxes whose pixels a conversion copies (swaps) in chunks, undecoded.
_COPIED = (*_UNCOMPRESSED, ExplicitVRBigEndian)
# Values longer than this are read from the blob only when the data set is encoded to send.
_DEFER_BYTES = 1024


def contexts(found: list[StoredInstance]) -> list[PresentationContext]:
    """One context per stored (SOP Class, transfer syntax), so that each instance can go as
    stored whatever the destination prefers (pynetdicom picks an exact match first); after
    those, one fallback per SOP Class and kind: for uncompressed data the other little endian
    syntax, for data we can decode both little endian syntaxes (we convert either, see
    target_syntax). Data we cannot decode goes only as stored."""
    pairs = dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in found)
    as_stored = [(sop_class, (ts,)) for sop_class, ts in pairs]
    fallbacks: list[tuple[str, tuple[str, ...]]] = []
    for sop_class, ts in pairs:
        if ts in _UNCOMPRESSED:
            fallbacks.append((sop_class, tuple(s for s in _UNCOMPRESSED if s != ts)))
        elif _convertible(ts):
            fallbacks.append((sop_class, _UNCOMPRESSED))
    wanted = dict.fromkeys([*as_stored, *fallbacks])  # in order, without duplicates
    return [build_context(sop_class, list(ts)) for sop_class, ts in wanted][:_MAX_CONTEXTS]


def _convertible(transfer_syntax_uid: str) -> bool:
    """Decodable here to Explicit VR Little Endian for a C-STORE sub-operation (big endian
    included: converted_dataset re-encodes every element)."""
    return decodable(transfer_syntax_uid)


def _decoded_size(inst: StoredInstance, frames: int | None = None) -> int | None:
    """Bytes of the instance's pixels decoded (of `frames` frames, else all), from the Image
    Pixel attributes; None when they are not all known."""
    dims = (inst.rows, inst.columns, inst.samples_per_pixel, inst.bits_allocated)
    if any(d is None for d in dims):
        return None
    rows, columns, samples, bits = cast(tuple[int, int, int, int], dims)
    return decoded_bytes(rows, columns, samples, bits, frames or inst.number_of_frames)


def decoded_at_once(inst: StoredInstance) -> int | None:
    """Bytes the conversion of `inst` to the other little endian syntax holds at once, as
    to_transfer_syntax converts it: a decoded frame; all of its pixels when it converts the
    instance in memory (Deflated, compressed 1-bit); for uncompressed pixels, copied (or
    swapped from big endian) in chunks, the rest of the file (its header, read whole), or
    the file when no pixels are described (then converted in memory if it has none; 1-bit
    big endian always). None: not known (Image Pixel attributes missing)."""
    ts = inst.transfer_syntax_uid
    whole = _decoded_size(inst)
    if ts in _COPIED:
        if whole is None or (ts == ExplicitVRBigEndian and inst.bits_allocated == 1):
            return inst.size_bytes
        stored = -(-whole // 8) if inst.bits_allocated == 1 else whole  # 1-bit: packed
        return max(inst.size_bytes - stored, 0)
    if ts == DeflatedExplicitVRLittleEndian or inst.bits_allocated == 1:
        return whole
    return _decoded_size(inst, 1)


def converted_for_peer(
    inst: StoredInstance, path: Path, target: str, scratch_dir: Path
) -> StoredFile:
    """The instance converted to `target` for a peer, into a scratch file in `scratch_dir`
    written a frame (or a chunk of uncompressed pixels) at a time (to_transfer_syntax, as
    WADO-RS converts an instance) in a thread of its own, sent from it a PDU at a time as it
    is written (streaming.py: returned once its header is, the first frame decoded) and
    removed once sent (sending.send_stored_files). Only when it holds at most
    DIMSE_DECODE_MAX_BYTES at once (decoded_at_once); conversions take turns a frame at a
    time (_DECODING), those under way holding at most DIMSE_CONVERTING_MAX_BYTES between
    them (_RESERVED); the scratch file is at most DIMSE_CONVERTED_MAX_BYTES, its pixels
    checked before it begins. A failure before the header is written is raised here."""
    size = decoded_at_once(inst)
    if size is None or size > DIMSE_DECODE_MAX_BYTES:
        raise TranscodeError(
            f"it would be {size if size is not None else 'of unknown size'} bytes decoded"
            f" at once; at most {DIMSE_DECODE_MAX_BYTES} are decoded for a DIMSE peer"
        )
    pixels = _decoded_size(inst) or 0
    if pixels > DIMSE_CONVERTED_MAX_BYTES:  # else it fails mid-way, the association aborted
        raise TranscodeError(
            f"converted, it would be more than {DIMSE_CONVERTED_MAX_BYTES} bytes, the most"
            " written for it"
        )
    made = scratch_file(scratch_dir, ".dcm")
    growing = Growing(made)

    def convert() -> None:
        try:
            with _RESERVED.reserve(size):
                to_transfer_syntax(
                    path,
                    made,
                    target,
                    growing.stepping(_DECODING.turn),
                    max_bytes=DIMSE_CONVERTED_MAX_BYTES,
                    watch=growing,
                )
        except BaseException as exc:  # the file goes, then the sender is told
            try:
                made.unlink(missing_ok=True)
            except OSError as gone:  # the sender is told all the same, else it waits forever
                log.error("cannot remove the scratch file %s: %s", made, gone)
            growing.finish(exc)
        else:
            growing.finish()

    name = f"{threading.current_thread().name}/convert"  # the association's, for its logs
    try:
        # In the try: a thread that cannot start (RuntimeError) leaves no scratch file.
        threading.Thread(target=convert, name=name, daemon=True).start()
        growing.wait_header()
    except BaseException:
        growing.cancel()
        made.unlink(missing_ok=True)
        raise
    return StoredFile(made, inst.sop_class_uid, inst.sop_instance_uid, growing=growing)


def as_stored_for_peer(inst: StoredInstance, path: Path, accepted: set[tuple[str, str]]) -> Dataset:
    """The stored instance for a peer that took its syntax (target_syntax None), sent from
    its file (a StoredFile); read, when pydicom read a data set its syntax says is explicit
    VR as implicit VR, its elements given VRs before pynetdicom encodes it: pydicom's writer
    re-raises a value it cannot write in each enclosing sequence, doubling the message per
    level (1 GB twelve items deep), so such a value is a ValueError naming it first
    (writable.check_writable), in bounded memory; so are sequences nested too deep to
    re-encode. A file pydicom cannot read for the depth of its sequences is a
    TranscodeError (frames.read_stored). When the peer took no little endian syntax for the
    SOP Class (target_syntax), pynetdicom sends uncompressed data only in Deflated Explicit
    VR Little Endian, re-encoded in memory (else it finds no context and the sub-operation
    fails): checked as Explicit VR."""
    ds = read_stored(path, defer_size=_DEFER_BYTES)
    taken = (inst.sop_class_uid, inst.transfer_syntax_uid) in accepted
    # Not taken: deflated by pynetdicom. Taken and read without VRs: given VRs to be sent.
    if not taken or _read_without_vrs(ds):
        check_writable(ds)
    elif _describes(getattr(ds, "file_meta", Dataset()), inst):
        return StoredFile(path, inst.sop_class_uid, inst.sop_instance_uid)
    return ds


def _describes(file_meta: Dataset, inst: StoredInstance) -> bool:
    """Whether a stored file's File Meta Information names the instance as the index does:
    pynetdicom takes the SOP Class, SOP Instance and transfer syntax of a data set sent from
    its file from there (the context is chosen by them)."""
    named = (
        file_meta.get("MediaStorageSOPClassUID"),
        file_meta.get("MediaStorageSOPInstanceUID"),
        file_meta.get("TransferSyntaxUID"),
    )
    return named == (inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax_uid)


def _read_without_vrs(ds: Dataset) -> bool:
    """Whether pydicom read a data set its transfer syntax says is explicit VR as implicit VR,
    as it does when it finds one (pydicom's SC_rgb_jpeg.dcm): its elements have no VR, and
    pynetdicom's encoding in that syntax failed ("encoding without a string argument")."""
    return ds.original_encoding == (False, True) and any(
        isinstance(raw, RawDataElement) and raw.VR is None
        for raw in (ds.get_item(tag, keep_deferred=True) for tag in ds.keys())
    )


def target_syntax(inst: StoredInstance, accepted: set[tuple[str, str]]) -> str | None:
    """None: send the instance as stored (its syntax accepted, or nothing of its SOP Class
    accepted in little endian: that sub-operation fails unless its own syntax was). Explicit
    VR Little Endian, or Implicit VR Little Endian when only that was accepted: the peer
    did not take the stored syntax, and it can be decoded here or is uncompressed (the
    other little endian syntax, big endian). The converted file is sent as it is, in a
    syntax the peer accepted: pynetdicom re-encoded a data set read whole into the other
    little endian syntax in memory, several times its size."""
    syntaxes = {ts for sop_class, ts in accepted if sop_class == inst.sop_class_uid}
    stored = inst.transfer_syntax_uid
    little_endian = syntaxes.intersection(_UNCOMPRESSED)
    if stored in syntaxes or not little_endian or not _convertible(stored):
        return None
    return (
        ExplicitVRLittleEndian
        if ExplicitVRLittleEndian in little_endian
        else ImplicitVRLittleEndian
    )
