"""The DIMSE statuses the handlers answer with or record in the audit trail, and the status
data set that carries one with its Error Comment."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from dicomweb_server.dimse.identifier import ERROR_COMMENT_MAX_CHARS

__all__ = [
    "CANCEL",
    "CANNOT_COUNT",
    "CANNOT_PERFORM",
    "DATA_SET_DOES_NOT_MATCH",
    "DESTINATION_UNKNOWN",
    "OUT_OF_RESOURCES",
    "PENDING",
    "PENDING_KEYS_UNSUPPORTED",
    "PROCESSING_FAILURE",
    "SOME_FAILED",
    "SOP_CLASS_NOT_SUPPORTED",
    "UNFINISHED",
    "status",
]

# PS3.4 Table C.4-1..3: the C-FIND/C-MOVE/C-GET statuses the handlers answer with.
PENDING = 0xFF00
# PS3.4 Table C.4-1: Pending, Warning that one or more Optional Keys were not supported for
# existence and/or matching for this Identifier.
PENDING_KEYS_UNSUPPORTED = 0xFF01
CANCEL = 0xFE00
DESTINATION_UNKNOWN = 0xA801  # PS3.4 C.4.2.1.5: Refused: Move Destination unknown
# PS3.4 C.4.1.1.4 / C.4.2.1.5: Refused: Out of Resources (the index did not answer in time).
OUT_OF_RESOURCES = 0xA700
# PS3.4 C.4.2.1.5 / C.4.3.1.4: Refused: Out of Resources - Unable to calculate number of
# matches / Unable to perform sub-operations (more than MAX_RETRIEVE_INSTANCES match, or every
# sub-operation failed).
CANNOT_COUNT = 0xA701
CANNOT_PERFORM = 0xA702
# PS3.4 C.4.2.1.5 / C.4.3.1.4: Warning: Sub-operations Complete - One or more Failures or
# Warnings.
SOME_FAILED = 0xB000
# The outcome recorded for an operation whose association ended before its final response
# (a C-FIND, C-MOVE or C-GET, or a C-STORE never served): Pending, the last status it had.
UNFINISHED = PENDING
# PS3.7 C.4.2: Processing failure (an unexpected error while storing).
PROCESSING_FAILURE = 0x0110
# PS3.4 Table B.2-1: Error: Data Set does not match SOP Class.
DATA_SET_DOES_NOT_MATCH = 0xA900
# PS3.7 9.1.1.1.9 and Annex C: Refused: SOP Class not supported (a C-STORE of a SOP Class
# other than its presentation context's, stores.refusal).
SOP_CLASS_NOT_SUPPORTED = 0x0122


def status(code: int, comment: str = "") -> Dataset:
    """A status data set; Error Comment (0000,0902) is LO: 64 characters, no backslash."""
    ds = Dataset()
    ds.Status = code
    if comment:
        text = re.sub(r"[^\x20-\x5b\x5d-\x7e]", "?", comment)
        ds.ErrorComment = text[:ERROR_COMMENT_MAX_CHARS]
    return ds
