"""Settings from the environment: the timeouts of slow clients."""

from __future__ import annotations

import os

import pytest

from dicomweb_server.config import BODY_IDLE_TIMEOUT_S, ConfigError, Settings


def test_timeouts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DICOMWEB_BODY_IDLE_TIMEOUT_S: positive, finite seconds (a fraction too); anything
    else is refused, naming the variable. `export` hands it to the worker processes of
    `serve --workers N`."""
    assert Settings.from_env({}).body_idle_timeout_s == BODY_IDLE_TIMEOUT_S == 60.0
    env = {"DICOMWEB_BODY_IDLE_TIMEOUT_S": "2.5"}
    s = Settings.from_env(env)
    assert s.body_idle_timeout_s == 2.5
    for name in env:
        for bad in ("0", "-1", "nan", "inf", "soon", ""):
            with pytest.raises(ConfigError, match=f"{name} must be a positive number of sec"):
                Settings.from_env({name: bad})
    monkeypatch.setattr(os, "environ", {})
    s.export()
    assert Settings.from_env().body_idle_timeout_s == 2.5
