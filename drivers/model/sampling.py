"""Choosing the next token of each sequence in a batch from its logits.

Every sequence carries its own `SamplingParams` and its own random generator (numpy's PCG64, in a
`SequenceSampler`), so a seeded request produces the same tokens whatever else shares its batch. The
maths is batched over rows; the only per-row Python work is one uniform draw from each sequence's
generator, its inverse-CDF lookup, and the repetition penalty.

Order, as in Hugging Face's warpers: repetition penalty, temperature, top-k, then top-p and min-p on the
renormalised top-k distribution. Temperature 0 means greedy (argmax after the penalty).
Reported logprobs are of the model's own distribution (log_softmax of the raw logits), not the warped one.

numpy, not torch: the torch-free driver (drivers/model/lean.py) samples here too, and numpy's argmax
and exp are vectorised where torch's CPU argmax took ~100 us a 49k row. Logits may come as a numpy
array or as a torch tensor on any device (copied to the host as fp32: a few rows of one vocabulary
each, next to a forward pass).

Never: look at token text, import torch, or hold state beyond a sequence's generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

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

    def __init__(self, params: SamplingParams | None = None, drawn: int = 0):
        """drawn: tokens this sequence has sampled already (elsewhere: a driver or an inference
        service that died). Each sampled token takes exactly one 64-bit draw (``_sample_rows``),
        so the stream advanced by drawn is where it stood: a seeded sequence's tokens are a
        function of its seed and their position, however often it is made again."""
        self.params = params or SamplingParams()
        seed = self.params.seed if self.params.seed is not None else random.SystemRandom().randrange(2 ** 63)
        bits = np.random.PCG64(seed)
        if drawn:
            bits.advance(drawn)
        self.generator = np.random.Generator(bits)


def host_logits(logits) -> np.ndarray:
    """fp32 numpy [N, vocab] from a numpy array or a torch tensor on any device."""
    if isinstance(logits, np.ndarray):
        return logits.astype(np.float32, copy=False)
    return logits.detach().float().cpu().numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log_softmax of fp32 x [N, V], in fp32 (max-shifted, so no row overflows)."""
    return x - _logsumexp(x)


