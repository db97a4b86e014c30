"""Settings from the environment: the timeouts of slow clients, the malloc arena limit."""

from __future__ import annotations

import os

import pytest

from dicomweb_server.config import (
    BODY_IDLE_TIMEOUT_S,
    MALLOC_ARENA_MAX,
    MALLOC_ARENA_MAX_MOST,
    SEND_STALL_TIMEOUT_S,
    ConfigError,
    Settings,
)


def test_timeouts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DICOMWEB_BODY_IDLE_TIMEOUT_S and DICOMWEB_SEND_STALL_TIMEOUT_S: positive, finite
    seconds (a fraction too); anything else is refused, naming the variable. `export`
    hands them to the worker processes of `serve --workers N`."""
    defaults = Settings.from_env({})
    assert (defaults.body_idle_timeout_s, defaults.send_stall_timeout_s) == (60.0, 60.0)
    assert (BODY_IDLE_TIMEOUT_S, SEND_STALL_TIMEOUT_S) == (60.0, 60.0)
    env = {"DICOMWEB_BODY_IDLE_TIMEOUT_S": "2.5", "DICOMWEB_SEND_STALL_TIMEOUT_S": "90"}
    s = Settings.from_env(env)
    assert (s.body_idle_timeout_s, s.send_stall_timeout_s) == (2.5, 90.0)
    for name in env:
        for bad in ("0", "-1", "nan", "inf", "soon", ""):
            with pytest.raises(ConfigError, match=f"{name} must be a positive number of sec"):
                Settings.from_env({name: bad})
    monkeypatch.setattr(os, "environ", {})
    s.export()
    assert Settings.from_env().body_idle_timeout_s == 2.5
    assert Settings.from_env().send_stall_timeout_s == 90.0


def test_malloc_arena_max_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MALLOC_ARENA_MAX (glibc's own variable) overrides the limit, 0 leaves glibc's default;
    `export` hands it to the worker processes, where glibc reads it as they start."""
    assert Settings.from_env({}).malloc_arena_max == MALLOC_ARENA_MAX == 2
    assert Settings.from_env({"MALLOC_ARENA_MAX": "0"}).malloc_arena_max == 0
    for bad in ("-1", "two"):
        with pytest.raises(ConfigError, match="MALLOC_ARENA_MAX"):
            Settings.from_env({"MALLOC_ARENA_MAX": bad})
    monkeypatch.setattr(os, "environ", {})
    Settings.from_env({"MALLOC_ARENA_MAX": "8"}).export()
    assert os.environ["MALLOC_ARENA_MAX"] == "8"
    assert Settings.from_env().malloc_arena_max == 8


def test_malloc_arena_max_fits_mallopt() -> None:
    """mallopt takes a C int: a larger MALLOC_ARENA_MAX is refused, not truncated. Before,
    4294967298 (2**32 + 2, which glibc itself takes as no practical limit) reached mallopt
    through ctypes as its low 32 bits: the server ran with 2 arenas."""
    most = str(MALLOC_ARENA_MAX_MOST)
    assert Settings.from_env({"MALLOC_ARENA_MAX": most}).malloc_arena_max == 2**31 - 1
    for bad in (str(MALLOC_ARENA_MAX_MOST + 1), str(2**32 + 2)):
        with pytest.raises(ConfigError, match=f"MALLOC_ARENA_MAX must be 0 to {most}"):
            Settings.from_env({"MALLOC_ARENA_MAX": bad})
