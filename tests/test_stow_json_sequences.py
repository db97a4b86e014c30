"""STOW-RS of metadata with sequences nested deep: at most MAX_JSON_SEQUENCE_DEPTH levels, a
bad value deep inside refused with a short reason in bounded memory (pydicom's writer
re-raises a failure in each enclosing sequence, doubling its message per level), a value of
ambiguous VR resolved as dcmwrite would, Group Lengths left unchecked as they are unwritten."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from dicomweb_server import stow_json
from dicomweb_server.dicomfile import InvalidInstanceError
from dicomweb_server.errors import FailureReason
from tests.helpers import inst_url, make_instance, values
from tests.stow_json_support import _body, _metadata, _post, _seq

pytestmark = pytest.mark.db


def test_a_bad_value_deep_in_sequences_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Found by fuzzing (tests/test_fuzz_stow_metadata.py): pydicom's writer wraps a failure
    in each enclosing sequence with the message and traceback so far, doubling it per level;
    a US value out of range 12 items deep took 4 GB, 13 killed the server. Now refused
    (0xC000) naming the element, in a few MB."""
    node: dict[str, Any] = {"vr": "SQ", "Value": [{"00280010": {"vr": "US", "Value": [70000]}}]}
    for _ in range(10):
        node = {"vr": "SQ", "Value": [{"00081140": node}]}
    doc = make_instance().to_json_dict()
    doc["00081140"] = node
    refused = _refused_in_bounded_memory(doc, tmp_path)
    assert "(0028,0010)" in refused.message and len(refused.message) < 400


def _refused_in_bounded_memory(doc: dict[str, Any], tmp_path: Path) -> InvalidInstanceError:
    """The refusal (0xC000) of assembling `doc`, which must take under 20 MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(InvalidInstanceError) as caught:
            stow_json._assemble(doc, {}, stow_json._Budget({}), tmp_path / "out.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak
    assert caught.value.reason == FailureReason.CANNOT_UNDERSTAND
    return caught.value


def _nested(levels: int, leaf: dict[str, Any]) -> dict[str, Any]:
    """A Referenced Image Sequence `levels` sequences deep, `leaf` the innermost item."""
    node: dict[str, Any] = {"vr": "SQ", "Value": [leaf]}
    for _ in range(levels - 1):
        node = {"vr": "SQ", "Value": [{"00081140": node}]}
    return node


async def test_sequences_nest_at_most_max_json_sequence_depth(
    app_client: httpx.AsyncClient,
) -> None:
    """Found by fuzzing: 250 levels of valid items overflowed pydicom's recursive writer, and
    its RecursionError, re-raised with the traceback so far at each level, took all memory.
    MAX_JSON_SEQUENCE_DEPTH levels are stored; one more fails that instance (0xC000)."""
    docs, instances = [], [make_instance() for _ in range(3)]
    depth = stow_json.MAX_JSON_SEQUENCE_DEPTH
    for ds, levels in zip(instances, [depth, depth + 1, 250], strict=True):
        doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
        doc["00081140"] = _nested(levels, {"00081150": {"vr": "UI", "Value": ["1.2.3"]}})
        docs.append(doc)
    parts = [(f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
             for ds in instances]  # fmt: skip
    r = await _post(app_client, _body(docs, *parts))
    assert r.status_code == 202, r.text
    (ok,) = _seq(r.json(), "00081199")
    assert values(ok, "00081155") == [instances[0].SOPInstanceUID]
    failed = _seq(r.json(), "00081198")
    assert [values(f, "00081197") for f in failed] == [[0xC000], [0xC000]]
    named = f"deeper than {depth} levels in (0008,1140) ReferencedImageSequence"
    assert r.headers["Warning"].count(named) == 2  # the sequence named (was the limit alone)
    assert (await app_client.get(inst_url(instances[1]) + "/metadata")).status_code == 404


@pytest.mark.parametrize(
    ("tag", "element"),
    [
        ("00091010", {"vr": "US or SS", "Value": [1]}),  # no rule resolves a private tag's
        ("00091010", {"vr": "OB or OW", "InlineBinary": "AAAA"}),
        ("00280106", {"vr": "US or SS", "Value": [70000]}),  # resolved to US, then too large
        ("00283006", {"vr": "US or OW", "Value": [1, 2]}),  # no LUT Descriptor to resolve it
    ],
)
def test_an_ambiguous_vr_deep_in_sequences_is_refused_in_bounded_memory(
    tmp_path: Path, tag: str, element: dict[str, Any]
) -> None:
    """Review of the check above: it skipped elements of an ambiguous VR (`US or SS`),
    leaving them to dcmwrite, whose failure deep in sequences took the doubling path again
    (150 MB at 10 levels, 4 GB at 13). Each is now resolved as dcmwrite would, then checked."""
    doc = make_instance().to_json_dict()
    doc["00081140"] = _nested(10, {tag: element})
    refused = _refused_in_bounded_memory(doc, tmp_path)
    assert f"({tag[:4]},{tag[4:]})" in refused.message, refused.message


async def test_an_ambiguous_vr_deep_in_sequences_is_resolved_from_its_ancestors(
    app_client: httpx.AsyncClient,
) -> None:
    """`US or SS` is still accepted where dcmwrite resolves it: from the Pixel Representation
    of the item or of an ancestor (PS3.5 Annex A), here the top level's (signed)."""
    ds = make_instance()
    ds.PixelRepresentation = 1
    doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
    doc["00081140"] = _nested(5, {"00280106": {"vr": "US or SS", "Value": [-5]}})
    parts = (f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
    r = await _post(app_client, _body([doc], parts))
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    item = meta["00081140"]["Value"][0]
    for _ in range(4):
        item = item["00081140"]["Value"][0]
    assert item["00280106"] == {"vr": "SS", "Value": [-5]}


def test_the_reason_names_a_vr_of_any_length_briefly(tmp_path: Path) -> None:
    """A DICOM JSON `vr` can be any string: the failure reason quotes at most 14 characters
    of it (a 100 KB `vr` made a 100 KB reason)."""
    doc = make_instance().to_json_dict()
    doc["00091010"] = {"vr": "X" * 100_000, "Value": [1]}
    with pytest.raises(InvalidInstanceError) as caught:
        stow_json._assemble(doc, {}, stow_json._Budget({}), tmp_path / "out.dcm")
    assert "(0009,1010) (VR XXXXXXXXXXXXXX...)" in caught.value.message
    assert len(caught.value.message) < 400, len(caught.value.message)


async def test_group_lengths_are_not_checked_as_they_are_not_written(
    app_client: httpx.AsyncClient,
) -> None:
    """Review of the per-element check: it also encoded the retired Group Lengths (gggg,0000)
    of groups above 6, which pydicom's writer leaves out (PS3.5 7.2), and so refused data sets
    stored before for a value that is never written."""
    ds = make_instance()
    doc = _metadata(ds, f"u:{ds.SOPInstanceUID}")
    doc["00100000"] = {"vr": "UL", "Value": [-1]}
    doc["00081140"] = _nested(2, {"00080000": {"vr": "XX", "Value": [1]}})
    parts = (f"u:{ds.SOPInstanceUID}", "application/octet-stream", ds.PixelData)
    r = await _post(app_client, _body([doc], parts))
    assert r.status_code == 200, r.text
    (meta,) = (await app_client.get(f"{inst_url(ds)}/metadata")).json()
    assert "00100000" not in meta and "00080000" not in meta["00081140"]["Value"][0]
