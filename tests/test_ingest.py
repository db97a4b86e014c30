"""commit_order.CommitOrder (ingest.store_parts): parts of one STOW request with the same SOP
Instance UID commit in request order, whatever order their parses end in; other parts are not
held up."""

from __future__ import annotations

import anyio

from dicomweb_server.commit_order import CommitOrder


async def _run(order: CommitOrder, parts: list[tuple[int, str | None]]) -> list[int]:
    """Parts parsed in the order given (None: a part that fails before its UID is known);
    each commits at its turn and is then over. The order of the commits."""
    commits: list[int] = []

    async def part(n: int, sop: str | None, delay: float) -> None:
        await anyio.sleep(delay)
        try:
            if sop is not None:
                await order.turn(n, sop)
                commits.append(n)
                await anyio.sleep(0.01)  # the commit's round trip
        finally:
            order.over(n)

    async with anyio.create_task_group() as tg:
        for i, (n, sop) in enumerate(parts):
            tg.start_soon(part, n, sop, 0.01 * i)
    return commits


async def test_same_uid_commits_in_request_order_whatever_the_parse_order() -> None:
    # Parsed last first; part 2 failed before its UID was known.
    parts = [(4, "A"), (3, "B"), (2, None), (1, "A"), (0, "A")]
    commits = await _run(CommitOrder(), parts)
    a = [n for n in commits if n in (0, 1, 4)]
    assert a == [0, 1, 4]
    assert sorted(commits) == [0, 1, 3, 4]


async def test_other_uids_do_not_wait_for_each_other() -> None:
    order = CommitOrder()
    order.over(0)  # failed while spooled
    with anyio.fail_after(1):
        await order.turn(1, "A")  # nothing before it is unknown: its turn at once
    await order.turn(2, "B")  # part 1 has not committed, but its UID is another
    order.over(1)
    order.over(2)
    with anyio.fail_after(1):
        await order.turn(3, "A")  # part 1 is over


async def test_a_part_waits_for_its_latest_predecessor_of_the_same_uid() -> None:
    """Part 2 waits for part 1 only (which itself waits for part 0): a request of many parts
    with one UID costs a wait each, not one per earlier part."""
    order = CommitOrder()
    turns: list[int] = []

    async def turn(n: int) -> None:
        await order.turn(n, "A")
        turns.append(n)

    await order.turn(0, "A")  # part 0 is committing
    async with anyio.create_task_group() as tg:
        tg.start_soon(turn, 1)
        tg.start_soon(turn, 2)
        await anyio.sleep(0.05)
        assert turns == [] and set(order._waits) == {0, 1}
        order.over(0)
        await anyio.sleep(0.05)
        assert turns == [1]
        order.over(1)
    assert turns == [1, 2] and order._waits == {}