def sample(logits, samplers: Sequence[SequenceSampler],
           history: Sequence[Sequence[int]] | None = None) -> list[Sample]:
    """One token per row of logits [N, vocab]; history[i] is what row i's repetition penalty looks at."""
    logits = host_logits(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be [{len(samplers)}, vocab], got {list(logits.shape)}")
    if history is not None and len(history) != len(samplers):
        raise ValueError(f"history has {len(history)} rows for {len(samplers)} samplers")
    n, vocab = logits.shape
    raw_logprobs = log_softmax(logits)
    params = [s.params for s in samplers]

    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and history and history[i]]
    if penalised:
        logits = logits.copy()
        for i in penalised:
            ids = np.unique(np.asarray(history[i], dtype=np.int64))
            ids = ids[(ids >= 0) & (ids < vocab)]
            seen = logits[i, ids]
            pen = params[i].repetition_penalty
            logits[i, ids] = np.where(seen > 0, seen / pen, seen * pen)

    tokens = logits.argmax(axis=-1)            # every row's greedy pick, then the rest
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], [samplers[i].generator for i in rows])

    chosen = raw_logprobs[np.arange(n), tokens].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    want = max((p.logprobs for p in params), default=0)
    if want:
        for i, p in enumerate(params):
            if p.logprobs:
                row = raw_logprobs[i]
                best = np.argpartition(-row, p.logprobs - 1)[:p.logprobs] if p.logprobs < vocab else np.arange(vocab)
                best = best[np.argsort(-row[best], kind="stable")]
                tops[i] = list(zip(best.tolist(), row[best].tolist()))
    return [Sample(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first index whose cumulative mass exceeds u times the row's total."""
    picks = [np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u)]
    return np.minimum(np.asarray(picks, dtype=np.int64), cdf.shape[1] - 1)


def _sample_rows(logits: np.ndarray, params: list[SamplingParams], gens: list[np.random.Generator]) -> np.ndarray:
    """Temperature, then top-k / top-p / min-p, then one inverse-CDF draw per row (no greedy rows here)."""
    r, vocab = logits.shape
    scaled = logits / np.asarray([p.temperature for p in params], dtype=np.float32)[:, None]
    u = np.asarray([g.random() for g in gens])          # one draw per row, always
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    filtered = [i for i, p in enumerate(params) if top_k[i] or p.top_p < 1 or p.min_p > 0]
    plain = sorted(set(range(r)) - set(filtered))
    tokens = np.empty(r, dtype=np.int64)
    if plain:                        # no truncation: draw straight from the unsorted distribution
        tokens[plain] = _draw(np.cumsum(_softmax(scaled[plain]), axis=-1), u[plain])
    if filtered:
        rows = scaled[filtered]
        ks, ps, us = [top_k[i] for i in filtered], [params[i] for i in filtered], u[filtered]
        # Sorting 49k logits per row is slow; the top CANDIDATES almost always contain every survivor.
        width = min(vocab, max(k or CANDIDATES for k in ks))
        picked, complete = _truncate_and_draw(rows, ks, ps, us, width)
        if not complete.all():        # a very flat row: redo it over the whole vocabulary
            redo = np.flatnonzero(~complete)
            picked[redo], _ = _truncate_and_draw(rows[redo], [ks[i] for i in redo], [ps[i] for i in redo],
                                                 us[redo], vocab)
        tokens[filtered] = picked
    return tokens


def _best(scaled: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `width` highest values, highest first, and their columns."""
    vocab = scaled.shape[1]
    if width < vocab:
        cols = np.argpartition(-scaled, width - 1, axis=-1)[:, :width]
        values = np.take_along_axis(scaled, cols, axis=-1)
    else:
        cols, values = np.broadcast_to(np.arange(vocab), scaled.shape), scaled
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(values, order, axis=-1), np.take_along_axis(cols, order, axis=-1)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _truncate_and_draw(scaled: np.ndarray, top_k: list[int], params: list[SamplingParams], u: np.ndarray,
                       width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw among the `width` best tokens of each row; also say, per row, whether those were enough
    (its top-k lies within them, or its top-p/min-p cut falls inside them)."""
    vocab = scaled.shape[1]
    values, order = _best(scaled, width)
    has_k = np.asarray([k > 0 for k in top_k])[:, None]
    k = np.asarray([k or width for k in top_k])[:, None]
    values = np.where(np.arange(width) >= k, -np.inf, values)
    # top-k renormalises over the k kept tokens; without it, probabilities are over the whole vocabulary
    log_norm = np.where(has_k, _logsumexp(values), _logsumexp(scaled))
    probs = np.exp(values - log_norm)
    top_p = np.asarray([p.top_p for p in params])[:, None]
    min_p = np.asarray([p.min_p for p in params])[:, None]
    # keep the shortest prefix whose mass reaches top_p: drop a token when the mass before it already does
    drop = (np.cumsum(probs, axis=-1) - probs) >= top_p
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False                                       # the most likely token always survives
    # both rules only ever drop a suffix, so a dropped last candidate means everything beyond is dropped too
    complete = has_k[:, 0] | drop[:, -1] | (width == vocab)
    probs = np.where(drop, 0.0, probs)
    pick = _draw(np.cumsum(probs, axis=-1), u)
    # a zero-probability slot can only be picked through rounding at the very top; step back to a live one
    rows = np.arange(len(pick))
    dead = probs[rows, pick] <= 0
    if dead.any():
        last_live = width - 1 - np.argmax((probs > 0)[:, ::-1], axis=-1)
        pick = np.where(dead, last_live, pick)
    return order[rows, pick], complete
