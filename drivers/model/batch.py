"""One step's work, as plain data both engines share: the chunks, their checks, and their layout.

A step arrives as a list of `Chunk`s (token ids, a start position, a block table), one per running
sequence. `lay_out` checks them against the model and the KV pool and puts every token in one flat
batch, decoding tokens first and then each prompt chunk: the torch engine (drivers/model/llama.py)
and the torch-free one (drivers/model/lean.py) turn the same `Layout` into their own arrays.

Never: import torch or numpy, allocate KV blocks, or sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

LOGITS_CHOICES = ("last", "all", "none")


class StepAborted(RuntimeError):
    """A step given up half-way because its caller asked (a more urgent request arrived)."""


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: tokens at positions start, start+1, ...; KV lives in block_table."""
    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]
    logits: str = "last"       # "last": logits of the last token; "all": of every token; "none"


@dataclass
class PromptRows:
    """A prompt chunk's rows [first, first + n) of the flat batch, at positions start, start + 1, ..."""
    first: int
    n: int
    start: int
    blocks: list[int]          # the blocks holding positions [0, start + n)


@dataclass
class Layout:
    tokens: list[int]          # the flat batch: decoding tokens first, then each prompt chunk's
    positions: list[int]
    slots: list[int]           # pool row each token's K/V is written to: block * block_size + offset
    decode_tables: list[list[int]]   # each decoding token's blocks, enough for its keys
    decode_lengths: list[int]        # keys each decoding token attends to (its position + 1)
    prompts: list[PromptRows]
    logit_rows: list[int]      # rows of the flat batch whose logits the step returns, in the caller's order

    @property
    def n_decode(self) -> int:
        return len(self.decode_lengths)


def lay_out(chunks: Sequence[Chunk], vocab: int, max_positions: int, num_blocks: int, block_size: int) -> Layout:
    """Check a step's chunks (ValueError naming the chunk and the limit) and lay out its batch."""
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    bs = block_size
    for i, ch in enumerate(chunks):
        n = len(ch.tokens)
        if n == 0:
            raise ValueError(f"chunk {i}: no tokens")
        if ch.start < 0 or ch.start + n > max_positions:
            raise ValueError(f"chunk {i}: positions {ch.start}..{ch.start + n - 1} are outside"
                             f" 0..{max_positions - 1}")
        need = (ch.start + n + bs - 1) // bs
        if len(ch.block_table) < need:
            raise ValueError(f"chunk {i}: block table has {len(ch.block_table)} blocks, positions up to"
                             f" {ch.start + n - 1} need {need} (block size {bs})")
        if any(not 0 <= b < num_blocks for b in ch.block_table[:need]):
            raise ValueError(f"chunk {i}: block ids must be in 0..{num_blocks - 1}")
        if any(not 0 <= t < vocab for t in ch.tokens):
            raise ValueError(f"chunk {i}: token ids must be in 0..{vocab - 1}")
        if ch.logits not in LOGITS_CHOICES:
            raise ValueError(f"chunk {i}: logits must be one of {LOGITS_CHOICES}, got {ch.logits!r}")

    decode = [i for i, ch in enumerate(chunks) if len(ch.tokens) == 1]
    prompt = [i for i, ch in enumerate(chunks) if len(ch.tokens) > 1]
    tokens, positions, slots, first_row = [], [], [], {}
    for i in decode + prompt:
        ch = chunks[i]
        first_row[i] = len(tokens)
        tokens.extend(ch.tokens)
        for p in range(ch.start, ch.start + len(ch.tokens)):
            positions.append(p)
            slots.append(ch.block_table[p // bs] * bs + p % bs)
    if len(set(slots)) != len(slots):      # two chunks writing one KV slot: a block-sharing bug upstream
        raise ValueError("two tokens of this step would write the same KV slot (shared block not copied?)")

    lengths = [chunks[i].start + 1 for i in decode]
    tables = [list(chunks[i].block_table[:(n + bs - 1) // bs]) for i, n in zip(decode, lengths)]
    prompts = []
    for i in prompt:
        ch = chunks[i]
        total = ch.start + len(ch.tokens)
        prompts.append(PromptRows(first_row[i], len(ch.tokens), ch.start,
                                  list(ch.block_table[:(total + bs - 1) // bs])))
    rows = []
    for i, ch in enumerate(chunks):
        n = len(ch.tokens)
        if ch.logits == "last":
            rows.append(first_row[i] + n - 1)
        elif ch.logits == "all":
            rows.extend(range(first_row[i], first_row[i] + n))
    return Layout(tokens, positions, slots, tables, lengths, prompts, rows)
