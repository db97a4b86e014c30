"""pydicom's decoders called: with the plugin preferred for a transfer syntax, then with
pydicom's own choice (decoded), libjpeg-turbo last for JPEG (fallback, registered here);
what decoding, converting or encoding may raise on a malformed file (DECODE_ERRORS), a Rust
codec's panic included (CodecPanicError, unpanicked)."""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from typing import TypeVar

from pydicom.pixels.decoders.base import get_decoder

from dicomweb_server.transcode.fallback import register_fallback

__all__ = [
    "DECODE_ERRORS",
    "PREFERRED_DECODERS",
    "CodecPanicError",
    "decoded",
    "decoding_plugin",
    "unpanicked",
]

# libjpeg-turbo after pydicom's own JPEG decoders, tried when they all fail on a frame: every
# module of the pixel layer that decodes imports this one first.
register_fallback()


class _PluginFailures(logging.Filter):
    """pydicom logs each decoding plugin that fails on a frame at ERROR, traceback and all,
    before it tries the next (pydicom 3.0 DecodeRunner): a frame the fallback decodes left
    two tracebacks in the server's log (found live). Those records are dropped: when every
    plugin fails, pydicom raises with each one's message, and that is answered or logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_PluginFailures())


# Decoder plugins preferred where pydicom offers several: for JPEG-LS, pyjpegls (CharLS)
# decodes a 512 x 512 16-bit frame in about 9 ms; left to choose, pydicom took 38-100 ms
# (pylibjpeg's libjpeg). Used only when installed; the result is the same array.
PREFERRED_DECODERS = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}


@functools.lru_cache(maxsize=64)
def decoding_plugin(transfer_syntax_uid: str) -> str:
    """The pydicom decoding plugin to ask for: the preferred one if installed, else ""
    (pydicom's own choice)."""
    plugin = PREFERRED_DECODERS.get(transfer_syntax_uid, "")
    try:
        available = get_decoder(transfer_syntax_uid).available_plugins
    except (NotImplementedError, ValueError):
        return ""
    return plugin if plugin in available else ""


# What decoding, converting or encoding the pixels of a stored file may raise when the file is
# malformed (pydicom and the codecs assume well-formed input: a damaged offset table raises
# StopIteration, an absurd Number of Frames a MemoryError from numpy's allocation): the
# instance cannot be converted, a 4xx or an icon, never a 500.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    NotImplementedError,
    RuntimeError,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    StopIteration,
    MemoryError,
    OverflowError,
    EOFError,
    struct.error,
)
_T = TypeVar("_T")


class CodecPanicError(RuntimeError):
    """A codec written in Rust panicked (one of DECODE_ERRORS, as RuntimeError)."""


def unpanicked(call: Callable[[], _T]) -> _T:
    """`call()`, a Rust codec's panic raised as CodecPanicError. pylibjpeg-rle's decoder
    panics on RLE segments longer than Rows x Columns says (an index out of bounds), and pyo3
    raises a panic as `pyo3_runtime.PanicException`, which derives from BaseException, not
    Exception: it passed every `except` for decoder errors, and the server's own 500 handler,
    and reached hypercorn, which answered a bare 500. Each pyo3 extension makes its own
    PanicException class, none importable: it is known by its name."""
    try:
        return call()
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit, cancellation
        raise CodecPanicError(f"the codec failed on this data ({exc})") from None


def decoded(transfer_syntax_uid: str, decode: Callable[[str], _T]) -> _T:
    """`decode(plugin)` with the preferred plugin; if that one fails, again with pydicom's own
    choice among all installed (naming a plugin makes pydicom try that one only), which for
    JPEG ends with the fallback's libjpeg-turbo. A codec's panic is a CodecPanicError
    (unpanicked)."""
    plugin = decoding_plugin(transfer_syntax_uid)
    if plugin:
        try:
            return unpanicked(lambda: decode(plugin))
        except DECODE_ERRORS:
            pass
    return unpanicked(lambda: decode(""))
