"""Sampling parameters: what a request may ask of the sampler, checked before it reaches a driver.

Torch-free on purpose: the inference service validates every request's parameters with these classes
and must not load torch to do so (drivers/model/sampling.py, which imports torch, does the sampling).

Never: import torch, or hold any state beyond the parameters themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

MAX_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # in (0, 1]; 1 = off
    min_p: float = 0.0                # in [0, 1); 0 = off
    repetition_penalty: float = 1.0   # > 0; 1 = off; > 1 discourages tokens already in the history
    seed: int | None = None           # same seed and same logits -> same tokens
    logprobs: int = 0                 # how many top alternatives to report per token, 0..MAX_LOGPROBS

    def __post_init__(self):
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingParamsError(f"{name} must be a finite number, got {value!r}")

        def integer(name, value):
            if isinstance(value, bool) or not isinstance(value, int):
                raise SamplingParamsError(f"{name} must be an integer, got {value!r}")

        number("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        integer("top_k", self.top_k)
        if self.top_k < 0:
            raise SamplingParamsError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        number("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise SamplingParamsError(f"min_p must be in [0, 1), got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None:
            integer("seed", self.seed)
            if not 0 <= self.seed < 2 ** 63:
                raise SamplingParamsError(f"seed must be in [0, 2**63), got {self.seed}")
        integer("logprobs", self.logprobs)
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SamplingParams":
        """Build from a request's plain dict; unknown keys are an error, not silently ignored."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}"
                                      f" (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
