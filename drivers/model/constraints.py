"""Constrained decoding: token masks that keep a sequence's output inside a grammar (llguidance).

A request's constraint (a JSON schema, a regex, a Lark grammar, or a tool call) is compiled once,
by the inference service, into llguidance's grammar text (``grammar_for``), and checked there
against the model's vocabulary (``check``): what is wrong with it is a ``ConstraintError`` naming
the part, before anything runs. The driver holds one ``Constraint`` per constrained sequence and,
at each token it samples, brings the constraint to the sequence's output so far (``sync``: a
recompute after preemption, a context's turn or a token the engine dropped all come down to
"these are the tokens generated", so the grammar state is always exact), builds the mask of the
tokens that may come next, and sets every other logit to -inf in place. ``Masks`` builds a batch's
masks in a worker thread while the forward pass runs (llguidance releases the GIL), so a
constrained row costs little more than the mask's application; an unconstrained row costs nothing.

Never: import torch (a driver may run without it), or look at a prompt's text.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import llguidance
import numpy as np

# JSON as json.dumps writes it: one space after ',' and ':', no other whitespace. A small model
# given "any whitespace" may spend its whole budget on newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR = 1 << 20          # characters of a grammar, regex or schema (as JSON)


class ConstraintError(ValueError):
    """A constraint that cannot be used: malformed, unsupported, or admitting no output at all.
    The message names the argument and the part."""


# ------------------------------------------------------------------------------------- compiling

def grammar_for(response_format: Any = None, regex: Any = None, grammar: Any = None) -> str | None:
    """llguidance's grammar for a request's constraint arguments (at most one), None for none."""
    given = [n for n, v in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
             if v is not None and not (n == "response_format" and _is_text(v))]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if response_format is not None and not _is_text(response_format):
        return json_grammar(_schema_of(response_format), "response_format")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ConstraintError("regex must be a non-empty string")
        return _checked(llguidance.LLMatcher.grammar_from_regex(regex), "regex")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConstraintError("grammar must be a non-empty string (a Lark grammar)")
        return lark_grammar(grammar, "grammar")
    return None


def lark_grammar(text: str, where: str) -> str:
    """The grammar of a Lark text (llguidance's dialect: %json {schema} embeds a JSON Schema)."""
    return _checked(llguidance.LLMatcher.grammar_from_lark(text), where)


def json_grammar(schema: Mapping[str, Any] | bool, where: str) -> str:
    """The grammar of JSON text that validates against schema; ConstraintError naming what of the
    schema llguidance cannot enforce (it never ignores a keyword silently)."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{where}: the schema is not JSON: {e}") from None
    if len(text) > MAX_GRAMMAR:
        raise ConstraintError(f"{where}: the schema is too long ({len(text)} > {MAX_GRAMMAR} characters)")
    try:
        g = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(f"{where}: {e}") from None
    return _checked(g, where)


def _is_text(response_format: Any) -> bool:
    return isinstance(response_format, Mapping) and response_format.get("type") == "text" \
        and len(response_format) == 1


def _schema_of(response_format: Any) -> Mapping[str, Any] | bool:
    if not isinstance(response_format, Mapping):
        raise ConstraintError("response_format must be an object: {\"type\": \"json_object\"} or "
                              "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}")
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ConstraintError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ConstraintError("response_format.json_schema must be an object {\"name\", \"schema\"}")
    schema = spec.get("schema", {})
    if not isinstance(schema, (Mapping, bool)):
        raise ConstraintError(f"response_format.json_schema.schema must be a JSON Schema object, "
                              f"got {type(schema).__name__}")
    return schema


def _checked(g: str, where: str) -> str:
    if len(g) > MAX_GRAMMAR:
        raise ConstraintError(f"{where} is too long ({len(g)} > {MAX_GRAMMAR} characters)")
    bad, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g)
    if bad:
        raise ConstraintError(f"{where}: {_first_line(messages[0])}")
    return g


def _first_line(message: str) -> str:
    """llguidance's message without the grammar excerpt it draws under it."""
    lines = [re.sub(r"^at \d+\(\d+\): ", "", line.strip()) for line in message.strip().splitlines() if line.strip()]
    keep = [line for line in lines if not set(line) <= {"^", " "} and not line[:1].isdigit()]
    return " ".join(keep[:3]) if keep else message.strip()


# ------------------------------------------------------------------------------------- vocabulary

class _Spelling:
    """What llguidance's TokenizerWrapper reads of a tokenizer: each token's bytes, and encode."""

    def __init__(self, tokenizer):
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._encode = tokenizer.encode

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, add_bos=False, parse_special=False)


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (drivers/model/tokenizer.py): built once, ~0.2 s
    for a 49k vocabulary; end of generation is any of the model's end-of-generation tokens."""
    vocab = _VOCABULARIES.get(tokenizer)
    if vocab is None:
        eog = sorted(tokenizer.eog_ids) or None
        vocab = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Spelling(tokenizer)), eos_token=eog)
        _VOCABULARIES[tokenizer] = vocab
    return vocab


def check(vocab: llguidance.LLTokenizer, grammar: str, where: str) -> None:
    """Refuse a grammar that cannot be used with this vocabulary, or that admits no output at all."""
    c = Constraint(vocab, grammar, 0, where)
    c.compute()
    if c.blocked():
        raise ConstraintError(f"{where} admits no output at all: {c.why()}")


# ------------------------------------------------------------------------------------- one sequence

