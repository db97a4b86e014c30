"""Invalid element values are stored as sent (conformance/STATEMENT.md, STOW-RS): values pydicom
could not describe as DICOM JSON refused the whole instance with pydicom's words."""

from __future__ import annotations

import struct
from typing import Any

import httpx
import pydicom
import pytest
from starlette.applications import Starlette

from tests.helpers import ROOT, inst_url, make_instance, multipart_body, stow_headers
from tests.test_deep_sequences import deep_part10, element

pytestmark = pytest.mark.db

_DIMENSION_INDEX_POINTER = 0x00209165  # AT
_LUT_DESCRIPTOR, _LUT_DATA = 0x00283002, 0x00283006


async def _stored_item(
    client: httpx.AsyncClient, app: Starlette, leaf: bytes, implicit: bool
) -> dict[str, Any]:
    """`leaf` (elements) in an item of (0008,1140), STOWed as Part 10: the item's metadata,
    after checking the stored file is the one sent and converts (Explicit VR Little Endian,
    the default of a retrieve)."""
    ds = make_instance()
    data = deep_part10(ds, 1, implicit, False, leaf)
    r = await client.post(f"{ROOT}/studies", content=multipart_body([data]),
                          headers=stow_headers())  # fmt: skip
    assert r.status_code == 200, r.headers.get("Warning")
    (inst,) = await app.state.services.index.locate(str(ds.StudyInstanceUID), None, None)
    assert app.state.services.blobs.local_path(inst.blob_key).read_bytes() == data
    converted = await client.get(
        inst_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert converted.status_code == 200, converted.text
    meta = (await client.get(f"{inst_url(ds)}/metadata")).json()[0]
    (item,) = meta["00081140"]["Value"]
    assert isinstance(item, dict)
    return item


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    ("value", "tags"),
    [
        (b"\x18\x00\x63\x10\x00\x00", ["00181063"]),  # 6 bytes: was refused
        (b"\x18\x00\x63\x10\x20\x00\x00\x01\x00\x00", ["00181063", "00200100"]),
        (b"\x18\x00\x63\x10", ["00181063"]),
    ],
)
async def test_an_at_value_not_a_multiple_of_4_bytes_is_stored_as_sent(
    app_client: httpx.AsyncClient, app: Starlette, implicit: bool, value: bytes, tags: list[str]
) -> None:
    """PS3.5 6.2: an AT value is 4 bytes a tag. One of 6 bytes was refused, 0xC000 "cannot
    parse the data set: unsupported format string passed to MultiValue.__format__" (pydicom
    read it as a list within a list); it is stored, its metadata the whole tags it holds."""
    leaf = element(_DIMENSION_INDEX_POINTER, b"AT", value, implicit)
    item = await _stored_item(app_client, app, leaf, implicit)
    assert item["00209165"] == {"vr": "AT", "Value": tags}


@pytest.mark.parametrize(
    ("descriptor", "vr"),
    [
        (None, "OW"),  # was refused: "Failed to resolve ambiguous VR"
        (struct.pack("<H", 1), "US"),  # one value: pydicom could not index it
        (struct.pack("<3H", 1, 0, 16), "US"),  # one entry (PS3.3 C.11.1.1.1)
        (struct.pack("<3H", 3, 0, 16), "OW"),
    ],
)
async def test_implicit_vr_lut_data_is_stored_whatever_its_descriptor(
    app_client: httpx.AsyncClient, app: Starlette, descriptor: bytes | None, vr: str
) -> None:
    """LUT Data (0028,3006) is "US or OW": read with implicit VR, pydicom takes its VR from the
    LUT Descriptor of its item and refused the instance without one. Now it is OW then."""
    lut = struct.pack("<3H", 1, 2, 3)
    leaf = element(_LUT_DATA, b"", lut, True)
    if descriptor is not None:
        leaf = element(_LUT_DESCRIPTOR, b"", descriptor, True) + leaf
    item = await _stored_item(app_client, app, leaf, True)
    assert item["00283006"]["vr"] == vr
    if vr == "US":
        assert item["00283006"]["Value"] == [1, 2, 3]
    else:
        assert item["00283006"]["InlineBinary"] == "AQACAAMA"  # the bytes as sent


def test_pydicom_still_refuses_what_the_hook_resolves() -> None:
    """The hook is what resolves it (dicomfile.configure_pydicom installs it): without it,
    pydicom raises for LUT Data in an item with no LUT Descriptor."""
    from pydicom.hooks import hooks, raw_element_vr

    from dicomweb_server.dicom_json import lut_data_vr

    data = deep_part10(make_instance(), 1, True, False, element(_LUT_DATA, b"", b"\1\0", True))
    hooks.register_callback("raw_element_vr", raw_element_vr)
    try:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        with pytest.raises(AttributeError, match="Failed to resolve ambiguous VR"):
            ds[0x00081140].value[0][_LUT_DATA]
    finally:
        hooks.register_callback("raw_element_vr", lut_data_vr)
