"""Text <-> token ids for a GGUF model, chat-template rendering, and streaming detokenization.

The tokenizer is built only from GGUF metadata (tokenizer.ggml.*) with the `tokenizers` library, choosing
the pre-tokenizer split the way llama.cpp does for the file's `tokenizer.ggml.pre`, so ids match llama.cpp.
Only byte-level BPE vocabularies (tokenizer.ggml.model == "gpt2") are supported.

Decoding never goes through `tokenizers`: every token has a byte string (byte-level tokens map back through
the GPT-2 byte alphabet; control and user-defined tokens are their literal text), and text is those bytes
joined and decoded as UTF-8. `StreamDecoder` does the same incrementally, emitting only whole characters
and holding back any tail that could still become a stop string.

Never: touch model weights, or decide when generation ends (the caller checks `eog_ids` and `stopped`).
"""

from __future__ import annotations

import codecs
import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from drivers.model.gguf import ModelError, read_metadata

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex splits llama.cpp applies, in order, before BPE
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **{name: (_GPT2_SPLIT,) for name in ("gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{name: (r"\p{N}", _GPT2_SPLIT) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                                     "exaone", "minerva")},
    **{name: (_LLAMA3_SPLIT,) for name in ("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3")},
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3"}   # a whole word in the vocab wins outright
_EOG_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>",
              "<|end_of_text|>"}


class UnsupportedTokenizerError(ModelError):
    """The GGUF's tokenizer is not one this library can build (type or pre-tokenizer named)."""


class ChatTemplateError(ValueError):
    """The chat template is missing or invalid, or it rejected the messages (raise_exception)."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable character map, as character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_CHAR_TO_BYTE = _byte_alphabet()
# The same as a str.translate table to latin-1 characters (one per byte); a character outside the
# alphabet becomes one latin-1 cannot encode, so that a token with any such character is told apart.
_NOT_A_BYTE = "\U00010000"
_TO_LATIN1 = {**{c: _NOT_A_BYTE for c in range(256)}, **{ord(ch): chr(b) for ch, b in _CHAR_TO_BYTE.items()}}


class Tokenizer:
    """A GGUF model's byte-level BPE tokenizer and chat template."""

    def __init__(self, metadata: Mapping[str, Any]):
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedTokenizerError(f"tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        pre = str(metadata.get("tokenizer.ggml.pre", "gpt2"))
        if pre == "default":
            pre = "gpt2"
        if pre not in _PRE_SPLITS:
            raise UnsupportedTokenizerError(f"pre-tokenizer {pre!r} is not supported"
                                            f" (supported: {', '.join(sorted(_PRE_SPLITS))})")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        self.pre = pre
        self.tokens = tokens
        self.vocab_size = len(tokens)
        self.bos_id = _opt_int(metadata.get("tokenizer.ggml.bos_token_id"))
        self.eos_id = _opt_int(metadata.get("tokenizer.ggml.eos_token_id"))
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")
        self.special_ids = frozenset(i for i, t in enumerate(types) if t == CONTROL)
        eog = {self.eos_id, _opt_int(metadata.get("tokenizer.ggml.eot_token_id")),
               _opt_int(metadata.get("tokenizer.ggml.eom_token_id"))}
        eog |= {i for i in self.special_ids if tokens[i] in _EOG_TEXTS}
        self.eog_ids = frozenset(i for i in eog if i is not None)
        self._bytes = [_token_bytes(tok, typ) for tok, typ in zip(tokens, types)]

        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                         ignore_merges=pre in _IGNORE_MERGES)
        hf = _HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in sorted(self.special_ids)])
        hf.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, typ in zip(tokens, types) if typ == USER_DEFINED])
        if hf.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise UnsupportedTokenizerError("special tokens do not map onto the vocabulary one-to-one")
        self._hf = hf
        self._hf_plain: _HFTokenizer | None = None     # same, but special-token text is ordinary text
        self._template: jinja2.Template | None = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls(read_metadata(path))

    # ------------------------------------------------------------------------------------------ ids

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for text. parse_special: "<|im_start|>" in the text is the control token, not 7 tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        hf = self._hf
        if not parse_special:
            if self._hf_plain is None:
                self._hf_plain = _HFTokenizer.from_str(self._hf.to_str())
                self._hf_plain.encode_special_tokens = True
            hf = self._hf_plain
        ids = hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        data = b"".join(self._bytes[i] for i in ids if not (skip_special and i in self.special_ids))
        return data.decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """The id of a token by its vocabulary spelling (e.g. "<|im_end|>"), or None."""
        return self._hf.token_to_id(text)

    # ------------------------------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            template: str | None = None, **extra: Any) -> str:
        """Render messages with the model's jinja chat template (or `template`) in a sandbox."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str):
                raise ChatTemplateError(f"message {i} has no string 'role'")
        compiled = self._compile(template)
        context = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.tokens[self.bos_id] if self.bos_id is not None else "",
            "eos_token": self.tokens[self.eos_id] if self.eos_id is not None else "",
            **extra,
        }
        try:
            return compiled.render(**context)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        """Rendered template as ids; no extra BOS is added (templates that want one write bos_token)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_bos=False)

    def _compile(self, template: str | None) -> jinja2.Template:
        if template is None and self._template is not None:
            return self._template
        source = template if template is not None else self.chat_template
        if not source:
            raise ChatTemplateError("this model has no chat template (tokenizer.chat_template is absent)")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            compiled = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None
        if template is None:
            self._template = compiled
        return compiled


class StreamDecoder:
    """Turns one sequence's generated ids into text pieces that are safe to send as they arrive.

    push() returns only complete UTF-8 characters, and never text that might be the start of a stop
    string; once a stop string appears, the text before it is returned, `stopped_on` names it, and
    everything after is dropped. flush() at the end returns what was held back (a dangling partial
    character becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special: bool = True):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special = skip_special
        self.stopped_on: str | None = None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.stopped_on is not None

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        if not (self.skip_special and self.tokenizer.is_special(token_id)):
            self._held += self._utf8.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._held += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        hits = [(held.find(s), s) for s in self.stop if s in held]
        if hits:
            at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            self.stopped_on, self._held = s, ""
            return held[:at]
        keep = 0
        if not final:
            for s in self.stop:      # longest tail of held that some stop string begins with
                for k in range(min(len(s) - 1, len(held)), keep, -1):
                    if held.endswith(s[:k]):
                        keep = k
                        break
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]


def _token_bytes(text: str, kind: int) -> bytes:
    if kind in (NORMAL, BYTE, UNKNOWN, UNUSED):
        try:        # every character of the byte-level alphabet, one byte each (C speed: 49k at start)
            return text.translate(_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:
            pass
    return text.encode("utf-8")       # control and user-defined tokens are stored as their literal text


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
