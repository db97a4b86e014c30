"""errors.original_os_error: the OSError an exception stands for, through pydicom's re-raising."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from pydicom.tag import Tag, tag_in_exception

from dicomweb_server.errors import original_os_error


def _raised(make: Callable[[], None]) -> BaseException:
    try:
        make()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def _full_disk() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _in_nested_items() -> None:
    """As pydicom's writer meets it two sequences deep: re-raised once per enclosing level,
    each an OSError of its message alone (no errno) raised from the one before."""
    with tag_in_exception(Tag(0x00081140)), tag_in_exception(Tag(0x00081155)):
        _full_disk()


def test_an_os_error_with_an_errno_is_its_own() -> None:
    exc = _raised(_full_disk)
    assert original_os_error(exc) is exc


def test_pydicom_re_raised_errors_give_the_one_they_came_from() -> None:
    exc = _raised(_in_nested_items)
    assert isinstance(exc, OSError) and exc.errno is None and exc.strerror is None
    original = original_os_error(exc)
    assert original is not None and original is not exc
    assert (original.errno, original.strerror) == (errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_errno() -> None:
    raise OSError("no errno")


def _from_a_value_error() -> None:
    raise OSError("no errno") from ValueError("not an I/O error")


def _handled_then_another() -> None:
    try:
        _full_disk()
    except OSError:
        raise OSError("another failure, met while handling the first")  # noqa: B904


def _no_os_error() -> None:
    raise ValueError("not an I/O error")


@pytest.mark.parametrize(
    "make",
    # __context__ alone (_handled_then_another): a different error, not the one it stands for
    [_no_errno, _from_a_value_error, _handled_then_another, _no_os_error],
)
def test_none_without_an_os_error_that_has_an_errno(make: Callable[[], None]) -> None:
    assert original_os_error(_raised(make)) is None


def test_none_for_none() -> None:
    assert original_os_error(None) is None
