"""The KV block allocator: fixed-size blocks of the driver's KV pool, a free list, one block table per
sequence, and a reference count per block.

Reference counts are there for prefix sharing (two sequences pointing at one full block); today every
block has one owner. Block ids are the driver's pool rows, so a table can be sent to the driver as is.

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

    def free(self, seq_id: int) -> int:
        """Drop seq_id's table; blocks nobody else references go back to the free list. Returns how many."""
        freed = 0
        for b in self._tables.pop(seq_id, []):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
                freed += 1
        return freed
