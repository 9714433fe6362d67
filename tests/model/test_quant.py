"""The type table: every supported GGUF type held in its own bits, and its product against fp32.

Blocks come from gguf-py's own quantiser where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16) and
are otherwise random bytes with small finite fp16 scales, which are valid blocks of any K-quant. The
expected values always come from gguf-py's dequantiser, never from drivers/model/quant.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf
from drivers.model import quant
from .tiny_gguf import Q

ROWS, COLS = 64, 512          # 64 rows: int4pack packs 64 at a time; 512 = two K-quant super-blocks
CPU = torch.device("cpu")
QUANTISABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}
# how each type is held on the CPU, and at most how many bytes that takes per byte of the file
HELD = {Q.F32: ("fp32", 1.0), Q.F16: ("fp16", 1.0), Q.BF16: ("bf16", 1.0),
        Q.Q4_0: ("int4pack", 1.12), Q.Q4_1: ("int4pack", 1.0), Q.Q4_K: ("int4pack", 1.12),
        Q.Q5_0: ("int4pack", 1.82), Q.Q5_1: ("int4pack", 1.67), Q.Q5_K: ("int4pack", 1.82),
        Q.Q8_0: ("int4pack", 1.18), Q.Q6_K: ("bf16", 2.44), Q.Q2_K: ("bf16", 6.1), Q.Q3_K: ("bf16", 4.7)}


def raw_tensor(qtype: Q, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> quant.RawTensor:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        data = values.view(np.uint8)
    elif qtype == Q.F16:
        data = values.astype(np.float16).view(np.uint8)
    elif qtype in QUANTISABLE or qtype == Q.BF16:
        data = gguf.quants.quantize(values, qtype)
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for at in SCALES[qtype]:
            data[..., at:at + 2] = rng.uniform(0.001, 0.05, data.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return quant.RawTensor("t", int(qtype), (rows, cols), np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def reference(t: quant.RawTensor) -> torch.Tensor:
    values = gguf.quants.dequantize(t.data.reshape(t.shape[0], -1), Q(t.ggml_type))
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(t.shape))


def test_every_supported_type_has_a_row():
    from drivers.model.gguf import SUPPORTED_TYPES
    assert set(quant.TYPES) == set(SUPPORTED_TYPES) == {int(q) for q in HELD}


@pytest.mark.parametrize("qtype", [q for q in HELD if quant.TYPES[int(q)].unpack], ids=lambda q: q.name)
def test_unpacking_is_exact(qtype):
    """(u, scale, offset) and the int4 planes reproduce gguf-py's dequantised values exactly."""
    t = raw_tensor(qtype)
    u, scale, offset = t.row.unpack(t.blocks())
    assert u.dtype == np.uint8 and u.max() < (1 << t.row.bits)
    expected = reference(t).numpy()
    g = t.row.group
    np.testing.assert_array_equal(u * np.repeat(scale, g, 1) + np.repeat(offset, g, 1), expected)
    planes = quant.int4_planes(u, t.row.bits, scale, offset)
    assert len(planes) == t.row.planes and all(q.max() <= 15 for q, _, _ in planes)
    total = sum((q.astype(np.float32) - 8) * np.repeat(s, g, 1) + np.repeat(z, g, 1) for q, s, z in planes)
    np.testing.assert_allclose(total, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("qtype", list(HELD), ids=lambda q: q.name)
def test_held_layout_size_and_product(qtype):
    t = raw_tensor(qtype, seed=int(qtype))
    m = quant.hold([t], CPU)
    layout, max_ratio = HELD[qtype]
    assert m.layout == layout and m.shape == (ROWS, COLS)
    assert m.nbytes <= max_ratio * t.data.nbytes + 1, (m.nbytes, t.data.nbytes)
    w = reference(t)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(1))
    dtype = torch.float32 if layout == "fp32" else torch.bfloat16
    got = m(x.to(dtype)).float()
    want = x @ w.T
    rel = ((got - want).norm() / want.norm()).item()
    # bf16 activations, scales and outputs cost ~4e-3 per product (the probe); fp32 is exact
    assert rel < (1e-6 if layout == "fp32" else 1e-2), rel
    assert torch.allclose(m.to_dense().float(), w, rtol=1e-2, atol=1e-2 * w.abs().max().item())


