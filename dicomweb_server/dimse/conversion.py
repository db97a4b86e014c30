"""The transfer syntaxes of C-MOVE/C-GET sub-operations: the presentation contexts a C-MOVE
sub-association proposes, the syntax each instance is sent in, and the instance converted to
a little endian syntax the peer took when it did not take the stored one (decoded, or
uncompressed written in the other little endian syntax: into a scratch file a frame, or a
chunk, at a time, one conversion at a time, then sent from it as a stored instance is)."""

from __future__ import annotations

import threading
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
from dicomweb_server.dimse.sending import StoredFile
from dicomweb_server.index.rows import StoredInstance
from dicomweb_server.transcode.codecs import TranscodeError, decodable
from dicomweb_server.transcode.convert import check_writable, to_transfer_syntax
from dicomweb_server.transcode.frames import decoded_bytes, read_stored

__all__ = [
    "DIMSE_DECODE_MAX_BYTES",
    "as_stored_for_peer",
    "contexts",
    "converted_for_peer",
    "decoded_at_once",
    "target_syntax",
]

# Bytes a conversion for a C-MOVE/C-GET peer that did not take the stored syntax holds at
# once (decoded_at_once): a decoded frame, the instance being converted a frame at a time
# into a scratch file (converted_for_peer); the whole instance where it is converted in
# memory (Deflated, compressed 1-bit pixels, no Pixel Data); for uncompressed pixels copied
# into the other little endian syntax (or swapped from big endian) in chunks of
# convert.CONVERT_COPY_BYTES, the rest of the file. More is a failed sub-operation. One
# conversion runs at a time in a process (_DECODING): memory holds a few times this (about
# 6 decoded frames at the conversion's peak), however large the instance. It bounded the
# instance's decoded size, held about 3.5 times over: a C-GET of a 125 MiB instance took
# the server from 103 to 571 MB; and a 240 MB Explicit VR Little Endian instance for a peer
# taking only Implicit VR, re-encoded whole by pynetdicom, from 103 to 847 MB.
DIMSE_DECODE_MAX_BYTES = 128 * 1024 * 1024
_DECODING = threading.Lock()
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
    WADO-RS converts an instance), to be sent from it a PDU at a time as a stored instance
    is and removed once sent (sending.send_stored_files). One conversion at a time in the
    process, and only when it holds at most DIMSE_DECODE_MAX_BYTES at once
    (decoded_at_once)."""
    size = decoded_at_once(inst)
    if size is None or size > DIMSE_DECODE_MAX_BYTES:
        raise TranscodeError(
            f"it would be {size if size is not None else 'of unknown size'} bytes decoded"
            f" at once; at most {DIMSE_DECODE_MAX_BYTES} are decoded for a DIMSE peer"
        )
    made = scratch_file(scratch_dir, ".dcm")
    try:
        with _DECODING:
            to_transfer_syntax(path, made, target)
    except BaseException:
        made.unlink(missing_ok=True)
        raise
    return StoredFile(made, inst.sop_class_uid, inst.sop_instance_uid, scratch=True)


def as_stored_for_peer(inst: StoredInstance, path: Path, accepted: set[tuple[str, str]]) -> Dataset:
    """The stored instance for a peer that took its syntax (target_syntax None), sent from
    its file (a StoredFile); read, when pydicom read a data set its syntax says is explicit
    VR as implicit VR, its elements given VRs before pynetdicom encodes it: pydicom's writer
    re-raises a value it cannot write in each enclosing sequence, doubling the message per
    level (1 GB twelve items deep), so such a value is a ValueError naming it first
    (convert.check_writable), in bounded memory; so are sequences nested too deep to
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
