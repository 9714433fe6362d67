"""Turns across models (services/inference/turns.py): one step at a time on the device, the most
urgent waiting step first, equals in the order they asked, and a much more urgent one has the
running step given up."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.turns import Turns


class Model:
    """What Turns needs of a Resident: a name, and the two ways to cut its running step short."""

    def __init__(self, name: str):
        self.name, self.calls = name, []

    def give_up_step(self):
        self.calls.append("give_up")

    def yield_now(self):
        self.calls.append("yield")


async def granted(turns: Turns, model: Model, priority: int, order: list[str]) -> None:
    await turns.take(model, priority)
    order.append(model.name)


def test_the_most_urgent_waiting_step_goes_next_and_equals_take_turns():
    async def main():
        turns, order = Turns(band=5), []
        a, b, c, d = Model("a"), Model("b"), Model("c"), Model("d")
        await turns.take(a, 10)                        # a steps; the others wait
        tasks = [asyncio.create_task(granted(turns, m, p, order)) for m, p in ((b, 10), (c, 7), (d, 10))]
        await asyncio.sleep(0)
        assert turns.waiting() == 3 and order == []
        for holder in (a, c, b):
            turns.give(holder)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["c", "b", "d"] and turns.holder is d
        assert a.calls == ["yield"]                   # c is more urgent, within the band
        turns.give(d)
        assert turns.holder is None
    asyncio.run(main())


def test_a_much_more_urgent_step_has_the_running_one_given_up():
    async def main():
        turns, order = Turns(band=5), []
        low, urgent = Model("low"), Model("urgent")
        await turns.take(low, 19)
        t = asyncio.create_task(granted(turns, urgent, -5, order))
        await asyncio.sleep(0)
        assert low.calls == ["give_up"] and order == []
        turns.give(low)
        await t
        assert order == ["urgent"] and turns.holder is urgent
    asyncio.run(main())


def test_a_cancelled_wait_leaves_no_turn_behind():
    async def main():
        turns, order = Turns(band=5), []
        a, b, c = Model("a"), Model("b"), Model("c")
        await turns.take(a, 0)
        waiting_b = asyncio.create_task(granted(turns, b, 0, order))
        waiting_c = asyncio.create_task(granted(turns, c, 0, order))
        await asyncio.sleep(0)
        waiting_b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_b
        turns.give(a)
        await waiting_c
        assert order == ["c"] and turns.holder is c and turns.waiting() == 0
        # granted just as it was cancelled: the turn passes on instead of being lost
        waiting_a = asyncio.create_task(granted(turns, a, 0, order))
        await asyncio.sleep(0)
        turns.give(c)                 # a is granted...
        waiting_a.cancel()            # ...and cancelled before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiting_a
        assert turns.holder is None
    asyncio.run(main())


def test_an_urgent_model_keeps_the_turn_for_its_next_step():
    """Giving the turn back with more to do, far more urgent than the waiters: kept for its next
    step, so the waiter does not slip in between; not taken within RESERVE_S, it passes on."""
    async def main():
        turns, order = Turns(band=5), []
        urgent, low = Model("urgent"), Model("low")
        await turns.take(urgent, 0)
        waiting = asyncio.create_task(granted(turns, low, 10, order))
        await asyncio.sleep(0)
        assert urgent.calls == [] and low.calls == []      # its step is not cut short by a lesser one
        turns.give(urgent, again=0)
        await asyncio.sleep(0)
        assert order == [] and turns.holder is urgent
        await turns.take(urgent, 0)                         # at once: it was kept
        turns.give(urgent, again=3)                         # within the band of the waiter: hand on
        await waiting
        assert order == ["low"] and turns.holder is low
        urgent_again = asyncio.create_task(granted(turns, urgent, 0, order))
        await asyncio.sleep(0)
        assert low.calls == ["give_up"]
        turns.give(low, again=10)
        await urgent_again
        turns.give(urgent, again=0)                         # kept, but nobody waits: not kept
        assert turns.holder is None
        await turns.take(low, 10)
        turns.give(low, again=0)
        assert turns.holder is None
        await turns.take(urgent, 0)
        waiting = asyncio.create_task(granted(turns, low, 10, order))
        await asyncio.sleep(0)
        turns.give(urgent, again=0)
        await asyncio.wait_for(waiting, 1.0)                # never taken: passed on after RESERVE_S
        assert turns.holder is low
    asyncio.run(main())
