"""The paged forward pass against the contiguous reference, chunked prefill, batch invariance, validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import gguf

from drivers.model import kernels
from drivers.model.gguf import load_gguf
from drivers.model.llama import Chunk, KVPool, Llama
from .conftest import native_or_skip
from .reference import Reference, kl_divergence
from .tiny_gguf import Q, write_tiny_gguf

BLOCK = 4


class Blocks:
    """A shuffled free list, so block tables are never contiguous runs."""

    def __init__(self, n: int, seed: int = 0):
        self.free = list(range(n))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out


def prompt(n: int, seed: int, vocab: int = 400) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def paged_logits(model: Llama, tokens: list[int], cuts: list[int], block: int = BLOCK) -> torch.Tensor:
    """Logits of every position, feeding the prompt in chunks split at `cuts`."""
    pool = model.new_kv_pool(64, block)
    table = Blocks(64).take((len(tokens) + block - 1) // block)
    bounds = [0, *cuts, len(tokens)]
    rows = [model.step(pool, [Chunk(tokens[a:b], a, table, "all")]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def tiny_reference(tiny_path):
    return Reference(str(tiny_path))


def test_paged_matches_contiguous(tiny_model, tiny_reference):
    tokens = prompt(60, seed=1)
    expected = tiny_reference.logits(tokens)
    got = paged_logits(tiny_model, tokens, cuts=[1, 2, 9, 25, 26])
    assert got.shape == expected.shape == (60, 400)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa4", "mqa"])
def test_head_layouts(tmp_path, heads, kv_heads):
    path = write_tiny_gguf(tmp_path / "m.gguf", heads=heads, kv_heads=kv_heads)
    model = Llama.from_gguf(path)
    tokens = prompt(23, seed=2)
    torch.testing.assert_close(paged_logits(model, tokens, cuts=[10, 11]), Reference(str(path)).logits(tokens),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16], ids=lambda q: q.name)
def test_quantised_weights_against_the_fp32_reference(tmp_path, qtype):
    """Each type's held products, bf16 activations and KV, against fp32 from gguf-py's dequantisation
    of the same file: the KL divergence of the next-token distributions stays small."""
    path = write_tiny_gguf(tmp_path / "m.gguf", tied=False, quant=qtype, rope_theta=500.0)
    model = Llama.from_gguf(path)
    assert not model.config.tied_embeddings and model.dtype == torch.bfloat16
    assert model.new_kv_pool(4, BLOCK).dtype == torch.bfloat16
    _assert_close_to_reference(model, path)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_native_kernels_against_the_fp32_reference(tmp_path, qtype):
    """The same on llmos's compiled kernel: the file's blocks, fp32 activations and products."""
    path = write_tiny_gguf(tmp_path / "m.gguf", tied=False, quant=qtype, rope_theta=500.0)
    model = Llama.from_gguf(path, native=native_or_skip("native"))
    assert {m.layout for _, m in model.matrices()} == {"native"} and model.dtype == torch.float32
    assert model.new_kv_pool(4, BLOCK).dtype == torch.bfloat16 and model.refine == 0
    assert model.weight_bytes() == sum(t.nbytes for n, t in load_gguf(path).tensors.items()
                                       if len(t.shape) == 2 and n != "token_embd.weight")
    _assert_close_to_reference(model, path, bound=1e-4)     # only the KV pool is in bf16 (2e-6 measured)


def _assert_close_to_reference(model: Llama, path, bound: float = 2e-3) -> None:
    tokens = prompt(30, seed=3)
    got, want = paged_logits(model, tokens, cuts=[7]).cpu(), Reference(str(path)).logits(tokens)
    kl = kl_divergence(want, got).item()
    print(f"KL {kl:.2e}")
    assert kl < bound, kl
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_kv_dtype_is_chosen(tiny_path):
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model = Llama.from_gguf(tiny_path, kv_dtype=name)
        pool = model.new_kv_pool(4, BLOCK)
        assert pool.dtype == dtype and pool.data.element_size() == dtype.itemsize
        assert model.step(pool, [Chunk(prompt(5, 1), 0, [0, 1])]).dtype == torch.float32


def test_chunked_prefill_equals_one_shot(tiny_model):
    tokens = prompt(37, seed=4)
    whole_pool, split_pool = tiny_model.new_kv_pool(16, BLOCK), tiny_model.new_kv_pool(16, BLOCK)
    table = Blocks(16, seed=5).take(10)
    whole = tiny_model.step(whole_pool, [Chunk(tokens, 0, table)])
    for a, b in [(0, 5), (5, 6), (6, 20), (20, 36)]:
        assert tiny_model.step(split_pool, [Chunk(tokens[a:b], a, table, "none")]).shape == (0, 400)
    split = tiny_model.step(split_pool, [Chunk(tokens[36:], 36, table)])
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_pool.data, whole_pool.data, atol=1e-5, rtol=1e-5)


def greedy(model: Llama, pool: KVPool, tokens: list[int], table: list[int], steps: int) -> list[int]:
    out = []
    logits = model.step(pool, [Chunk(tokens, 0, table)])
    for i in range(steps):
        out.append(int(logits[0].argmax()))
        logits = model.step(pool, [Chunk([out[-1]], len(tokens) + i, table)])
    return out


def test_batch_invariance(tiny_model):
    """A greedy sequence decoded alone and inside a batch of 16 (others prefilling and decoding, with
    different lengths, in a different row order) yields the same tokens."""
    steps, blocks_each = 12, 16
    target = prompt(9, seed=6)
    alone = greedy(tiny_model, tiny_model.new_kv_pool(blocks_each, BLOCK), target, list(range(blocks_each)), steps)

    pool, blocks = tiny_model.new_kv_pool(16 * blocks_each, BLOCK), Blocks(16 * blocks_each, seed=7)
    seqs = [{"tokens": prompt(3 + 4 * i, seed=100 + i), "fed": 0, "table": blocks.take(blocks_each), "out": []}
            for i in range(15)]
    mine = {"tokens": list(target), "fed": 0, "table": blocks.take(blocks_each), "out": []}
    seqs.insert(6, mine)
    while len(mine["out"]) < steps:
        chunks, owners = [], []
        for s in seqs:
            pending = s["tokens"][s["fed"]:]
            feed = pending[:5] if s is not mine else pending    # others prefill 5 tokens per step
            chunks.append(Chunk(feed, s["fed"], s["table"], "last" if len(feed) == len(pending) else "none"))
            owners.append(s)
            s["fed"] += len(feed)
        logits = tiny_model.step(pool, chunks)
        rows = iter(logits)
        for ch, s in zip(chunks, owners):
            if ch.logits == "last":
                token = int(next(rows).argmax())
                s["out"].append(token)
                s["tokens"].append(token)
    assert mine["out"] == alone


def test_mixed_step_rows_follow_chunk_order(tiny_model, tiny_reference):
    a, b, c = prompt(8, 8), prompt(5, 9), prompt(6, 10)
    pool, blocks = tiny_model.new_kv_pool(32, BLOCK), Blocks(32, seed=11)
    ta, tb, tc = blocks.take(4), blocks.take(4), blocks.take(4)
    tiny_model.step(pool, [Chunk(a[:-1], 0, ta, "none"), Chunk(c[:-1], 0, tc, "none")])
    mixed = tiny_model.step(pool, [Chunk(a[-1:], 7, ta), Chunk(b, 0, tb, "all"), Chunk(c[-1:], 5, tc)])
    assert mixed.shape == (1 + 5 + 1, 400)
    ref_a, ref_b, ref_c = (tiny_reference.logits(t) for t in (a, b, c))
    torch.testing.assert_close(mixed[0], ref_a[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1:6], ref_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[6], ref_c[-1], atol=1e-4, rtol=1e-4)


def test_shared_prefix_blocks(tiny_model, tiny_reference):
    """Two sequences may share the blocks of a common prefix (prefix caching): only tables say so."""
    shared, x, y = prompt(8, 12), prompt(3, 13), prompt(4, 14)
    pool = tiny_model.new_kv_pool(16, BLOCK)
    prefix = [0, 1]                                     # 8 tokens = 2 full blocks
    tiny_model.step(pool, [Chunk(shared, 0, prefix, "none")])
    out = tiny_model.step(pool, [Chunk(x, 8, prefix + [2]), Chunk(y, 8, prefix + [3, 4])])
    torch.testing.assert_close(out[0], tiny_reference.logits(shared + x)[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], tiny_reference.logits(shared + y)[-1], atol=1e-4, rtol=1e-4)


def test_dense_copies_for_batched_steps(tmp_path):
    """dense_copy "always" gives every held matrix a bf16 copy for steps of at least its crossover
    rows: a batched step then runs on the copies and agrees with the held kernels; "never" makes none."""
    path = write_tiny_gguf(tmp_path / "m.gguf", quant=Q.Q4_0)
    lean, fast = Llama.from_gguf(path), Llama.from_gguf(path)
    plan = kernels.choose(lean, tmp_path / "cache", "never", budget=1 << 30)
    assert plan["dense_bytes"] == 0 and all(m.dense is None for _, m in lean.matrices())
    plan = kernels.choose(fast, tmp_path / "cache", "always", budget=1 << 30)
    assert plan["dense_bytes"] > 0 and all(m.dense is not None for _, m in fast.matrices())
    assert (tmp_path / "cache" / kernels.RECORD).is_file()           # the measurement is recorded
    tokens = [prompt(6, seed=s) for s in range(8)]
    table = [[2 * i, 2 * i + 1] for i in range(8)]
    out = [m.step(m.new_kv_pool(16, BLOCK), [Chunk(t, 0, tb) for t, tb in zip(tokens, table)])
           for m in (lean, fast)]
    assert kl_divergence(out[0], out[1]).item() < 1e-3
    assert kernels.choose(Llama.from_gguf(path), tmp_path / "cache", "always", budget=0)["dense_bytes"] == 0


def test_kernel_table_shows_each_kind_of_matrix(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", quant=Q.Q8_0)
    model = Llama.from_gguf(path)
    plan = kernels.choose(model, None, "never")
    rows = {r["matrix"]: r for r in kernels.table(model, plan)}
    assert set(rows) == {"output", "attn_qkv", "attn_output", "ffn_gate_up", "ffn_down", "token_embd"}
    assert rows["ffn_down"]["count"] == 2 and rows["ffn_down"]["layout"] == "int4pack"
    assert rows["ffn_down"]["types"] == "Q8_0" and rows["ffn_down"]["batched"] == "int4pack"
    assert rows["token_embd"]["layout"].startswith("file blocks")
    assert sum(r["bytes"] for n, r in rows.items() if n != "token_embd") == model.weight_bytes()


def test_pool_layout_and_sizing(tiny_model):
    c = tiny_model.config
    pool = tiny_model.new_kv_pool(10, 8)
    assert pool.data.shape == (c.n_layers, 2, 10, 8, c.n_kv_heads, c.head_dim)
    per_block = KVPool.block_bytes(c, 8, pool.dtype)
    assert per_block == pool.data[:, :, 0].numel() * pool.data.element_size()
    assert KVPool.for_memory(c, per_block * 7 + 1, 8, dtype=pool.dtype).num_blocks == 7
    assert KVPool.block_bytes(c, 8, torch.bfloat16) * 2 == KVPool.block_bytes(c, 8, torch.float32)


def test_unused_table_entries_are_ignored(tiny_model, tiny_reference):
    """Tables may list blocks reserved for later; only those covering fed positions are read."""
    pool = tiny_model.new_kv_pool(8, BLOCK)
    short, long_ = prompt(3, 18), prompt(9, 19)
    tiny_model.step(pool, [Chunk(short, 0, [0, 1]), Chunk(long_, 0, [2, 3, 4])])
    out = tiny_model.step(pool, [Chunk([7], 3, [0, 10**6]), Chunk([8], 9, [2, 3, 4, 10**6])])
    torch.testing.assert_close(out[0], tiny_reference.logits(short + [7])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], tiny_reference.logits(long_ + [8])[-1], atol=1e-4, rtol=1e-4)


def test_kv_written_where_the_table_says(tiny_model):
    pool = tiny_model.new_kv_pool(8, BLOCK)
    tiny_model.step(pool, [Chunk(prompt(6, 16), 0, [5, 2])])
    used = pool.data.abs().sum(dim=(0, 1, 4, 5))          # [blocks, slots]
    assert used[5].all() and used[2, :2].all()
    assert not used[2, 2:].any() and not used[[0, 1, 3, 4, 6, 7]].any()


@pytest.mark.parametrize("chunks,message", [
    ([], "at least one chunk"),
    ([Chunk([], 0, [0])], "no tokens"),
    ([Chunk([1] * 5, 0, [0])], "need 2"),
    ([Chunk([1], 0, [99])], "block ids"),
    ([Chunk([400], 0, [0])], "token ids"),
    ([Chunk([1], -1, [0])], "outside"),
    ([Chunk([1], 256, [0] * 70)], "outside"),
    ([Chunk([1], 0, [0], "first")], "logits must be"),
    ([Chunk([1], 4, [0, 3]), Chunk([2], 4, [1, 3])], "same KV slot"),
])
def test_step_rejects_bad_chunks(tiny_model, chunks, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.step(tiny_model.new_kv_pool(8, BLOCK), chunks)


def _kquant_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose weights are of order 1/sqrt(cols): gguf-py cannot quantise these."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.float16(1.0 / np.sqrt(cols) / {Q.Q4_K: 8 * 32, Q.Q5_K: 16 * 32, Q.Q6_K: 32 * 64}[qtype])
    for at in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
        raw[..., at:at + 2] = np.array([scale], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _k_mix_file(tmp_path, mix: str):
    main = Q.Q4_K if mix == "Q4_K_M" else Q.Q5_K
    hidden, ffn, heads, kv_heads = 256, 512, 4, 2
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * 64, hidden), "attn_v": (kv_heads * 64, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    override = {}
    for i in range(2):
        for j, (part, (rows, cols)) in enumerate(shapes.items()):
            qtype = Q.Q6_K if part in ("attn_v", "ffn_down") else main
            override[f"blk.{i}.{part}.weight"] = (_kquant_blocks(qtype, rows, cols, 10 * i + j), qtype)
    override["output.weight"] = (_kquant_blocks(Q.Q6_K, 400, hidden, 99), Q.Q6_K)
    return write_tiny_gguf(tmp_path / "mix.gguf", hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                           tied=False, quant=Q.Q8_0, override=override)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M"])
def test_k_quant_mixes_run_against_the_fp32_reference(tmp_path, mix):
    """Q4_K_M and Q5_K_M files mix K-quant types inside one fused product (v in Q6_K beside q and k):
    they load, run, and stay close to fp32 from the same blocks."""
    path = _k_mix_file(tmp_path, mix)
    model = Llama.from_gguf(path)
    layouts = {name.split(".")[-1]: m.layout for name, m in model.matrices()}
    assert layouts["attn_qkv"] == "int4pack+int4pack+bf16" and layouts["ffn_down"] == "bf16"
    assert layouts["ffn_gate_up"] == "int4pack" and layouts["output"] == "bf16"
    tokens = prompt(24, seed=5)
    got, want = paged_logits(model, tokens, cuts=[9]), Reference(str(path)).logits(tokens)
    assert torch.isfinite(want).all() and want.std() > 0.1         # the synthetic weights do something
    assert kl_divergence(want, got).item() < 2e-3


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_M", "Q5_K_M"])
def test_blocks_the_gpu_layout_against_the_fp32_reference(tmp_path, kind):
    """The layout a GPU holds quantised weights in (Blocks: each weight's own value, a scale and
    offset per group, expanded to bf16 a slice at a time inside each product). Its torch code is the
    same on any device; no GPU is here (tests/test_cuda_driver.py runs it on one when present), so
    it runs on the CPU with blocks=True. Every type, Q6_K's 16-weight groups included, loads in at
    most 1.7x the file's bytes (bf16 would be 3.2-3.6x) and stays within KL 2e-3 of fp32."""
    if kind.endswith("_M"):
        path = _k_mix_file(tmp_path, kind)
    else:
        path = write_tiny_gguf(tmp_path / "m.gguf", tied=False, quant=Q[kind], rope_theta=500.0)
    model = Llama.from_gguf(path, blocks=True)
    layouts = {part for _, m in model.matrices() for part in m.layout.split("+")}
    assert layouts == {"blocks"}, layouts
    held = sum(t.nbytes for n, t in load_gguf(path).tensors.items() if len(t.shape) == 2 and n != "token_embd.weight")
    assert model.weight_bytes() <= 1.7 * held
    _assert_close_to_reference(model, path)
    plan = kernels.choose(model, tmp_path / "cache", "always", budget=1 << 30)
    assert plan["dense_bytes"] > 0 and all(m.dense is not None for _, m in model.matrices())


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no GPU: torch.cuda.is_available() is false (the Blocks code runs on the CPU above)")
@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_quantised_weights_on_a_real_gpu(tmp_path, kind):
    """On a GPU a quantised file is held as Blocks by default, not expanded to bf16."""
    path = _k_mix_file(tmp_path, kind) if kind.endswith("_M") else \
        write_tiny_gguf(tmp_path / "m.gguf", tied=False, quant=Q[kind], rope_theta=500.0)
    model = Llama.from_gguf(path, device="cuda:0")
    assert {part for _, m in model.matrices() for part in m.layout.split("+")} == {"blocks"}
    _assert_close_to_reference(model, path)
