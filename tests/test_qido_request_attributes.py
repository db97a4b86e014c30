"""QIDO-RS matching inside RequestAttributesSequence (PS3.18 Table 10.6.1-5, attribute paths
PS3.18 8.3.4.1, sequence matching PS3.4 C.2.2.2.6) through the app, against a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.helpers import ROOT, make_instance, multipart_body, stow_headers, to_bytes, values

pytestmark = pytest.mark.db

Json = dict[str, Any]
Params = dict[str, str] | list[tuple[str, str | int | float | bool | None]]
SPS = "RequestAttributesSequence.ScheduledProcedureStepID"
RP = "RequestAttributesSequence.RequestedProcedureID"


def request_attributes(*items: tuple[str | None, str | None]) -> list[Dataset]:
    """RequestAttributesSequence items from (ScheduledProcedureStepID, RequestedProcedureID)."""
    out = []
    for sps, rp in items:
        item = Dataset()
        if sps is not None:
            item.ScheduledProcedureStepID = sps
        if rp is not None:
            item.RequestedProcedureID = rp
        out.append(item)
    return out


@dataclass
class Archive:
    client: httpx.AsyncClient
    study: str
    # Series, by the name the tests use: a, b, c (study 1), d (study 2).
    series: dict[str, str]
    a_instances: tuple[str, str]

    async def search(self, path: str, params: Params) -> list[Json]:
        r = await self.client.get(f"{ROOT}{path}", params=params)
        assert r.status_code in (200, 204), r.text
        if r.status_code == 204:
            assert r.content == b""
            return []
        result: list[Json] = r.json()
        return result

    async def series_names(self, params: Params) -> list[str]:
        by_uid = {uid: name for name, uid in self.series.items()}
        found = await self.search("/series", params)
        return sorted(by_uid[str(values(s, "0020000E")[0])] for s in found)


@pytest.fixture
async def archive(app_client: httpx.AsyncClient) -> AsyncIterator[Archive]:
    study, other_study = generate_uid(), generate_uid()
    series = {name: str(generate_uid()) for name in "abcd"}
    a_items = request_attributes(("SPS-A1", "RP-A1"), ("SPS-A2", "RP-A2"), ("X%_1", "RP-9"))
    a1 = make_instance(study=study, series=series["a"], RequestAttributesSequence=a_items)
    a2 = make_instance(
        study=study, series=series["a"], InstanceNumber=2, RequestAttributesSequence=a_items
    )
    b = make_instance(
        study=study,
        series=series["b"],
        RequestAttributesSequence=request_attributes(("SPS-B1", "RP-A2")),
    )
    c = make_instance(study=study, series=series["c"])  # no RequestAttributesSequence
    d = make_instance(
        study=other_study,
        series=series["d"],
        RequestAttributesSequence=request_attributes((None, "RP-D")),
    )
    body = multipart_body([to_bytes(ds) for ds in (a1, a2, b, c, d)])
    r = await app_client.post(f"{ROOT}/studies", content=body, headers=stow_headers())
    assert r.status_code == 200, r.text
    yield Archive(app_client, study, series, (a1.SOPInstanceUID, a2.SOPInstanceUID))


async def test_single_value_matches_any_item(archive: Archive) -> None:
    assert await archive.series_names({SPS: "SPS-A2"}) == ["a"]  # the second item
    assert await archive.series_names({SPS: "X%_1"}) == ["a"]  # the third; % and _ literal
    assert await archive.series_names({RP: "RP-A2"}) == ["a", "b"]
    assert await archive.series_names({RP: "RP-D"}) == ["d"]  # an item without the other key
    assert await archive.series_names({SPS: "sps-a2"}) == []  # SH is case-sensitive
    assert await archive.series_names({SPS: "SPS-A"}) == []  # the whole value


async def test_keyword_and_tag_forms(archive: Archive) -> None:
    for key in (SPS, "00400275.00400009", "RequestAttributesSequence.00400009",
                "00400275.ScheduledProcedureStepID", "00400275.00400009".lower()):  # fmt: skip
        assert await archive.series_names({key: "SPS-A2"}) == ["a"], key
    for key in (RP, "00400275.00401001", "RequestAttributesSequence.00401001"):
        assert await archive.series_names({key: "RP-A2"}) == ["a", "b"], key


async def test_wildcards(archive: Archive) -> None:
    assert await archive.series_names({SPS: "SPS-A*"}) == ["a"]
    assert await archive.series_names({SPS: "SPS-?1"}) == ["a", "b"]
    assert await archive.series_names({SPS: "*1"}) == ["a", "b"]
    assert await archive.series_names({RP: "RP-?"}) == ["a", "d"]
    assert await archive.series_names({SPS: "X%_?"}) == ["a"]
    assert await archive.series_names({SPS: "X__1"}) == []  # `_` is not a wildcard
    assert await archive.series_names({SPS: "X%%1"}) == []  # nor is `%`
    assert await archive.series_names({SPS: "SPS-A?2"}) == []


async def test_no_match_is_204(archive: Archive) -> None:
    for params in ({SPS: "NOPE"}, {SPS: "NOPE*"}, {RP: "RP-Z"}):
        r = await archive.client.get(f"{ROOT}/series", params=params)
        assert r.status_code == 204 and r.content == b"", params


async def test_series_without_the_sequence(archive: Archive) -> None:
    everything = ["a", "b", "c", "d"]
    assert await archive.series_names({}) == everything
    # Universal matching (PS3.4 C.2.2.2.3): an empty value, or a lone `*`, keeps series with
    # no RequestAttributesSequence.
    assert await archive.series_names({SPS: ""}) == everything
    assert await archive.series_names({RP: "*"}) == everything
    assert await archive.series_names({SPS: "", RP: ""}) == everything
    # Any other value needs an item that has it.
    assert "c" not in await archive.series_names({SPS: "*?*"})
    assert await archive.series_names({SPS: "?*"}) == ["a", "b"]  # d's item has no SPS ID


async def test_keys_together_match_one_item(archive: Archive) -> None:
    # PS3.4 C.2.2.2.6: both keys in the same item, not in any two items.
    assert await archive.series_names({SPS: "SPS-A1", RP: "RP-A2"}) == []
    assert await archive.series_names({SPS: "SPS-A2", RP: "RP-A2"}) == ["a"]
    assert await archive.series_names({SPS: "SPS-A*", RP: "RP-A1"}) == ["a"]
    assert await archive.series_names({SPS: "SPS-B*", RP: "RP-A2"}) == ["b"]
    assert await archive.series_names({SPS: "SPS-A1", RP: "RP-?2"}) == []
    assert await archive.series_names({SPS: "*2", RP: "*2"}) == ["a"]
    assert await archive.series_names({SPS: "", RP: "RP-A2"}) == ["a", "b"]
    # With other keys, in tag form for one of them.
    assert await archive.series_names({"00400275.00401001": "RP-A2", "Modality": "CT"}) == [
        "a",
        "b",
    ]
    assert await archive.series_names({RP: "RP-A2", "SeriesInstanceUID": archive.series["b"]}) == [
        "b"
    ]


async def test_matched_sequence_is_returned(archive: Archive) -> None:
    # PS3.18 10.6.3.3: matched attributes are returned, here with the series attributes.
    (a,) = await archive.search("/series", {SPS: "SPS-A2", "includefield": "Modality"})
    items: list[Json] = a["00400275"]["Value"]
    assert [values(i, "00400009") for i in items] == [["SPS-A1"], ["SPS-A2"], ["X%_1"]]
    for path in ("/instances", f"/studies/{archive.study}/instances"):
        found = await archive.search(path, {RP: "RP-A1"})
        assert len(found) == 2
        assert all(len(i["00400275"]["Value"]) == 3 for i in found)
    st, se = archive.study, archive.series["a"]
    assert len(await archive.search(f"/studies/{st}/series/{se}/instances", {RP: "RP-A*"})) == 2
    assert await archive.search(f"/studies/{st}/series/{se}/instances", {RP: "RP-B*"}) == []


async def test_instance_search_across_series(archive: Archive) -> None:
    def sops(found: list[Json]) -> list[str]:
        return sorted(str(values(i, "00080018")[0]) for i in found)

    found = await archive.search("/instances", {RP: "RP-A2"})
    series = {str(values(i, "0020000E")[0]) for i in found}
    assert series == {archive.series["a"], archive.series["b"]}
    assert len(found) == 3
    assert sops(await archive.search("/instances", {SPS: "SPS-A?"})) == sorted(archive.a_instances)
    found = await archive.search(
        f"/studies/{archive.study}/instances", {"00400275.00401001": "RP-?"}
    )
    assert sops(found) == sorted(archive.a_instances)
    assert await archive.search(f"/studies/{archive.study}/instances", {RP: "RP-D"}) == []
    assert len(await archive.search("/instances", {SPS: ""})) == 5


@pytest.mark.parametrize(
    ("path", "params", "reason"),
    [
        ("/series", {"RequestAttributesSequence.": "x"}, "malformed attribute path"),
        ("/series", {".ScheduledProcedureStepID": "x"}, "malformed attribute path"),
        ("/series", {"RequestAttributesSequence": "x"}, "is a sequence"),
        ("/series", {"RequestAttributesSequence": ""}, "is a sequence"),
        ("/series", [(SPS, "A"), ("00400275.00400009", "B")], "given twice"),
        ("/series", [(SPS, "A"), (SPS, "B")], "given twice"),
        ("/studies", {SPS: "x"}, "series-level"),
        ("/studies", {SPS: ""}, "series-level"),
        ("/series", {SPS: "x" * 2000}, "longer than"),
    ],
)
async def test_malformed_paths_are_400(
    archive: Archive,
    path: str,
    params: Params,
    reason: str,
) -> None:
    r = await archive.client.get(f"{ROOT}{path}", params=params)
    assert r.status_code == 400, r.text
    assert reason in r.json()["message"]


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"RequestAttributesSequence.PatientName": "x"}, "not a matching key inside"),
        ({"00400275.00100010": "x"}, "not a matching key inside"),
        ({"RequestAttributesSequence.Nonsense": "x"}, "not a matching key inside"),
        ({f"{SPS}.CodeValue": "x"}, "one sequence deep"),
        (
            {"RequestAttributesSequence.ReferencedStudySequence.StudyInstanceUID": "x"},
            "one sequence deep",
        ),
        ({"PatientName.FamilyName": "x"}, "not a sequence with matching keys"),
        ({"ReferencedStudySequence.StudyInstanceUID": "x"}, "not a sequence with matching keys"),
    ],
)
async def test_unsupported_paths_are_ignored_with_a_warning(
    archive: Archive, params: dict[str, str], reason: str
) -> None:
    """PS3.18 8.3.1: a path this server does not match is ignored, the search run without it,
    and a Warning names it."""
    r = await archive.client.get(f"{ROOT}/series", params={**params, "limit": "1000"})
    assert r.status_code == 200, r.text
    assert len(r.json()) == len(await archive.search("/series", {"limit": "1000"}))
    assert reason in r.headers["warning"] and "ignored" in r.headers["warning"]
