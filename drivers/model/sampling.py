"""Choosing the next token of each sequence in a batch from its logits.

Every sequence carries its own `SamplingParams` and its own torch.Generator (in a `SequenceSampler`), so a
seeded request produces the same tokens whatever else shares its batch. The maths is batched over rows;
the only per-row Python work is one uniform draw from each sequence's generator and the repetition penalty.

Order, as in Hugging Face's warpers: repetition penalty, temperature, top-k, then top-p and min-p on the
renormalised top-k distribution. Temperature 0 means greedy (argmax after the penalty).
Reported logprobs are of the model's own distribution (log_softmax of the raw logits), not the warped one.

Never: look at token text, or hold state beyond a sequence's generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

# re-exported: callers of this module's old home keep working
from drivers.model.params import MAX_LOGPROBS, SamplingParams, SamplingParamsError  # noqa: F401

CANDIDATES = 1024   # truncating filters look at this many best tokens first, the whole vocabulary only if needed


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float                                                 # of `token` under the raw distribution
    top: list[tuple[int, float]] = field(default_factory=list)    # params.logprobs best (token, logprob)


class SequenceSampler:
    """One sequence's sampling state: its parameters and its private random generator."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        seed = self.params.seed if self.params.seed is not None else random.SystemRandom().randrange(2 ** 63)
        self.generator = torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, samplers: Sequence[SequenceSampler],
           history: Sequence[Sequence[int]] | None = None) -> list[Sample]:
    """One token per row of logits [N, vocab]; history[i] is what row i's repetition penalty looks at."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be [{len(samplers)}, vocab], got {list(logits.shape)}")
    if history is not None and len(history) != len(samplers):
        raise ValueError(f"history has {len(history)} rows for {len(samplers)} samplers")
    n, vocab = logits.shape
    # on the host whatever device made the logits: the generators are CPU ones, and a few rows of one
    # vocabulary each are cheap to copy next to a forward pass
    logits = logits.detach().float().cpu()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    params = [s.params for s in samplers]

    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and history and history[i]]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            ids = torch.tensor(sorted(set(history[i])), dtype=torch.long)
            ids = ids[(ids >= 0) & (ids < vocab)]
            seen = logits[i, ids]
            pen = params[i].repetition_penalty
            logits[i, ids] = torch.where(seen > 0, seen / pen, seen * pen)

    # numpy's argmax is vectorised; torch's CPU one took ~100 us a 49k row here, numpy's 5
    tokens = torch.from_numpy(logits.numpy().argmax(axis=-1))      # every row's greedy pick, then the rest
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], [samplers[i].generator for i in rows])

    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    want = max((p.logprobs for p in params), default=0)
    if want:
        values, ids = raw_logprobs.topk(want, dim=-1)
        for i, p in enumerate(params):
            if p.logprobs:
                tops[i] = list(zip(ids[i, :p.logprobs].tolist(), values[i, :p.logprobs].tolist()))
    return [Sample(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p, then one inverse-CDF draw per row (no greedy rows here)."""
    r, vocab = logits.shape
    scaled = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).unsqueeze(1)   # one draw per row, always
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    filtered = [i for i, p in enumerate(params) if top_k[i] or p.top_p < 1 or p.min_p > 0]
    plain = sorted(set(range(r)) - set(filtered))
    tokens = torch.empty(r, dtype=torch.long)
    if plain:                        # no truncation: draw straight from the unsorted distribution
        cdf = scaled[plain].softmax(dim=-1).cumsum(dim=-1)
        tokens[plain] = torch.searchsorted(cdf, u[plain] * cdf[:, -1:], right=True).clamp_(max=vocab - 1).squeeze(1)
    if filtered:
        rows = scaled[filtered]
        ks, ps, mps = [top_k[i] for i in filtered], [params[i] for i in filtered], u[filtered]
        # Sorting 49k logits per row is slow; the top CANDIDATES almost always contain every survivor.
        width = min(vocab, max(k or CANDIDATES for k in ks))
        picked, complete = _truncate_and_draw(rows, ks, ps, mps, width)
        if not bool(complete.all()):  # a very flat row: redo it over the whole vocabulary
            redo = (~complete).nonzero().squeeze(1).tolist()
            picked[redo], _ = _truncate_and_draw(rows[redo], [ks[i] for i in redo], [ps[i] for i in redo],
                                                 mps[redo], vocab)
        tokens[filtered] = picked
    return tokens


def _truncate_and_draw(scaled: torch.Tensor, top_k: list[int], params: list[SamplingParams], u: torch.Tensor,
                       width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw among the `width` best tokens of each row; also say, per row, whether those were enough
    (its top-k lies within them, or its top-p/min-p cut falls inside them)."""
    vocab = scaled.shape[1]
    values, order = scaled.topk(width, dim=-1) if width < vocab else scaled.sort(dim=-1, descending=True)
    has_k = torch.tensor([k > 0 for k in top_k]).unsqueeze(1)
    k = torch.tensor([k or width for k in top_k]).unsqueeze(1)
    values = values.masked_fill(torch.arange(width) >= k, float("-inf"))
    # top-k renormalises over the k kept tokens; without it, probabilities are over the whole vocabulary
    log_norm = torch.where(has_k, values.logsumexp(dim=-1, keepdim=True), scaled.logsumexp(dim=-1, keepdim=True))
    probs = (values - log_norm).exp()
    top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
    # keep the shortest prefix whose mass reaches top_p: drop a token when the mass before it already does
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False                                       # the most likely token always survives
    # both rules only ever drop a suffix, so a dropped last candidate means everything beyond is dropped too
    complete = has_k.squeeze(1) | drop[:, -1] | (width == vocab)
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=width - 1)
    # a zero-probability slot can only be picked through rounding at the very top; step back to a live one
    live = probs.gather(1, pick) > 0
    if not bool(live.all()):
        last_live = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        pick = torch.where(live, pick, last_live)
    return order.gather(1, pick).squeeze(1), complete