class Constraint:
    """One sequence's grammar state: the tokens it has consumed, and the mask of what may follow."""

    def __init__(self, vocab: llguidance.LLTokenizer, grammar: str, prompt_len: int, where: str = "constraint"):
        self.matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"{where}: {_first_line(self.matcher.get_error())}")
        self.vocab, self.vocab_size, self.grammar = vocab, vocab.vocab_size, grammar
        self.eos = list(vocab.eos_tokens)
        self.prompt_len = prompt_len
        self.fed: list[int] = []              # the output tokens the matcher has consumed
        self.bits = np.full((vocab.vocab_size + 31) // 32, -1, dtype=np.int32)

    def sync(self, tokens: Sequence[int]) -> None:
        """Bring the matcher to the sequence's output: tokens is the whole sequence (prompt, then
        output), as the driver's history holds it."""
        out = tokens[self.prompt_len:]
        same = 0
        for a, b in zip(self.fed, out):
            if a != b:
                break
            same += 1
        if same < len(self.fed):
            if not self.matcher.rollback(len(self.fed) - same):
                self.matcher.reset()
                same = 0
            del self.fed[same:]
        rest = list(out[same:])
        if rest:
            self.matcher.consume_tokens(rest)     # a refusal leaves the matcher in error: blocked()
            self.fed.extend(rest)

    def compute(self) -> None:
        """The mask of the next token (llguidance releases the GIL while it works)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        self._allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little",
                                      count=self.vocab_size).view(bool)
        self._refused = ~self._allowed

    def allowed(self) -> np.ndarray:
        """The tokens the last compute() allows, one bool per token."""
        return self._allowed

    def blocked(self) -> bool:
        """No token can continue: the matcher is in error, or it allows only the end of generation
        where the grammar is not complete."""
        if self.matcher.is_error():
            return True
        if self.matcher.is_accepting():
            return False
        allowed = self._allowed
        return not (allowed.any() and (np.count_nonzero(allowed) > len(self.eos) or not allowed[self.eos].all()))

    def why(self) -> str:
        text = self.vocab.decode_str(self.fed)
        where = f"after {text[-60:]!r}" if self.fed else "at the start"
        return f"no token can continue the output {where}, and the grammar is not complete there"

    def apply(self, row: np.ndarray) -> None:
        """Set the logit of every token the grammar does not allow to -inf, in place (a float32 row
        of the model's vocabulary, which may be wider than the tokenizer's)."""
        width = min(len(row), self.vocab_size)
        np.copyto(row[:width], -np.inf, where=self._refused[:width])
        row[width:] = -np.inf


# ------------------------------------------------------------------------------------- a batch

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
    return _POOL


class Masks:
    """The masks of a batch's constrained rows, built in a worker thread: start before the forward
    pass, apply to its logits after. work is (row, constraint, the sequence's tokens so far)."""

    def __init__(self, work: Sequence[tuple[int, Constraint, Sequence[int]]], background: bool = True):
        self.work = list(work)
        self._future: Future | None = _pool().submit(self._build) if background else None
        if not background:
            self._build()

    def _build(self) -> None:
        for _, c, tokens in self.work:
            c.sync(tokens)
            c.compute()

    def apply(self, logits: np.ndarray) -> dict[int, str]:
        """Mask each constrained row of logits [rows, vocab] (float32, in place); return the rows
        whose constraint no token can continue, with why (their logits are left as they were)."""
        if self._future is not None:
            self._future.result()
        blocked = {}
        for row, c, _ in self.work:
            if c.blocked():
                blocked[row] = c.why()
            else:
                c.apply(logits[row])
        return blocked


# ------------------------------------------------------------------------------------- a driver's

class Constrained:
    """A driver's constrained sequences, by seq_id: the runner's one door to this module.

    ``admit`` reads a step's "constraint" (sent with its sampling parameters), ``masks`` starts the
    masks of the rows about to be sampled, ``release`` forgets sequences. The vocabulary is built
    from the model's file at the first constrained sequence.

    Masks are built beside the forward pass only when the process may use more CPUs than the
    forward pass's `threads`: on a machine without a spare core the worker thread would take one
    from the pass, whose threads all wait for the slowest (measured on 2 cores: a step of 8
    sequences, half constrained, 1.3x with the thread, 1.0x without). A mask takes ~0.05 ms."""

    def __init__(self, model_path: str, threads: int = 0):
        self.model_path = model_path
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.background = threads > 0 and cpus > threads
        self.vocab: llguidance.LLTokenizer | None = None
        self.by_seq: dict[int, Constraint] = {}

    def admit(self, step: Mapping[str, Any]) -> None:
        spec = step.get("constraint")
        if spec is None:
            if step.get("params") is not None:     # sent afresh without one: it has none
                self.by_seq.pop(step["seq_id"], None)
            return
        have = self.by_seq.get(step["seq_id"])
        if have is not None and have.grammar == spec["grammar"] and have.prompt_len == spec["prompt_len"]:
            return                                  # a recompute: sync() rolls it back as needed
        if self.vocab is None:
            from drivers.model.tokenizer import Tokenizer
            self.vocab = vocabulary(Tokenizer.from_gguf(self.model_path))
        self.by_seq[step["seq_id"]] = Constraint(self.vocab, spec["grammar"], int(spec["prompt_len"]))

    def masks(self, rows: Sequence[tuple[int, int, Sequence[int]]]) -> Masks | None:
        """rows: (row of the logits, seq_id, its tokens so far) of each sequence sampled; None when
        none of them is constrained (an unconstrained batch pays nothing more)."""
        work = [(row, self.by_seq[sid], tokens) for row, sid, tokens in rows if sid in self.by_seq]
        return Masks(work, self.background) if work else None

    def release(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self.by_seq.pop(sid, None)
