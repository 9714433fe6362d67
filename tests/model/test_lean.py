"""The torch-free engine (drivers/model/lean.py): the same forward pass as the fp32 reference, from the
file's own mapped blocks, in a process that never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drivers.model.batch import Chunk, StepAborted
from drivers.model.gguf import load_gguf

from .conftest import lean_or_skip
from .reference import Reference, kl_divergence
from .test_llama import _k_mix_file
from .tiny_gguf import Q, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 9, 14, 3, 27, 8, 41, 2, 33, 17, 6, 12, 20, 1, 4, 30, 22]
# bf16 K/V bound what any type gets; the 4-bit blocks are the weights the reference reads too
KL = {"F32": 2e-4, "F16": 2e-4, "Q8_0": 2e-4, "Q4_0": 2e-4, "Q4_1": 2e-4}


@pytest.fixture(scope="module", params=sorted(KL))
def typed(request, tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("lean") / f"{request.param}.gguf", quant=Q[request.param],
                           tied=request.param != "Q4_1")
    return request.param, path, lean_or_skip(path)


def test_every_native_type_matches_the_fp32_reference(typed):
    """Each type, read where the file keeps it, against fp32 weights the gguf package dequantised;
    prompt fed as two chunks through blocks out of order, then a decoding token."""
    name, path, model = typed
    want = Reference(str(path)).logits(PROMPT).numpy()
    pool = model.new_kv_pool(16, 4)
    table = [9, 2, 14, 0, 7]
    got = np.concatenate([model.step(pool, [Chunk(PROMPT[:6], 0, table, "all")]),
                          model.step(pool, [Chunk(PROMPT[6:-1], 6, table, "all")]),
                          model.step(pool, [Chunk(PROMPT[-1:], len(PROMPT) - 1, table)])])
    assert got.shape == want.shape and got.dtype == np.float32
    assert kl_divergence(want, got).item() < KL[name]
    assert (got.argmax(-1) == want.argmax(-1)).sum() >= len(PROMPT) - 1     # a near tie may flip
    assert all(isinstance(t.data, np.memmap) for t in model.mapped.values())     # the file's own pages
    assert model.weight_bytes() <= path.stat().st_size


def test_a_batch_of_decodes_and_a_prompt_is_each_sequence_alone(typed):
    _, _, model = typed
    pool = model.new_kv_pool(32, 4)
    a, b = [3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8]
    alone_a = model.step(pool, [Chunk(a, 0, [0, 1], "all")])
    alone_b = model.step(pool, [Chunk(b, 0, [2, 3], "all")])
    pool2 = model.new_kv_pool(32, 4)
    model.step(pool2, [Chunk(a[:-1], 0, [10, 11], "none")])
    both = model.step(pool2, [Chunk(b, 0, [12, 13], "all"), Chunk(a[-1:], len(a) - 1, [10, 11])])
    np.testing.assert_allclose(both[:len(b)], alone_b, atol=1e-4)
    np.testing.assert_allclose(both[len(b)], alone_a[-1], atol=1e-4)


def test_bad_chunks_are_refused_and_an_abort_writes_nothing_else(typed):
    _, _, model = typed
    pool = model.new_kv_pool(8, 4)
    with pytest.raises(ValueError, match="block table has 1 blocks"):
        model.step(pool, [Chunk([1, 2, 3, 4, 5], 0, [0])])
    with pytest.raises(ValueError, match="token ids must be in"):
        model.step(pool, [Chunk([10 ** 6], 0, [0])])
    with pytest.raises(ValueError, match="block ids must be in 0..7"):
        model.step(pool, [Chunk([1], 0, [8])])
    before = pool.data.copy()
    layers = iter(range(10))
    with pytest.raises(StepAborted, match="before layer 1"):
        model.step(pool, [Chunk([1, 2], 0, [3])], lambda: next(layers) == 1)
    changed = np.argwhere((pool.data != before).any(axis=(0, 1, 3, 4, 5)))
    assert set(changed.ravel().tolist()) <= {3}      # only the chunk's own block was written


def test_kv_dtypes(tiny_path):
    from drivers.model.lean import LeanLlama
    lean_or_skip(tiny_path)
    mf = load_gguf(tiny_path)
    rows = {}
    for kv in ("bf16", "fp16", "fp32"):
        model = LeanLlama(mf, kv_dtype=kv)
        pool = model.new_kv_pool(8, 4)
        assert pool.dtype == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[kv]
        rows[kv] = model.step(pool, [Chunk(PROMPT, 0, list(range(5)), "all")])
    np.testing.assert_allclose(rows["bf16"], rows["fp32"], atol=0.15)
    np.testing.assert_allclose(rows["fp16"], rows["fp32"], atol=0.01)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        LeanLlama(mf, kv_dtype="int3")


def test_which_engine_runs_what(tmp_path, tiny_path):
    """auto runs lean with dense_copy "never" on a file native.c multiplies, torch otherwise, and says
    why; engine "lean" on a K-quant file is refused naming the type."""
    from drivers.runner import ModelRunner
    lean_or_skip(tiny_path)
    assert ModelRunner.from_gguf(tiny_path, num_blocks=8, dense_copy="never").info()["engine"].startswith("lean")
    fast = ModelRunner.from_gguf(tiny_path, tmp_path, num_blocks=8, dense_copy="auto").info()["engine"]
    assert fast == "torch"
    kq = _k_mix_file(tmp_path, "Q4_K_M")
    info = ModelRunner.from_gguf(kq, tmp_path, num_blocks=8, dense_copy="never").info()
    assert info["engine"] == "torch (not lean: native.c does not multiply Q4_K, Q6_K)"
    with pytest.raises(ValueError, match="cannot run .*mix.gguf: native.c does not multiply Q4_K, Q6_K"):
        ModelRunner.from_gguf(kq, num_blocks=8, engine="lean")
    with pytest.raises(ValueError, match="engine must be one of auto, torch, lean"):
        ModelRunner.from_gguf(tiny_path, num_blocks=8, engine="fast")


def test_the_lean_runner_never_imports_torch(smollm_path):
    """The whole driver library path (load, step, sample, info) in a fresh interpreter."""
    lean_or_skip(smollm_path)
    code = ("import sys\n"
            "from drivers.runner import ModelRunner\n"
            f"r = ModelRunner.from_gguf({str(smollm_path)!r}, num_blocks=16, dense_copy='never')\n"
            "out = r.step([{'seq_id': 1, 'tokens': [1, 504, 3458, 282], 'start': 0, 'block_table': [0],"
            " 'sample': True, 'params': {'temperature': 0.7, 'top_p': 0.9, 'seed': 3, 'logprobs': 2}}])\n"
            "info = r.info()\n"
            "print(info['engine'], len(out[0]['top']), r.kv_bytes, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    engine, top, kv_bytes, torch_loaded = done.stdout.split()[-4:]
    assert torch_loaded == "False" and top == "2" and int(kv_bytes) == 30 * 2 * 16 * 16 * 3 * 64 * 2
    assert "lean" in done.stdout
