"""Synthetic Llama GGUF files of real sizes, for benchmarks: random blocks, written in seconds.

Nothing can be downloaded here, so a "1B model" is made: the shapes of TinyLlama-1.1B (hidden 2048,
22 layers, 32 heads sharing 4 KV heads, FFN 5632, vocabulary 32000), every matrix in Q4_0 blocks of
random nibbles under small fp16 scales (so activations stay finite), norms of ones, and the small
byte-level BPE vocabulary of tests/model/tiny_gguf.py padded with placeholder tokens to 32000 ids.
Its answers are noise; its memory and speed are a 1B model's. A measuring tool only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf

Q = gguf.GGMLQuantizationType
TINYLLAMA = dict(hidden=2048, n_layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000, context=2048)


def _q4_0(rows: int, cols: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random Q4_0 blocks [rows, cols / 32 * 18]: nibbles uniform, d = scale / 8."""
    blocks = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
    blocks[..., 0:2] = np.array([scale / 8], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_synthetic(path: Path, *, hidden: int, n_layers: int, heads: int, kv_heads: int, ffn: int,
                    vocab: int, context: int, seed: int = 0) -> Path:
    from tests.model.tiny_gguf import llama_writer, tiny_vocab
    rng = np.random.default_rng(seed)
    tokens, merges = tiny_vocab()
    tokens = tokens + [f"<pad{i}>" for i in range(vocab - len(tokens))]
    head_dim = hidden // heads
    w = llama_writer(path, name=f"synthetic-{n_layers}x{hidden}", n_layers=n_layers, context=context,
                     hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, tokens=tokens, merges=merges,
                     file_type=int(gguf.LlamaFileType.MOSTLY_Q4_0))

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, _q4_0(rows, cols, rng, 1.0 / np.sqrt(cols)), raw_dtype=Q.Q4_0)

    matrix("token_embd.weight", vocab, hidden)
    matrix("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        matrix(p + "attn_q.weight", heads * head_dim, hidden)
        matrix(p + "attn_k.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_v.weight", kv_heads * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, heads * head_dim)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
