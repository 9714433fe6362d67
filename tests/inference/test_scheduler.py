"""The block allocator and the scheduler on their own, without a model: plain Sequence objects."""

from __future__ import annotations

import pytest

from services.inference import BlockAllocator, OutOfBlocks, Scheduler, Sequence


def seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(i, list(range(prompt_len)), {}, max_tokens=100, arrival=i)


def advance(batch) -> None:
    """What the engine does after a step: mark fed tokens computed; a finished prefill samples a token."""
    for s, n in batch.steps:
        s.num_computed += n
        if s.num_computed == len(s):
            s.output.append(7)


def test_allocator_tables_refs_and_usage():
    a = BlockAllocator(8, 4)
    assert a.grow(1, 5) == [0, 1] and a.needed(1, 8) == 0 and a.needed(1, 9) == 1
    a.grow(2, 12)
    assert a.usage() == {"blocks_total": 8, "blocks_used": 5, "blocks_free": 3, "block_size": 4, "sequences": 2}
    with pytest.raises(OutOfBlocks):
        a.grow(1, 30)
    assert a.free(2) == 3 and a.free(1) == 2 and a.free(1) == 0
    assert a.usage()["blocks_used"] == 0


def test_token_budget_chunks_prompts_and_serves_decoders_first():
    s = Scheduler(BlockAllocator(64, 4), max_running=4, token_budget=10)
    a, b = seq(0, 3), seq(1, 25)
    s.add(a)
    advance(s.schedule())                       # a prefilled, now decoding
    s.add(b)
    sizes = []
    for _ in range(4):
        batch = s.schedule()
        assert batch.steps[0] == (a, 1)         # the decoder is never left out
        sizes.append({x.seq_id: n for x, n in batch.steps}[1])
        advance(batch)
    assert sizes == [9, 9, 7, 1]                # 25 prompt tokens in chunks of what the budget leaves


def test_max_running_and_admission_waits_for_blocks():
    s = Scheduler(BlockAllocator(4, 4), max_running=2, token_budget=100)
    seqs = [seq(i, 6) for i in range(3)]
    for x in seqs:
        s.add(x)
    batch = s.schedule()
    assert [x.seq_id for x, _ in batch.steps] == [0, 1] and len(s.waiting) == 1
    s.remove(seqs[0])
    assert [x.seq_id for x, _ in s.schedule().steps] == [1, 2]


def test_newest_is_preempted_and_policy_is_replaceable():
    class OldestOut:
        def next_waiting(self, waiting):
            return min(waiting, key=lambda x: x.arrival)

        def victim(self, running):
            return min(running, key=lambda x: x.arrival)

    for policy, expected in ((None, 1), (OldestOut(), 0)):
        s = Scheduler(BlockAllocator(2, 4), max_running=2, token_budget=100, policy=policy)
        a, b = seq(0, 4), seq(1, 4)
        s.add(a)
        s.add(b)
        advance(s.schedule())                   # both prefilled: each holds one full block, 5 tokens now
        batch = s.schedule()                    # each needs a second block; only one can grow
        assert [x.seq_id for x in batch.preempted] == [expected]
        victim = batch.preempted[0]
        assert victim.num_computed == 0 and victim.preemptions == 1 and victim in s.waiting
        assert [x for x, _ in batch.steps] == [a if expected else b]
