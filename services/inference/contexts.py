"""A context: a conversation the kernel keeps for a process, with the KV cache of its history.

Between turns a context owns the blocks that hold its tokens' K/V (in the block allocator, under
the negative id ``owner``). A turn (chat with ctx) renders the whole conversation, shares the
blocks of the longest prefix it has in common with the context's tokens, and computes only the
rest; when the turn ends, its blocks become the context's. Under memory pressure an idle context's
blocks are the first to go (least recently used first); its next turn then recomputes the
history, which changes nothing but the time it takes. An open context keeps its model resident
(services/inference/pager.py), unless it was opened as a cache (``cache``: the gateway's held
conversations), whose model may be unloaded under it.

Never: talk to the driver or storage (the engine and the service do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_PER_PROCESS = 256
SAVE_FORMAT = "llmos-context/1"


@dataclass(eq=False)
class Context:
    ctx: int
    pid: int
    model: str
    messages: list[dict] = field(default_factory=list)   # the conversation so far
    tokens: list[int] = field(default_factory=list)      # the history whose K/V the context's blocks hold
    busy: int | None = None                              # the seq_id of the turn in flight
    cache: bool = False                                  # True: it does not keep its model resident
    last_used: float = field(default_factory=time.monotonic)

    @property
    def owner(self) -> int:
        return -self.ctx

    def saved(self) -> dict:
        return {"format": SAVE_FORMAT, "model": self.model, "messages": self.messages,
                "tokens": self.tokens}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
