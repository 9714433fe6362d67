"""The step messages between the inference service and a driver service: what crosses, and nothing more.

A driver owns the model, the KV pool and each sequence's sampler; the engine owns everything else.
Every message is plain data (ints, floats, str, lists, dicts), msgpack as it is: token ids,
positions, block tables and sampling parameters go in, sampled token ids (with logprobs) come out.
Tensors and logits never leave the driver.

The driver's ops: ``info`` -> {"num_blocks", "block_size", "vocab_size", "context_length", "model",
...}; ``step`` {"batch": [SeqStep], "id": int} -> [Sampled]; ``abort`` {"id", "mode": "abort" |
"yield"}; ``release`` {"seq_ids": [int]}: forget those sequences' samplers and histories;
``reset`` {}: forget every sequence (a restarted inference service knows none of them).

One step's input, a list of SeqStep, one per scheduled sequence:
    {"seq_id": int, "tokens": [int], "start": int, "block_table": [int], "sample": bool,
     "params": {...} | None,    # SamplingParams.to_dict(); sent with the first step the driver
                                # sees of a sequence (or again after a recompute from 0);
                                # with params, the driver makes the sequence's sampler afresh
     "drawn": int,              # with params: tokens the sequence has sampled already, so
                                # a seeded sampler starts that far into its random stream
     "history": [int],          # only with a first step that starts past 0 (a context's cached
                                # prefix): the tokens before start, for the repetition penalty
     "steps": int, "stop_ids": [int],   # a decoding sequence may ask for up to `steps` tokens in
                                # one step, fed back one by one, ending early on a stop id
     "constraint": {"grammar": str, "prompt_len": int}}   # with params, for a constrained
                                # sequence: llguidance's grammar its output (the tokens from
                                # prompt_len on) keeps to; the driver masks every token it samples
Output, a list of Sampled, one per SeqStep with sample=True, in the same order:
    {"seq_id": int, "token": int, "logprob": float, "top": [[int, float], ...]
     [, "next": [{"token", "logprob", "top"}, ...]]    # the tokens after the first, with steps > 1
     [, "error": str]}          # its constraint admits no token here: the sequence ends (token is
                                # meaningless)
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class SeqStep(TypedDict):
    seq_id: int
    tokens: list[int]
    start: int
    block_table: list[int]
    sample: bool
    params: dict[str, Any] | None
    history: NotRequired[list[int]]
    drawn: NotRequired[int]
    steps: NotRequired[int]
    stop_ids: NotRequired[list[int]]
    constraint: NotRequired[dict[str, Any]]


class Sampled(TypedDict):
    seq_id: int
    token: int
    logprob: float
    top: list[list]
    next: NotRequired[list[dict]]
    error: NotRequired[str]
