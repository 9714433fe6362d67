"""Tokenizer from GGUF metadata, chat templates, and the streaming detokenizer (tiny vocabulary)."""

from __future__ import annotations

import pytest

from drivers.model.gguf import load_gguf
from drivers.model.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer, UnsupportedTokenizerError
from .tiny_gguf import SPECIAL_TOKENS

TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "café naïve résumé — “quotes” ½ ²",
    "日本語のテキスト, Ελληνικά, עברית, emoji 😀🎉👩‍👩‍👧",
    "digits 1234567890 and 3.14159",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)
    assert tiny_tokenizer.decode(ids) == text


def test_merges_are_used(tiny_tokenizer):
    # "the" is frequent in the training corpus, so it must be one token, not three bytes
    assert len(tiny_tokenizer.encode(" the")) == 1
    assert len(tiny_tokenizer.encode("the quick brown fox")) < len("the quick brown fox")


def test_digits_are_split_one_by_one(tiny_tokenizer):
    # the "smollm" pre-tokenizer isolates every digit before BPE, as llama.cpp does
    ids = tiny_tokenizer.encode("12345")
    assert [tiny_tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_tokens(tiny_tokenizer):
    start, end = tiny_tokenizer.token_id("<|im_start|>"), tiny_tokenizer.token_id("<|im_end|>")
    assert (start, end) == (1, 2)
    ids = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    plain = tiny_tokenizer.encode("<|im_start|>user", parse_special=False)
    assert start not in plain and tiny_tokenizer.decode(plain) == "<|im_start|>user"
    assert tiny_tokenizer.decode(ids) == "user\nhi"
    assert tiny_tokenizer.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tiny_tokenizer.special_ids == frozenset({0, 1, 2})
    assert {0, 2} <= tiny_tokenizer.eog_ids       # <|endoftext|> and the eos <|im_end|>


def test_bos(tiny_tokenizer):
    assert tiny_tokenizer.encode("hi")[0] != 1
    assert tiny_tokenizer.encode("hi", add_bos=True)[0] == tiny_tokenizer.bos_id == 1


def test_chat_template(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tiny_tokenizer.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tiny_tokenizer.encode_chat(messages)
    assert ids.count(tiny_tokenizer.token_id("<|im_start|>")) == 3


def test_template_variables_and_raise_exception(tiny_tokenizer):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('first message must be from the user') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}")
    assert tiny_tokenizer.apply_chat_template([{"role": "user", "content": "é"}], template=template) \
        == '<|im_start|>"é"<|im_end|>'
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        tiny_tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], template=template)


def test_template_is_sandboxed(tiny_tokenizer):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], template=evil)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], template="{% for %}")


def test_bad_messages(tiny_tokenizer):
    with pytest.raises(ChatTemplateError):
        tiny_tokenizer.apply_chat_template("hello")
    with pytest.raises(ChatTemplateError, match="role"):
        tiny_tokenizer.apply_chat_template([{"content": "x"}])


def test_unsupported_tokenizers(tiny_path):
    metadata = dict(load_gguf(tiny_path).metadata)
    with pytest.raises(UnsupportedTokenizerError, match="'llama'"):
        Tokenizer({**metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(UnsupportedTokenizerError, match="'mystery'"):
        Tokenizer({**metadata, "tokenizer.ggml.pre": "mystery"})
    no_template = {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"}
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(no_template).apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------- streaming

def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst case for a streaming decoder."""
    by_bytes = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in tok.special_ids}
    return [by_bytes[bytes([b])] for b in text.encode("utf-8")]


def stream(tok: Tokenizer, ids: list[int], **kw) -> tuple[list[str], StreamDecoder]:
    dec = StreamDecoder(tok, **kw)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces, dec


def test_stream_never_splits_a_character(tiny_tokenizer):
    text = "a😀é日本👩‍👧z"
    pieces, dec = stream(tiny_tokenizer, byte_ids(tiny_tokenizer, text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1:4] == ["", "", ""] and pieces[4] == "😀"     # held until the 4th byte arrives
    assert not dec.stopped


def test_stream_matches_decode_for_real_tokens(tiny_tokenizer):
    for text in TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert "".join(stream(tiny_tokenizer, ids)[0]) == tiny_tokenizer.decode(ids)


def test_stream_dangling_bytes_become_replacement_char(tiny_tokenizer):
    ids = byte_ids(tiny_tokenizer, "ok😀")[:-2]
    assert "".join(stream(tiny_tokenizer, ids)[0]) == "ok\ufffd"


def test_stop_string_spanning_tokens(tiny_tokenizer):
    text = "Hello STOP world"
    pieces, dec = stream(tiny_tokenizer, byte_ids(tiny_tokenizer, text), stop=["STOP"])
    assert "".join(pieces) == "Hello "
    assert dec.stopped and dec.stopped_on == "STOP"
    assert dec.push(5) == "" and dec.flush() == ""


def test_partial_stop_is_held_then_released(tiny_tokenizer):
    dec = StreamDecoder(tiny_tokenizer, stop=["STOP"])
    ids = byte_ids(tiny_tokenizer, "a STx")
    assert [dec.push(i) for i in ids] == ["a", " ", "", "", "STx"]
    assert not dec.stopped


def test_earliest_stop_wins_and_multibyte_stops(tiny_tokenizer):
    pieces, dec = stream(tiny_tokenizer, byte_ids(tiny_tokenizer, "one é! two END"), stop=["END", "é!"])
    assert "".join(pieces) == "one " and dec.stopped_on == "é!"
    pieces, dec = stream(tiny_tokenizer, byte_ids(tiny_tokenizer, "tail ST"), stop=["STOP"])
    assert "".join(pieces) == "tail ST" and not dec.stopped            # flush releases the held prefix


def test_stop_inside_one_token(tiny_tokenizer):
    ids = tiny_tokenizer.encode("the quick brown fox")
    pieces, dec = stream(tiny_tokenizer, ids, stop=["quick"])
    assert "".join(pieces) == "the " and dec.stopped_on == "quick"


def test_special_tokens_in_stream(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hi<|im_end|>")
    assert "".join(stream(tiny_tokenizer, ids)[0]) == "hi"
    assert "".join(stream(tiny_tokenizer, ids, skip_special=False)[0]) == "hi<|im_end|>"


def test_out_of_range_ids(tiny_tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_tokenizer.decode([5, 400])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StreamDecoder(tiny_tokenizer).push(-1)


def test_bad_stop_strings(tiny_tokenizer):
    with pytest.raises(ValueError):
        StreamDecoder(tiny_tokenizer, stop=[""])
    assert StreamDecoder(tiny_tokenizer, stop="x").stop == ["x"]


def test_special_token_spellings_are_in_vocab(tiny_tokenizer):
    for text in SPECIAL_TOKENS:
        assert tiny_tokenizer.tokens[tiny_tokenizer.token_id(text)] == text


def test_tokenizer_import_does_not_load_torch():
    """The tokenizer service imports only this module; torch would cost it ~1.7 s and ~200 MB."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = "import sys, drivers.model.tokenizer; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
