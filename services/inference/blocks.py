"""The KV block allocator: fixed-size blocks of the driver's KV pool, a free list, one block table per
sequence, and a reference count per block.

A table's owner is a sequence (its seq_id) or a context (a negative id). Reference counts let a
context and the turn running on it share the context's prefix blocks: the turn writes only past the
prefix, and a block goes back to the free list when its last owner lets go. Block ids are the
driver's pool rows, so a table can be sent to the driver as is.

Never: read or write K/V (the driver does), or decide who gets blocks (the scheduler does).
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler preempts someone or waits."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}

    # ------------------------------------------------------------------------------------------ queries

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def needed(self, seq_id: int, num_tokens: int) -> int:
        """How many more blocks seq_id needs for its first num_tokens positions."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(seq_id)))

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.needed(seq_id, num_tokens) <= len(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> dict[str, int]:
        used = self.num_blocks - len(self._free)
        return {"blocks_total": self.num_blocks, "blocks_used": used, "blocks_free": len(self._free),
                "block_size": self.block_size, "sequences": len(self._tables)}

    # ------------------------------------------------------------------------------------------ changes

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make seq_id's table cover positions 0..num_tokens-1; return the whole table."""
        n = self.needed(seq_id, num_tokens)
        if n > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {n} more blocks, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        for _ in range(n):
            b = self._free.popleft()
            self._refs[b] = 1
            table.append(b)
        return table

    def share(self, owner: int, blocks: list[int]) -> None:
        """Give owner (which has no table) a table of blocks someone else holds too."""
        if self._tables.get(owner):
            raise ValueError(f"owner {owner} already has blocks")
        for b in blocks:
            self._refs[b] += 1
        self._tables[owner] = list(blocks)

    def move(self, src: int, dst: int) -> None:
        """Hand src's table to dst (which lets go of its own first)."""
        self.free(dst)
        table = self._tables.pop(src, None)
        if table:
            self._tables[dst] = table

    def trim(self, owner: int, keep: int) -> None:
        """Let go of owner's blocks past the first `keep`."""
        table = self._tables.get(owner)
        if table and len(table) > keep:
            for b in table[keep:]:
                self._refs[b] -= 1
                if self._refs[b] == 0:
                    self._free.append(b)
            del table[keep:]

    def distinct(self, owners) -> int:
        """Blocks held by any of these owners, each counted once."""
        return len({b for o in owners for b in self._tables.get(o, ())})

    def free(self, seq_id: int) -> int:
        """Drop seq_id's table; blocks nobody else references go back to the free list. Returns how many."""
        before = len(self._free)
        self.trim(seq_id, 0)
        self._tables.pop(seq_id, None)
        return len(self._free) - before
