"""`iccprofile` (PS3.18 8.3.5.1.5) meeting the media type and the profile: the media type
chosen to carry a profile. Through the app, on real samples."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dicomweb_server.errors import BadRequestError, NotAcceptableError
from dicomweb_server.media.mediatypes import accept_then
from dicomweb_server.rendered import negotiate_rendered
from tests.test_rendered_icc import (
    JPEG,
    decoded,
    is_srgb,
    store,
    swapped_profile,
    variant,
)

pytestmark = pytest.mark.db


def test_negotiation_passes_over_gif_for_a_profile() -> None:
    """An `iccprofile` value other than "no" chooses the first acceptable type that can embed
    a profile: `image/gif, image/png` was a GIF, then a 400 for the GIF."""
    for wanted in ("yes", "srgb", "no,yes", "adobergb,srgb"):
        assert negotiate_rendered("image/gif, image/png", wanted) == "image/png"
        assert negotiate_rendered("image/gif, image/jpeg;q=0.5", wanted) == "image/jpeg"
        assert negotiate_rendered("image/gif, image/*", wanted) == "image/jpeg"
        # the `accept` query parameter's types first, then the header's (PS3.18 8.7.8.1)
        assert negotiate_rendered(accept_then("image/gif", "image/png"), wanted) == "image/png"
    for unwanted in (None, "no", "no,no"):
        assert negotiate_rendered("image/gif, image/png", unwanted) == "image/gif"
    with pytest.raises(BadRequestError) as refused:
        negotiate_rendered("image/gif, text/html", "yes")
    assert "image/gif cannot embed an ICC profile" in refused.value.message
    assert "image/jpeg and image/png can" in refused.value.message
    with pytest.raises(NotAcceptableError):
        negotiate_rendered("text/html", "yes")


async def test_profile_asked_of_gif_and_png(app_client: httpx.AsyncClient, samples: Path) -> None:
    """Through the app: the PNG with the instance's profile, the GIF without one."""
    profile = swapped_profile()
    url = await store(app_client, variant(samples, ICCProfile=profile))
    both = {"Accept": "image/gif, image/png"}
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers=both)
    assert decoded(r, "image/png").info["icc_profile"] == profile
    r = await app_client.get(
        url, params={"iccprofile": "srgb", "accept": "image/gif"}, headers=JPEG
    )
    assert is_srgb(decoded(r, "image/jpeg").info["icc_profile"])
    r = await app_client.get(url, params={"iccprofile": "no"}, headers=both)
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    r = await app_client.get(url, params={"iccprofile": "yes"}, headers={"Accept": "image/gif"})
    assert r.status_code == 400 and "image/jpeg and image/png can" in r.json()["message"]
