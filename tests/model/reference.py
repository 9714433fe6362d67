"""The fp32 reference forward pass the model tests compare with: deliberately not the library's.

Weights are dequantised by the gguf package itself (not drivers/model/quant.py), held in fp32, and run
through a plain, cache-free Llama with its own RoPE and attention. Slow and memory-hungry on purpose:
it is the yardstick for fidelity, never a way to serve a model.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

import gguf

from drivers.model.gguf import ModelFile, load_gguf


class Reference:
    def __init__(self, model: ModelFile | str):
        self.mf = mf = load_gguf(model) if not isinstance(model, ModelFile) else model
        reader = gguf.GGUFReader(mf.path)
        self.w = {}
        for t in reader.tensors:
            values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)   # writable
            self.w[t.name] = torch.from_numpy(values.reshape(tuple(int(d) for d in reversed(t.shape.tolist()))))
        c = mf.config
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        if c.has_rope_freqs:
            inv = inv / self.w["rope_freqs.weight"].double()
        self.inv_freq = inv

    @torch.inference_mode()
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """fp32 logits [n, vocab] for every position of one sequence."""
        c, w = self.mf.config, self.w
        n, H, KVH, D = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
        group = H // KVH
        angles = torch.outer(torch.arange(n, dtype=torch.float64) / c.rope_scale, self.inv_freq)
        cos, sin = angles.cos().float(), angles.sin().float()

        def rope(t):                           # t [n, heads, D]; pairs (2i, 2i+1) rotate by angle i
            even, odd = t[..., 0::2], t[..., 1::2]
            c_, s_ = cos[:, None, :], sin[:, None, :]
            return torch.stack((even * c_ - odd * s_, even * s_ + odd * c_), dim=-1).flatten(-2)

        def rms(t, weight):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.rms_eps) * weight

        causal = torch.full((n, n), float("-inf")).triu(1)
        x = w["token_embd.weight"][torch.tensor(list(tokens))]
        for i in range(c.n_layers):
            p = f"blk.{i}."
            h = rms(x, w[p + "attn_norm.weight"])
            q = rope((h @ w[p + "attn_q.weight"].T).view(n, H, D)).transpose(0, 1)
            k = rope((h @ w[p + "attn_k.weight"].T).view(n, KVH, D)).transpose(0, 1).repeat_interleave(group, 0)
            v = (h @ w[p + "attn_v.weight"].T).view(n, KVH, D).transpose(0, 1).repeat_interleave(group, 0)
            scores = q @ k.transpose(1, 2) / math.sqrt(D) + causal
            x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, H * D) @ w[p + "attn_output.weight"].T
            h = rms(x, w[p + "ffn_norm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T)
            x = x + (gate * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        out = w["token_embd.weight"] if c.tied_embeddings else w["output.weight"]
        return rms(x, w["output_norm.weight"]) @ out.T


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(reference || other), from logits [n, vocab] (tensors or numpy arrays)."""
    p = torch.as_tensor(reference).double().log_softmax(-1)
    q = torch.as_tensor(other).double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()
