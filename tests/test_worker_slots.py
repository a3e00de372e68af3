"""The slot table: the admission seam the pool plugs its fencing-token check into."""

from __future__ import annotations

import asyncio

import pytest

from service.worker.slots import LeaseRefused, NoFreeSlot, NotAccepting, SlotBusy, SlotOutOfRange, SlotTable


async def test_bind_and_release():
    table = SlotTable(2)
    table.accepting = True
    assert await table.bind(None, None, "a") == 0
    assert await table.bind(1, None, "b") == 1
    assert (table.free, table.busy, table.holder(1)) == (0, 2, "b")
    with pytest.raises(NoFreeSlot) as refused:
        await table.bind(None, None, "c")
    assert refused.value.code == 4029
    with pytest.raises(SlotBusy) as busy:
        await table.bind(0, None, "c")
    assert busy.value.code == 4009
    with pytest.raises(SlotOutOfRange):
        await table.bind(2, None, "c")
    table.release(0)
    table.release(0)  # harmless
    assert await table.bind(None, None, "c") == 0


async def test_only_the_holder_frees_its_slot():
    table = SlotTable(1)
    table.accepting = True
    old, new = object(), object()
    await table.bind(0, None, "old", owner=old)
    table.release(0, owner=old)
    await table.bind(0, None, "new", owner=new)
    table.release(0, owner=old)  # a late release by the previous session must not free it
    assert table.holder(0) == "new"


async def test_slot_is_reserved_while_the_validator_runs():
    checking = asyncio.Event()
    verdict = asyncio.Event()

    async def validator(slot, token, call_id):
        checking.set()
        await verdict.wait()
        return token == 1

    table = SlotTable(1, validator)
    table.accepting = True
    first = asyncio.create_task(table.bind(0, 2, "first"))
    await checking.wait()
    with pytest.raises(SlotBusy):
        await table.bind(0, 1, "second")  # no sharing while the first is being checked
    verdict.set()
    with pytest.raises(LeaseRefused) as refused:
        await first
    assert refused.value.code == 4003
    assert table.free == 1


async def test_a_validator_that_fails_frees_the_reservation():
    def validator(slot, token, call_id):
        raise ConnectionError("redis is down")

    table = SlotTable(1, validator)
    table.accepting = True
    with pytest.raises(ConnectionError):
        await table.bind(0, 1, "x")
    assert table.free == 1


async def test_not_accepting():
    table = SlotTable(1)
    with pytest.raises(NotAccepting, match="loading"):
        await table.bind(None, None, "x")
    table.accepting = True
    table.stop_accepting("the worker is draining")
    with pytest.raises(NotAccepting, match="draining"):
        await table.bind(None, None, "x")
