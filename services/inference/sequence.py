"""One request's state inside the engine: its tokens, how many of them are in the KV cache, and its
progress towards a finish reason.

Never: touch blocks (the BlockAllocator owns block tables) or talk to the driver.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Status(enum.Enum):
    WAITING = "waiting"        # not admitted, or preempted and dropped: nothing of it is in the KV cache
    RUNNING = "running"        # in the batch, with blocks; prefilling (num_computed < len - 1) or decoding
    SUSPENDED = "suspended"    # out of the batch, keeping its blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt: list[int]
    params: dict[str, Any]            # validated SamplingParams, as the plain dict the driver receives
    max_tokens: int                   # already capped by the context window
    stop_ids: frozenset[int] = frozenset()
    arrival: int = 0                  # arrival order: the last tie-breaker of the policy
    pid: int = 0                      # the process it is for: priorities and limits are per process
    ctx: int | None = None            # the context it is a turn of
    constraint: str | None = None     # llguidance's grammar its output keeps to (drivers/model/constraints.py)
    cached: int = 0                   # prompt tokens whose K/V came from the context's cache
    known: bool = False               # the driver has its sampling parameters
    output: list[int] = field(default_factory=list)
    num_computed: int = 0             # tokens whose K/V are in the cache; reset to 0 by preemption
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    stop_reason: str | int | None = None   # the stop string or stop id that ended it
    preemptions: int = 0              # times it left the batch before finishing
    hold: str | None = None           # why the policy holds it out: "stopped", "throttled"
    benched: bool = False             # out of the batch because much more urgent work runs
    last_served: float = 0.0          # when it last got a step (aging counts from here)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next token can be sampled (1 for a decoding sequence)."""
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def stats(self) -> dict[str, Any]:
        ttft = None if self.first_token_at is None else self.first_token_at - self.created
        end = self.finished_at or time.monotonic()
        decode = None if self.first_token_at is None else end - self.first_token_at
        return {"prompt_tokens": len(self.prompt), "cached_tokens": self.cached,
                "generated_tokens": len(self.output), "ttft_s": ttft,
                "decode_s": decode, "preemptions": self.preemptions}
