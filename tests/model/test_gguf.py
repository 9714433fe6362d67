"""GGUF loading: dequantisation of each supported type, config parsing, the weight cache, clear errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import gguf
from .tiny_gguf import Q, write_tiny_gguf
from drivers.model.gguf import (CorruptModelError, MissingTensorError, ModelError, UnsupportedArchitectureError,
                                UnsupportedQuantError, cache_key, dequantize, describe, load_gguf)

ROWS, COLS = 8, 256     # 256 columns: one K-quant super-block per row


def _one_tensor_file(path, data: np.ndarray, qtype: Q | None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path).tensors[0]


def _f16(raw: np.ndarray, offset: int) -> np.ndarray:
    return raw[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Independent dequantisation of the simple block formats, from the ggml block layouts."""
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    if qtype == Q.Q8_0:
        d = _f16(blocks, 0)
        return d[:, None] * blocks[:, 2:].view(np.int8).astype(np.float32)
    if qtype in (Q.Q4_0, Q.Q4_1):
        start = 2 if qtype == Q.Q4_0 else 4
        qs = blocks[:, start:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)     # low nibbles first
        d = _f16(blocks, 0)[:, None]
        return (q - 8) * d if qtype == Q.Q4_0 else q * d + _f16(blocks, 2)[:, None]
    raise AssertionError(qtype)


# relative RMS error a round trip through each type may show
ROUND_TRIP = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.06, Q.Q5_1: 0.06,
              Q.Q4_0: 0.12, Q.Q4_1: 0.12}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda q: q.name)
def test_round_trip_through_gguf_quantize(tmp_path, qtype):
    original = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype == Q.F32:
        data, raw_dtype = original, None
    elif qtype == Q.F16:
        data, raw_dtype = original.astype(np.float16), None
    else:
        data, raw_dtype = gguf.quants.quantize(original, qtype), qtype
    tensor = _one_tensor_file(tmp_path / "t.gguf", data, raw_dtype)
    assert tensor.tensor_type == qtype
    out = dequantize(tensor)
    assert out.dtype == torch.float32 and tuple(out.shape) == (ROWS, COLS)
    rel = float(np.sqrt(np.mean((out.numpy() - original) ** 2) / np.mean(original ** 2)))
    assert rel <= ROUND_TRIP[qtype] + 1e-9
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        expected = _reference(np.asarray(data), qtype).reshape(ROWS, COLS)
        np.testing.assert_array_equal(out.numpy(), expected)


def _random_kquant(qtype: Q, rng) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantise these) with small finite fp16 scales."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(ROWS, size), dtype=np.uint8)
    scale_offsets = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in scale_offsets:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, ROWS).astype(np.float16).view(np.uint8).reshape(ROWS, 2)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_gguf_reference(tmp_path, qtype):
    # expected values come from gguf-py's own dequantiser: this checks our plumbing (type dispatch, shape,
    # orientation), not ggml's maths
    raw = _random_kquant(qtype, np.random.default_rng(2))
    tensor = _one_tensor_file(tmp_path / "t.gguf", raw, qtype)
    out = dequantize(tensor)
    assert tuple(out.shape) == (ROWS, COLS)
    assert torch.isfinite(out).all()
    np.testing.assert_array_equal(out.numpy(), gguf.quants.dequantize(raw, qtype).reshape(ROWS, COLS))


def test_unsupported_quant_type_is_named(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    raw = np.zeros((128, 64 // block * size), dtype=np.uint8)      # ffn_up is [ffn=128, hidden=64]
    path = write_tiny_gguf(tmp_path / "iq.gguf", override={"blk.0.ffn_up.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_up\.weight.*IQ4_NL"):
        load_gguf(path)


# ---------------------------------------------------------------------------------------------- config

def test_config_and_metadata(tiny_path):
    mf = load_gguf(tiny_path)
    c = mf.config
    assert (c.architecture, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden, c.ffn) == ("llama", 2, 4, 2, 64, 128)
    assert (c.head_dim, c.context_length, c.vocab_size, c.bos_id, c.eos_id) == (16, 256, 400, 1, 2)
    assert c.rope_theta == 10000.0 and c.rms_eps == pytest.approx(1e-5)
    assert c.tied_embeddings and "output.weight" not in mf.weights
    assert mf.metadata["tokenizer.ggml.model"] == "gpt2"
    assert mf.weights["blk.0.attn_k.weight"].shape == (2 * 16, 64)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantised_model_loads(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / "q.gguf", quant=qtype)
    mf = load_gguf(path)
    assert all(w.dtype == torch.float32 for w in mf.weights.values())
    assert describe(path)["quantization"] == qtype.name


def test_describe(tiny_path):
    d = describe(tiny_path)
    assert d["name"] == "tiny-test-llama" and d["architecture"] == "llama"
    assert d["quantization"] == "F32" and d["context_length"] == 256
    assert d["file_size"] == tiny_path.stat().st_size
    expected = sum(w.numel() for w in load_gguf(tiny_path).weights.values())
    assert d["parameters"] == expected


def test_progress_reports_reach_total(tiny_path):
    calls = []
    load_gguf(tiny_path, progress=lambda done, total, what: calls.append((done, total, what)))
    assert calls[-1][0] == calls[-1][1] > 0
    assert any("blk.1.ffn_down.weight" in what for _, _, what in calls)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


# ---------------------------------------------------------------------------------------------- cache

def test_second_load_comes_from_cache_and_is_identical(tiny_path, tmp_path):
    first = load_gguf(tiny_path, tmp_path)
    assert not first.from_cache
    assert (tmp_path / cache_key(tiny_path) / "weights.pt").is_file()
    second = load_gguf(tiny_path, tmp_path)
    assert second.from_cache and second.cache_entry == first.cache_entry
    assert second.config == first.config and second.summary == first.summary
    assert second.metadata == first.metadata
    assert second.weights.keys() == first.weights.keys()
    for name, w in first.weights.items():
        assert torch.equal(second.weights[name], w), name


def test_changed_file_misses_the_cache(tiny_path, tmp_path):
    copy = tmp_path / "m.gguf"
    shutil.copy(tiny_path, copy)
    load_gguf(copy, tmp_path / "cache")
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not load_gguf(copy, tmp_path / "cache").from_cache


def test_damaged_cache_entry_is_rebuilt(tiny_path, tmp_path):
    entry = load_gguf(tiny_path, tmp_path).cache_entry
    (entry / "weights.pt").write_bytes(b"not a torch file")
    again = load_gguf(tiny_path, tmp_path)
    assert not again.from_cache
    assert load_gguf(tiny_path, tmp_path).from_cache


# ---------------------------------------------------------------------------------------------- errors

def test_truncated_tensor_data(tiny_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:-1000])
    with pytest.raises(CorruptModelError, match="truncated"):
        load_gguf(cut)


@pytest.mark.parametrize("keep", [0, 3, 200])
def test_truncated_header(tiny_path, tmp_path, keep):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_path.read_bytes()[:keep])
    with pytest.raises(CorruptModelError):
        load_gguf(cut)


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptModelError, match="not a readable GGUF"):
        load_gguf(junk)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_gguf(tmp_path / "absent.gguf")


def test_wrong_architecture_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        load_gguf(path)
    assert describe(path)["architecture"] == "gpt2"      # describe still works for a listing


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(MissingTensorError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf(path)


def test_errors_are_model_errors():
    for cls in (CorruptModelError, MissingTensorError, UnsupportedArchitectureError, UnsupportedQuantError):
        assert issubclass(cls, ModelError)
