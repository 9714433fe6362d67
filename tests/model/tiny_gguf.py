"""Writes tiny random Llama GGUFs for the model-library tests.

A 2-layer random model with a real byte-level BPE vocabulary (trained here on a few sentences with
`tokenizers`), written with gguf.GGUFWriter: every test that needs a model file gets one in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import gguf

Q = gguf.GGMLQuantizationType

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Hello there, how are you today? I'm fine, thanks.",
    "Numbers like 12345 and 3.14159 appear in text; so do emails: a@b.co",
    "Ünïcödé text: café, naïve, résumé, 日本語のテキスト, emoji 😀🎉 and Ελληνικά.",
    "def main():\n    return 42\n\nif __name__ == '__main__':\n    main()\n",
    "the the the and and of of to to in in is is it it that that",
]


# ---------------------------------------------------------------------------------------------- vocab

_VOCAB_CACHE: dict[int, tuple[list[str], list[str]]] = {}


def tiny_vocab(size: int = 400) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on CORPUS; specials are ids 0, 1, 2."""
    if size not in _VOCAB_CACHE:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        model = json.loads(tok.to_str())["model"]
        vocab = model["vocab"]
        tokens = [None] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        _VOCAB_CACHE[size] = (tokens, merges)
    return _VOCAB_CACHE[size]


# ---------------------------------------------------------------------------------------------- writer

def _encode(array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32:
        return array.astype(np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def llama_writer(path: Path, *, arch: str = "llama", name: str, n_layers: int, context: int, hidden: int,
                 ffn: int, heads: int, kv_heads: int, file_type: int, tokens: list[str], merges: list[str],
                 rope_theta: float = 10000.0, chat_template: str | None = CHATML_TEMPLATE,
                 pre: str = "smollm") -> gguf.GGUFWriter:
    """A GGUFWriter holding a Llama's metadata and a byte-level BPE vocabulary; add the tensors, then
    write_header_to_file, write_kv_data_to_file, write_tensors_to_file and close."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return w


def write_tiny_gguf(path: Path, *, arch: str = "llama", quant: Q = Q.F32, n_layers: int = 2, hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2, ffn: int = 128, context: int = 256, tied: bool = True,
                    seed: int = 0, drop: tuple[str, ...] = (), override: dict | None = None,
                    chat_template: str | None = CHATML_TEMPLATE, pre: str = "smollm",
                    rope_theta: float = 10000.0) -> Path:
    """A random Llama GGUF with a real byte-level BPE vocabulary; `drop` omits tensors by name and
    `override` maps a tensor name to (raw uint8 bytes, quant type) written as is."""
    tokens, merges = tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def mat(out, inp):
        return rng.standard_normal((out, inp)).astype(np.float32) / np.sqrt(inp)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    tensors = {"token_embd.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
               "output_norm.weight": norm(hidden)}
    if not tied:
        tensors["output.weight"] = mat(vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        tensors.update({
            p + "attn_norm.weight": norm(hidden),
            p + "attn_q.weight": mat(heads * head_dim, hidden),
            p + "attn_k.weight": mat(kv_heads * head_dim, hidden),
            p + "attn_v.weight": mat(kv_heads * head_dim, hidden),
            p + "attn_output.weight": mat(hidden, heads * head_dim),
            p + "ffn_norm.weight": norm(hidden),
            p + "ffn_gate.weight": mat(ffn, hidden),
            p + "ffn_up.weight": mat(ffn, hidden),
            p + "ffn_down.weight": mat(hidden, ffn),
        })

    file_type = "ALL_F32" if quant == Q.F32 else f"MOSTLY_{quant.name}"
    w = llama_writer(path, arch=arch, name="tiny-test-llama", n_layers=n_layers, context=context, hidden=hidden,
                     ffn=ffn, heads=heads, kv_heads=kv_heads, rope_theta=rope_theta,
                     file_type=int(getattr(gguf.LlamaFileType, file_type, gguf.LlamaFileType.GUESSED)),
                     tokens=tokens, merges=merges, chat_template=chat_template, pre=pre)
    override = override or {}
    for name, array in tensors.items():
        if name in drop:
            continue
        if name in override:
            raw, qtype = override[name]
            w.add_tensor(name, raw, raw_dtype=qtype)
            continue
        data, raw_dtype = _encode(array, quant if array.ndim == 2 else Q.F32)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
