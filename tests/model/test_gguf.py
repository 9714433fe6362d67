"""GGUF loading: the tensor directory, config parsing, no weights on disk, clear errors for bad files.

How each type's blocks become held matrices is tests/model/test_quant.py's subject.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gguf
from .conftest import native_or_skip
from .tiny_gguf import Q, write_tiny_gguf
from drivers.model.gguf import (CorruptModelError, MissingTensorError, ModelError, UnsupportedArchitectureError,
                                UnsupportedQuantError, describe, load_gguf)
from drivers.model.llama import Llama

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
    assert c.tied_embeddings and "output.weight" not in mf.tensors
    assert mf.metadata["tokenizer.ggml.model"] == "gpt2"
    k = mf.tensors["blk.0.attn_k.weight"]
    assert k.shape == (2 * 16, 64) and k.type_name == "F32" and k.nbytes == 2 * 16 * 64 * 4


def test_tensor_directory_points_at_the_bytes(tiny_path):
    """read() returns exactly the bytes gguf-py finds for each tensor."""
    mf = load_gguf(tiny_path)
    for t in gguf.GGUFReader(tiny_path).tensors:
        raw = mf.read(t.name)
        assert raw.data.tobytes() == np.asarray(t.data).tobytes(), t.name
        assert mf.memmap(t.name).data.tobytes() == raw.data.tobytes()


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_quantised_model_loads_in_its_own_bits(tmp_path, qtype):
    path = write_tiny_gguf(tmp_path / "q.gguf", quant=qtype)
    mf = load_gguf(path)
    assert {t.type_name for t in mf.tensors.values() if len(t.shape) == 2} == {qtype.name}
    assert describe(path)["quantization"] == qtype.name
    held = {r["type"]: r for r in describe(path)["held"]}
    assert held[qtype.name]["layout"] == ("fp16" if qtype == Q.F16 else "int4pack")
    assert held["F32"]["tensors"] == 5                       # the norms: 2 per layer and the output's
    model = Llama(mf)
    assert not any(m.layout == "fp32" for _, m in model.matrices())     # never expanded to fp32
    assert model.weight_bytes() < 2.0 * mf.matrix_bytes


def test_describe(tiny_path):
    d = describe(tiny_path)
    assert d["name"] == "tiny-test-llama" and d["architecture"] == "llama"
    assert d["quantization"] == "F32" and d["context_length"] == 256
    assert d["file_size"] == tiny_path.stat().st_size
    expected = sum(int(np.prod(t.shape)) for t in load_gguf(tiny_path).tensors.values())
    assert d["parameters"] == expected


def test_progress_reports_reach_total(tiny_path):
    calls = []
    Llama.from_gguf(tiny_path, progress=lambda done, total, what: calls.append((done, total, what)))
    assert calls[-1][0] == calls[-1][1] > 0
    assert any("blk.1.ffn_down.weight" in what for _, _, what in calls)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


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


@pytest.mark.parametrize("kernel", ["torch", "native"])
def test_a_corrupt_block_names_the_tensor_and_offset(tmp_path, kernel):
    values = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q.Q4_0)
    raw.reshape(-1)[0:2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    path = write_tiny_gguf(tmp_path / "nan.gguf", override={"blk.1.ffn_gate.weight": (raw, Q.Q4_0)})
    offset = load_gguf(path).tensors["blk.1.ffn_gate.weight"].offset
    with pytest.raises(CorruptModelError, match=rf"blk\.1\.ffn_gate\.weight \(offset {offset}\)"):
        Llama.from_gguf(path, native=native_or_skip(kernel))


def test_an_undefined_type_code_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    mf = load_gguf(path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    assert mf.tensors["blk.0.ffn_up.weight"].type_name == "F32"
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_up\.weight.*250"):
        load_gguf(bad)


def test_errors_are_model_errors():
    for cls in (CorruptModelError, MissingTensorError, UnsupportedArchitectureError, UnsupportedQuantError):
        assert issubclass(cls, ModelError)
