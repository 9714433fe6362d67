"""The forward pass on a device other than the CPU: every tensor a step makes is made on the model's device.

No GPU exists where these tests run, so torch's "meta" device stands in for "cuda:N": like a GPU, it
refuses to mix its tensors with CPU ones (a tensor made on the host by mistake raises), and it computes
shapes only, so it checks placement, not numbers. The test with numbers needs a real GPU and is skipped,
saying why, when torch.cuda.is_available() is false.
"""

from __future__ import annotations

import pytest
import torch

from drivers.model.llama import Chunk, KVPool, Llama

GPU = torch.cuda.is_available()
NO_GPU = "no GPU: torch.cuda.is_available() is false (a CPU build of torch, or no device)"


def mixed_step() -> list[Chunk]:
    """Decodes of different lengths (a mask), a fresh prompt, and a prompt chunk continuing a sequence."""
    return [Chunk([5], 6, [0, 1]), Chunk([7], 2, [2]), Chunk([1, 2, 3, 4, 5], 0, [3, 4]),
            Chunk([9, 8, 7], 4, [5, 6], "all")]


def test_meta_refuses_host_tensors():
    """The stand-in can fail: mixing a meta tensor with a CPU one raises, as with a GPU's."""
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(3, device="meta") + torch.ones(3)


def test_a_step_on_a_device_makes_its_tensors_there(tiny_path):
    """meta standing in for cuda: weights, pool, plan and activations all on the model's device."""
    model = Llama.from_gguf(tiny_path, device="meta")
    assert model.device == torch.device("meta")
    assert all(t.device.type == "meta" for t in (model.embed.dense, model.norm, model.rope_table,
                                                  model.layers[0].wqkv.w, model.layers[-1].w_down.w))
    pool = model.new_kv_pool(8, 4)
    assert pool.data.device.type == "meta"
    logits = model.step(pool, mixed_step())
    assert logits.device.type == "meta" and logits.shape == (1 + 1 + 1 + 3, model.config.vocab_size)
    assert model.step(pool, [Chunk([3], 7, [0, 1], "none")]).device.type == "meta"


def test_quantised_weights_stay_in_their_width_on_a_device(tmp_path):
    """torch's int4 layout is the CPU's: on another device a quantised file is held as Blocks (each
    weight's 4 or 8 bits, a scale and offset a group, all on the device), products and pool in bf16."""
    from .tiny_gguf import Q, write_tiny_gguf
    model = Llama.from_gguf(write_tiny_gguf(tmp_path / "q.gguf", quant=Q.Q4_0), device="meta")
    assert {m.layout for _, m in model.matrices()} == {"blocks"}
    assert all(t.device.type == "meta" for _, m in model.matrices() for t in (m.u, m.scale, m.offset))
    assert model.dtype == torch.bfloat16 and model.new_kv_pool(4, 4).dtype == torch.bfloat16
    model.refine = 0              # the fp32 recount of top logits needs torch.unique, which meta lacks
    assert model.step(model.new_kv_pool(8, 4), mixed_step()).device.type == "meta"


def test_a_pool_on_another_device_is_refused(tiny_model):
    pool = KVPool(tiny_model.config, 4, 4, device="meta")
    with pytest.raises(ValueError, match="KV pool is on meta, the model on cpu"):
        tiny_model.step(pool, [Chunk([1, 2], 0, [0])])


@pytest.mark.skipif(not GPU, reason=NO_GPU)
def test_logits_on_a_gpu_match_the_cpu(tiny_path, tiny_model):
    gpu = Llama.from_gguf(tiny_path, device="cuda:0")
    on_gpu = gpu.step(gpu.new_kv_pool(8, 4), mixed_step())
    on_cpu = tiny_model.step(tiny_model.new_kv_pool(8, 4), mixed_step())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    assert torch.equal(on_gpu.cpu().argmax(-1), on_cpu.argmax(-1))
