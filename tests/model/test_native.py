"""llmos's compiled kernels (drivers/model/native.c): products, norm and attention against numpy and
torch, the measured choice, and the fallback when there is no compiler.

The library is built once per session with the machine's compiler; every test that needs it says so
(and is skipped, with the reason, only where it cannot be built).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drivers.model import kernels, native
from drivers.model.gguf import load_gguf
from drivers.model.llama import Chunk, Llama
from .conftest import native_or_skip
from .tiny_gguf import Q, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.fixture(scope="module")
def lib():
    native_or_skip("native")
    return native.library()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 33])
def test_products_match_numpy(lib, qtype, rows):
    """Every type, at one row (the decode case), a few (one pass per block) and many (rows expanded
    once): fp32 results within float rounding of numpy over gguf-py's dequantised weights."""
    rng = np.random.default_rng(rows)
    t = native.random_tensor(qtype, 48, 160, rng)
    x = torch.from_numpy(rng.standard_normal((rows, 160)).astype(np.float32))
    got = lib.gemm(lib.prepare([t]), x, torch.empty((rows, 48))).numpy()
    want = x.numpy().astype(np.float64) @ t.dequantize().astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fused_parts_land_side_by_side(lib):
    """q, k and v of different types and heights in one product: each part's columns in place."""
    rng = np.random.default_rng(1)
    parts = [native.random_tensor(Q.Q4_1, 64, 96, rng), native.random_tensor(Q.Q8_0, 16, 96, rng),
             native.random_tensor(Q.Q4_0, 32, 96, rng)]
    x = torch.from_numpy(rng.standard_normal((2, 96)).astype(np.float32))
    got = lib.gemm(lib.prepare(parts), x, torch.empty((2, 112))).numpy()
    want = np.concatenate([x.numpy() @ t.dequantize().T for t in parts], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_bad_arguments_are_refused_not_run(lib):
    t = native.random_tensor(Q.Q8_0, 16, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1..8 parts"):
        lib.prepare([t] * 9)
    bad = native.RawTensor("odd", int(Q.Q8_0), (16, 48), t.data)       # in must be a multiple of 32
    with pytest.raises(ValueError, match="refused its arguments"):
        lib.gemm(lib.prepare([bad]), torch.zeros(1, 48), torch.empty(1, 16))


def test_rms_norm_matches_torch(lib):
    """Alone, and after the residual step it is fused with (x += y in place, y fp32 or bf16), out in
    fp32 or bf16 (rounded as torch rounds)."""
    x, w = torch.randn(7, 576) * 3, torch.randn(576)
    torch.testing.assert_close(lib.rms_norm(x.clone(), w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), atol=1e-5, rtol=1e-5)
    for ydtype in (torch.float32, torch.bfloat16):
        y = (torch.randn(7, 576) * 2).to(ydtype)
        stream = x.clone()
        got = lib.rms_norm(stream, w, 1e-5, add=y, dtype=torch.bfloat16)
        torch.testing.assert_close(stream, x + y.float(), atol=1e-6, rtol=1e-6)         # the residual, in place
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), F.rms_norm(x + y.float(), (576,), w, 1e-5), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_decode_attention_reads_the_pool_where_the_table_says(lib, dtype):
    """SmolLM2's heads (9 query heads on 3 kv heads, 64 wide), sequences of different lengths on
    shuffled blocks, against softmax attention over the gathered keys in fp32."""
    blocks, bs, kvh, heads, dim = 40, 16, 3, 9, 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(blocks, bs, kvh, dim, generator=g).to(dtype)
    v = torch.randn(blocks, bs, kvh, dim, generator=g).to(dtype)
    order = torch.randperm(blocks, generator=g)
    lengths = [1, 17, 100, 33]
    tables = torch.zeros(len(lengths), 8, dtype=torch.long)
    at = 0
    for n, length in enumerate(lengths):
        need = (length + bs - 1) // bs
        tables[n, :need] = order[at:at + need]
        at += need
    q = torch.randn(len(lengths), heads, dim, generator=g)
    got = lib.attend(q, k, v, tables, torch.tensor(lengths, dtype=torch.int32), dim ** -0.5)
    for n, length in enumerate(lengths):
        keys = k[tables[n]].reshape(-1, kvh, dim)[:length].float().repeat_interleave(heads // kvh, 1)
        vals = v[tables[n]].reshape(-1, kvh, dim)[:length].float().repeat_interleave(heads // kvh, 1)
        p = torch.softmax(torch.einsum("hd,phd->hp", q[n], keys) * dim ** -0.5, -1)
        torch.testing.assert_close(got[n], torch.einsum("hp,phd->hd", p, vals), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_rope_store_writes_the_pool_rows_and_rotates_adjacent_pairs(lib, dtype):
    """q and k rotated pair by pair as llama.py's _rotate does, k and v written to their slots in
    the pool's dtype, every other row untouched; from fp32 and from bf16 projections."""
    from drivers.model.llama import _rotate
    heads, kvh, dim, t = 9, 3, 64, 4
    angles = torch.rand(t, dim // 2, dtype=torch.float64) * 50
    rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    for source in (torch.float32, torch.bfloat16):
        qkv = torch.randn(t, (heads + 2 * kvh) * dim).to(source)
        k, v = torch.zeros(20, kvh, dim, dtype=dtype), torch.zeros(20, kvh, dim, dtype=dtype)
        slots = torch.tensor([19, 0, 7, 8])
        q = lib.rope_store(qkv, heads, kvh, rope, k, v, slots)
        turned = _rotate(qkv[:, :(heads + kvh) * dim].float().view(t, heads + kvh, dim), rope.unsqueeze(1))
        torch.testing.assert_close(q, turned[:, :heads], atol=1e-5, rtol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(k[slots].float(), turned[:, heads:], atol=tol, rtol=tol)
        assert torch.equal(v[slots], qkv[:, (heads + kvh) * dim:].float().view(t, kvh, dim).to(dtype))
        others = [i for i in range(20) if i not in slots.tolist()]
        assert not k[others].any() and not v[others].any()


def test_silu_mul_matches_torch(lib):
    gate_up = torch.randn(5, 3072) * 4
    want = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(lib.silu_mul(gate_up, torch.float32), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(lib.silu_mul(gate_up, torch.bfloat16), lib.silu_mul(gate_up, torch.float32).to(torch.bfloat16))


def test_attention_refuses_a_length_beyond_its_table(lib):
    k = v = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="refused its arguments"):
        lib.attend(torch.zeros(1, 2, 8), k, v, torch.zeros(1, 2, dtype=torch.long),
                   torch.tensor([9], dtype=torch.int32), 1.0)


def test_the_choice_is_measured_recorded_and_followed(lib, tmp_path):
    """auto times each kind of matrix both ways once, records it under this machine, and holds a
    matrix natively exactly where the record says native took at most FASTER of the other's time."""
    path = write_tiny_gguf(tmp_path / "m.gguf", quant=Q.Q4_0, tied=False)
    mf = load_gguf(path)
    choice = kernels.prefer_native(mf, tmp_path / "cache", "auto")
    record = json.loads((tmp_path / "cache" / kernels.RECORD).read_text())[kernels.machine_key()]["native"]
    kinds = {kernels.tensor_key(t) for n, t in mf.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"}
    assert set(record) == kinds
    assert choice.kinds == {k for k, r in record.items() if r["native_us"] <= kernels.FASTER * r["held_us"]}
    # the record is what later loads follow: make native lose everywhere, and nothing is held natively
    data = json.loads((tmp_path / "cache" / kernels.RECORD).read_text())
    for r in data[kernels.machine_key()]["native"].values():
        r["native_us"] = 10 * r["held_us"]
    (tmp_path / "cache" / kernels.RECORD).write_text(json.dumps(data))
    model = Llama.from_gguf(path, native="auto", cache_dir=tmp_path / "cache")
    assert not any("native" in m.layout for _, m in model.matrices())
    assert model.ops is not None              # the norm and attention kernels still run
    assert "on (" in kernels.native_status(model)
    assert kernels.prefer_native(mf, tmp_path / "cache", "never") is None
    assert kernels.prefer_native(mf, None, "always").kinds == kinds
    with pytest.raises(ValueError, match="native must be one of auto, never, always"):
        kernels.prefer_native(mf, None, "sometimes")


def test_native_and_torch_kernels_agree_on_a_decode_run(lib, tmp_path):
    """A Q4_1 model decoding 6 tokens of 3 sequences: the same greedy tokens on both paths."""
    path = write_tiny_gguf(tmp_path / "m.gguf", quant=Q.Q4_1, tied=True)
    picks = []
    for model in (Llama.from_gguf(path), Llama.from_gguf(path, native="always")):
        pool = model.new_kv_pool(32, 4)
        tables = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
        prompts = [[5, 9, 31, 7], [44, 2, 8, 19, 21, 3, 6], [100]]
        last = model.step(pool, [Chunk(p, 0, t) for p, t in zip(prompts, tables)]).argmax(-1).tolist()
        out = [last]
        for s in range(5):
            chunks = [Chunk([tok], len(p) + s, t) for tok, p, t in zip(out[-1], prompts, tables)]
            out.append(model.step(pool, chunks).argmax(-1).tolist())
        picks.append(out)
    assert picks[0] == picks[1]


def test_without_a_compiler_llmos_runs_torchs_kernels(tmp_path):
    """No compiler: library() says why, the model loads on torch's kernels, and `models` says so."""
    path = write_tiny_gguf(tmp_path / "m.gguf", quant=Q.Q8_0)
    code = ("import sys; from drivers.model import native, kernels; from drivers.model.llama import Llama\n"
            f"m = Llama.from_gguf({str(path)!r}, native='auto')\n"
            "print(native.library() is None, sorted({x.layout for _, x in m.matrices()}), kernels.native_status(m))")
    env = dict(os.environ, CC="/nonexistent/cc", PATH="/nonexistent", PYTHONPATH=str(ROOT),
               LLMOS_NATIVE_DIR=str(tmp_path / "native"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True ['int4pack'] off (RuntimeError: no C compiler ($CC, cc or gcc) on PATH)"
    assert not (tmp_path / "native").exists()


def test_a_build_is_cached_per_source_and_machine(tmp_path):
    """A fresh cache directory gets one library, named by the source/compiler/CPU hash; loading again
    reuses it (same file, not rebuilt)."""
    native_or_skip("native")
    code = "from drivers.model import native; lib = native.library(); print(lib.path, lib.path.stat().st_mtime_ns)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMOS_NATIVE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert first.stdout == again.stdout
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.stdout.split()[0]).name]