def test_parts_of_different_layouts_stack():
    """A Q4_K_M file's qkv: q and k in Q4_K (int4pack), v in Q6_K (bf16): run part by part."""
    parts = [raw_tensor(Q.Q4_K, 64, 512, 1), raw_tensor(Q.Q4_K, 64, 512, 2), raw_tensor(Q.Q6_K, 64, 512, 3)]
    m = quant.hold(parts, CPU)
    assert m.layout == "int4pack+int4pack+bf16" and m.shape == (192, 512)
    x = torch.randn(3, 512)
    want = x @ torch.cat([reference(p) for p in parts]).T
    got = m(x.bfloat16()).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_parts_of_one_layout_fuse():
    parts = [raw_tensor(Q.Q8_0, 64, 512, 1), raw_tensor(Q.Q8_0, 128, 512, 2)]
    m = quant.hold(parts, CPU)
    assert isinstance(m, quant.Int4Pack) and m.planes == 2 and m.shape == (192, 512)
    x = torch.randn(2, 512)
    want = x @ torch.cat([reference(p) for p in parts]).T
    assert ((m(x.bfloat16()).float() - want).norm() / want.norm()).item() < 1e-2


def test_rows_int4pack_cannot_take_are_held_dense():
    t = raw_tensor(Q.Q4_0, rows=40)             # the int4 kernel wants a multiple of 16 rows
    assert quant.hold([t], CPU).layout == "bf16"
    assert quant.hold([raw_tensor(Q.Q4_0)], torch.device("meta")).layout == "blocks"  # off the CPU: Blocks
    assert quant.hold([raw_tensor(Q.Q2_K)], torch.device("meta")).layout == "bf16"    # ... where it has an unpacker


def test_dense_copy_serves_batched_steps():
    m = quant.hold([raw_tensor(Q.Q4_1)], CPU)
    x1, x8 = torch.randn(1, COLS).bfloat16(), torch.randn(8, COLS).bfloat16()
    held8 = m(x8)
    m.dense, m.dense_rows = m.to_dense(), 4
    assert torch.equal(m(x1), m.product(x1))                       # below the crossover: the held kernel
    assert torch.equal(m(x8), torch.nn.functional.linear(x8, m.dense))
    assert ((m(x8).float() - held8.float()).norm() / held8.float().norm()).item() < 1e-2


def test_a_non_finite_scale_names_the_tensor():
    t = raw_tensor(Q.Q4_0)
    blocks = t.data.reshape(ROWS, -1, 18)
    blocks[3, 1, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    t.name, t.offset = "blk.0.ffn_up.weight", 4096
    with pytest.raises(quant.BadTensor, match=r"blk\.0\.ffn_up\.weight \(offset 4096\): row 3"):
        quant.hold([t], CPU)


def test_packing_in_pieces_gives_the_bytes_of_packing_whole(monkeypatch):
    """Rows are unpacked and packed CHUNK_ROWS at a time (a low peak while loading); with 64-row
    alignment that must be the very layout packing everything at once gives."""
    parts = [raw_tensor(Q.Q8_0, 192, 512, 1), raw_tensor(Q.Q8_0, 128, 512, 2)]
    whole = quant.hold(parts, CPU)
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    pieces = quant.hold(parts, CPU)
    assert torch.equal(whole.packed, pieces.packed) and torch.equal(whole.scales_zeros, pieces.scales_zeros)
    unaligned = quant.hold([raw_tensor(Q.Q4_0, 96, 512, 3), raw_tensor(Q.Q4_0, 48, 512, 4)], CPU)
    x = torch.randn(2, 512)
    want = x @ torch.cat([reference(raw_tensor(Q.Q4_0, 96, 512, 3)), reference(raw_tensor(Q.Q4_0, 48, 512, 4))]).T
    assert ((unaligned(x.bfloat16()).float() - want).norm() / want.norm()).item() < 1e-2
