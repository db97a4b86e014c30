"""The Part-10 file layout read without pydicom: where the File Meta Information ends.

PS3.10 7.1 (the preamble, "DICM" and the File Meta Information) and PS3.5 7.1.2 (explicit VR
element headers).
"""

from __future__ import annotations

import struct

__all__ = [
    "FILE_META_MAX_BYTES",
    "LONG_LENGTH_VRS",
    "file_meta_end",
]

# PS3.5 7.1.2: the VRs whose explicit length is 4 bytes after 2 reserved ones.
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

# PS3.10 7.1: a Part-10 file is a 128-byte preamble, "DICM", then the File Meta Information,
# group 0002 in explicit VR little endian. Real meta information is a few hundred bytes; one
# that does not end within this many is not looked into (FileMeta gives up).
FILE_META_MAX_BYTES = 64 * 1024
_META_AT = 132


def file_meta_end(head: bytes | bytearray) -> tuple[int, bytes] | None:
    """Where the File Meta Information of a Part-10 file beginning with `head` ends, walked
    element by element (its group length is not trusted), and its Transfer Syntax UID value
    as written. None when `head` is too short to tell; (0, b"") when it is not a Part-10
    header or its meta information is malformed or longer than FILE_META_MAX_BYTES."""
    if len(head) < _META_AT:
        return None
    if head[128:_META_AT] != b"DICM":
        return 0, b""
    pos, syntax = _META_AT, b""
    while pos <= FILE_META_MAX_BYTES:
        if len(head) < pos + 8:
            return None
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return pos, syntax
        vr = bytes(head[pos + 4 : pos + 6])
        if not vr.isalpha():
            return 0, b""
        if vr in LONG_LENGTH_VRS:
            if len(head) < pos + 12:
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            value_at = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            value_at = pos + 8
        if elem == 0x0010:
            if len(head) < value_at + length:
                return None
            syntax = bytes(head[value_at : value_at + length])
        pos = value_at + length
    return 0, b""
