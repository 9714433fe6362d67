"""The Llama forward pass over a paged KV cache.

A driver owns one `Llama` and one `KVPool`. Each scheduler step arrives as a list of `Chunk`s (plain token
ids, a start position, a block table), one per running sequence: a decoding sequence feeds one token, a
prefilling one feeds a slice of its prompt. `Llama.step` runs them all as one flat batch: every matmul sees
all tokens at once; only attention is split, into one batched group for all single-token chunks plus one
group per prompt chunk (prompt chunks are few and long, so a loop over them costs nothing measurable).

Rotary embedding rotates ADJACENT pairs (x[2i], x[2i+1]) because llama.cpp's converter permutes the q/k
weights; this is what GGUF weights need. `forward_contiguous` is a deliberately separate, plain
implementation (its own RoPE and attention, no pool) that tests use as the reference.

Never: allocate KV blocks (the scheduler does), keep per-sequence state between steps (the block tables
are the state), or sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from drivers.model.gguf import LlamaConfig, ModelFile, Progress, load_gguf

LOGITS_CHOICES = ("last", "all", "none")


class StepAborted(RuntimeError):
    """A step given up half-way because its caller asked (a more urgent request arrived)."""


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: tokens at positions start, start+1, ...; KV lives in block_table."""
    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]
    logits: str = "last"       # "last": logits of the last token; "all": of every token; "none"


class KVPool:
    """Keys and values for every sequence: [layers, 2, num_blocks, block_size, kv_heads, head_dim].

    Position p of a sequence lives in block block_table[p // block_size], row p % block_size.
    """

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16,
                 device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros((config.n_layers, 2, num_blocks, block_size, config.n_kv_heads, config.head_dim),
                                dtype=torch.float32, device=device)
        # per-layer views: one row per (block, slot) for writing single tokens, one row per block for
        # gathering a sequence's blocks (whole-block copies are ~1.6x faster than row by row)
        rows = (num_blocks * block_size, config.n_kv_heads, config.head_dim)
        self.k = [self.data[i, 0].view(rows) for i in range(config.n_layers)]
        self.v = [self.data[i, 1].view(rows) for i in range(config.n_layers)]
        self.k_blocks = [self.data[i, 0].view(num_blocks, -1) for i in range(config.n_layers)]
        self.v_blocks = [self.data[i, 1].view(num_blocks, -1) for i in range(config.n_layers)]

    @staticmethod
    def block_bytes(config: LlamaConfig, block_size: int = 16) -> int:
        return config.n_layers * 2 * block_size * config.n_kv_heads * config.head_dim * 4   # fp32

    @classmethod
    def for_memory(cls, config: LlamaConfig, max_bytes: int, block_size: int = 16,
                   device: str | torch.device = "cpu") -> "KVPool":
        return cls(config, max(1, max_bytes // cls.block_bytes(config, block_size)), block_size, device)


class _Matrix:
    """One weight matrix w [out, in], called like F.linear(x, w) but faster on CPU.

    Measured with MKL on 2 AVX2 cores (SmolLM2 shapes): computing (w @ x.T).T is 1.5x faster than x @ w.T
    for 2..64 rows, and one row is fastest as two identical rows (a one-row GEMV of a row-major matrix is
    1.3x slower). The fp32 weight is used as loaded, so cached weights stay shared and memory-mapped.
    With fp16_single_token an fp16 copy serves one-row inputs (single-stream decode): the AVX2 fp16 GEMV is
    ~2x faster again; fp16 with several rows is far slower, so batches stay fp32.
    On any other device (a GPU) these tricks do not apply: plain F.linear, fp32, no fp16 copy.
    """
    __slots__ = ("w", "h", "cpu")

    def __init__(self, w: torch.Tensor, fp16_single_token: bool):
        self.w = w
        self.cpu = w.device.type == "cpu"
        self.h = w.half() if fp16_single_token and self.cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] -> [rows, out]; the result may be a transposed (non-contiguous) view."""
        if not self.cpu:
            return F.linear(x, self.w)
        if x.shape[0] == 1:
            if self.h is not None:
                return F.linear(x.half(), self.h).float()
            return (self.w @ x.expand(2, -1).contiguous().t())[:, :1].t()
        return (self.w @ x.t()).t()


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")

    def __init__(self, w: dict[str, torch.Tensor], i: int, fp16: bool):
        p = f"blk.{i}."
        self.attn_norm = w[p + "attn_norm.weight"]
        # fused projections: one matmul instead of three (q, k, v) and two (gate, up) per layer
        self.wqkv = _Matrix(torch.cat([w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]]), fp16)
        self.wo = _Matrix(w[p + "attn_output.weight"], fp16)
        self.ffn_norm = w[p + "ffn_norm.weight"]
        self.w_gate_up = _Matrix(torch.cat([w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]]), fp16)
        self.w_down = _Matrix(w[p + "ffn_down.weight"], fp16)


@dataclass
class _Prefill:
    rows: slice                   # this chunk's rows in the flat batch
    start: int                    # position of its first token
    blocks: torch.Tensor | None   # block ids holding positions [0, start + n); None when start == 0 (fresh K/V)
    mask: torch.Tensor            # [1, 1, group * n, keys] bool, True = may attend


@dataclass
class _Plan:
    tokens: torch.Tensor          # [T] in internal order: all decode tokens first, then prompt chunks
    rope: torch.Tensor            # [T, head_dim / 2] complex
    slots: torch.Tensor           # [T] pool row each token's K/V is written to
    n_decode: int
    decode_blocks: torch.Tensor | None   # [n_decode, nblocks] block tables, padded with block 0
    decode_keys: int                     # longest decoding sequence, in tokens
    decode_mask: torch.Tensor | None     # [n_decode, 1, 1, decode_keys], or None when all are that long
    prefills: list[_Prefill]
    logit_rows: torch.Tensor      # rows (internal order) whose logits are returned, in the caller's order


class Llama:
    """Llama weights plus the forward pass: fp32 weights, activations and K/V, all on `device`.

    Weights are moved to the device once (on the CPU they stay the loaded, memory-mapped tensors); every
    tensor a step makes is made there, and only token ids and block tables cross from the host.

    fp16_single_token=True adds fp16 copies of the matrices (+50% weight memory) used only when a step
    computes one row, i.e. one decoding sequence: ~2x single-stream speed on AVX2 CPUs at a KL divergence
    of ~1e-5 from fp32. Batched steps always run in fp32.
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], max_positions: int | None = None,
                 fp16_single_token: bool = False, device: str | torch.device = "cpu"):
        c = self.config = config
        self.device = torch.device(device)
        weights = {name: w.to(self.device) for name, w in weights.items()}
        self.group = c.n_heads // c.n_kv_heads
        if c.n_heads % c.n_kv_heads:
            raise ValueError(f"{c.n_heads} query heads cannot share {c.n_kv_heads} kv heads evenly")
        self.embed = weights["token_embd.weight"]
        self.output = _Matrix(self.embed if c.tied_embeddings else weights["output.weight"], fp16_single_token)
        self.norm = weights["output_norm.weight"]
        self.layers = [_Layer(weights, i, fp16_single_token) for i in range(c.n_layers)]
        self.max_positions = max_positions or c.context_length
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        if c.has_rope_freqs:
            inv_freq = inv_freq / weights["rope_freqs.weight"].double().cpu()
        self.inv_freq = inv_freq
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64) / c.rope_scale, inv_freq)
        self.rope_table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(self.device)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  progress: Progress | None = None, max_positions: int | None = None,
                  fp16_single_token: bool = False, device: str | torch.device = "cpu") -> "Llama":
        return cls.from_model_file(load_gguf(path, cache_dir, progress), max_positions, fp16_single_token, device)

    @classmethod
    def from_model_file(cls, mf: ModelFile, max_positions: int | None = None,
                        fp16_single_token: bool = False, device: str | torch.device = "cpu") -> "Llama":
        return cls(mf.config, mf.weights, max_positions, fp16_single_token, device)

    def new_kv_pool(self, num_blocks: int, block_size: int = 16) -> KVPool:
        return KVPool(self.config, num_blocks, block_size, self.device)

    # ------------------------------------------------------------------------------------------ paged step

    @torch.inference_mode()
    def step(self, pool: KVPool, chunks: Sequence[Chunk], should_stop=None) -> torch.Tensor:
        """Run one step; write every fed token's K/V into the pool; return logits [rows, vocab].

        Rows follow the chunks' order: one per chunk with logits="last", len(tokens) for "all", none for
        "none". The K/V of positions before each chunk's start must already be in its blocks.
        should_stop, if given, is asked between layers; when it says yes the step ends with
        StepAborted, having written K/V only at the chunks' own positions (recomputed next time).
        """
        c = self.config
        plan = self._plan(pool, chunks)
        T = plan.tokens.numel()
        H, KVH, D, G = c.n_heads, c.n_kv_heads, c.head_dim, self.group
        q_dim, kv_dim = H * D, KVH * D
        rope = plan.rope.unsqueeze(1)
        x = F.embedding(plan.tokens, self.embed)
        attn = torch.empty((T, q_dim), dtype=x.dtype, device=x.device)
        for i, layer in enumerate(self.layers):
            if should_stop is not None and should_stop():
                raise StepAborted(f"step aborted before layer {i}")
            h = F.rms_norm(x, (c.hidden,), layer.attn_norm, c.rms_eps)
            qkv = layer.wqkv(h).contiguous()
            qk = _rotate(qkv[:, :q_dim + kv_dim].view(T, H + KVH, D), rope)   # q and k heads in one go
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, q_dim + kv_dim:].view(T, KVH, D)
            kp, vp = pool.k[i], pool.v[i]
            kp.index_copy_(0, plan.slots, k)
            vp.index_copy_(0, plan.slots, v)
            if plan.n_decode:
                nd, blocks = plan.n_decode, plan.decode_blocks.view(-1)
                keys = plan.decode_keys
                ks = pool.k_blocks[i].index_select(0, blocks).view(nd, -1, KVH, D)[:, :keys].transpose(1, 2)
                vs = pool.v_blocks[i].index_select(0, blocks).view(nd, -1, KVH, D)[:, :keys].transpose(1, 2)
                # query heads h = kv * G + g share kv head `kv`: fold the G heads into the query-length axis
                out = F.scaled_dot_product_attention(q[:nd].reshape(nd, KVH, G, D), ks, vs,
                                                     attn_mask=plan.decode_mask)
                attn[:nd] = out.reshape(nd, q_dim)
            for p in plan.prefills:
                n = p.rows.stop - p.rows.start
                if p.blocks is None:
                    ks, vs = k[p.rows], v[p.rows]
                else:
                    ks = pool.k_blocks[i].index_select(0, p.blocks).view(-1, KVH, D)
                    vs = pool.v_blocks[i].index_select(0, p.blocks).view(-1, KVH, D)
                qs = q[p.rows].view(n, KVH, G, D).permute(1, 2, 0, 3).reshape(1, KVH, G * n, D)
                out = F.scaled_dot_product_attention(qs, ks.transpose(0, 1).unsqueeze(0),
                                                     vs.transpose(0, 1).unsqueeze(0), attn_mask=p.mask)
                attn[p.rows] = out.view(KVH, G, n, D).permute(2, 0, 1, 3).reshape(n, q_dim)
            x = x + layer.wo(attn)
            h = F.rms_norm(x, (c.hidden,), layer.ffn_norm, c.rms_eps)
            gate, up = layer.w_gate_up(h).chunk(2, dim=-1)
            x = x + layer.w_down(F.silu(gate) * up)
        if plan.logit_rows.numel() == 0:
            return torch.empty((0, c.vocab_size), device=self.device)
        return self.output(F.rms_norm(x[plan.logit_rows], (c.hidden,), self.norm, c.rms_eps)).contiguous()

    def _plan(self, pool: KVPool, chunks: Sequence[Chunk]) -> _Plan:
        """Check a step's chunks and turn them into the index tensors every layer reuses."""
        if not chunks:
            raise ValueError("a step needs at least one chunk")
        if pool.config != self.config:
            raise ValueError("this KV pool was made for a different model")
        if pool.data.device != self.device:
            raise ValueError(f"this KV pool is on {pool.data.device}, the model on {self.device}")
        bs, vocab, dev = pool.block_size, self.config.vocab_size, self.device
        for i, ch in enumerate(chunks):
            n = len(ch.tokens)
            if n == 0:
                raise ValueError(f"chunk {i}: no tokens")
            if ch.start < 0 or ch.start + n > self.max_positions:
                raise ValueError(f"chunk {i}: positions {ch.start}..{ch.start + n - 1} are outside"
                                 f" 0..{self.max_positions - 1}")
            need = (ch.start + n + bs - 1) // bs
            if len(ch.block_table) < need:
                raise ValueError(f"chunk {i}: block table has {len(ch.block_table)} blocks, positions up to"
                                 f" {ch.start + n - 1} need {need} (block size {bs})")
            if any(not 0 <= b < pool.num_blocks for b in ch.block_table[:need]):
                raise ValueError(f"chunk {i}: block ids must be in 0..{pool.num_blocks - 1}")
            if any(not 0 <= t < vocab for t in ch.tokens):
                raise ValueError(f"chunk {i}: token ids must be in 0..{vocab - 1}")
            if ch.logits not in LOGITS_CHOICES:
                raise ValueError(f"chunk {i}: logits must be one of {LOGITS_CHOICES}, got {ch.logits!r}")

        decode = [i for i, ch in enumerate(chunks) if len(ch.tokens) == 1]
        prompt = [i for i, ch in enumerate(chunks) if len(ch.tokens) > 1]
        tokens, positions, slots, first_row = [], [], [], {}
        for i in decode + prompt:
            ch = chunks[i]
            first_row[i] = len(tokens)
            tokens.extend(ch.tokens)
            for p in range(ch.start, ch.start + len(ch.tokens)):
                positions.append(p)
                slots.append(ch.block_table[p // bs] * bs + p % bs)
        if len(set(slots)) != len(slots):      # two chunks writing one KV slot: a block-sharing bug upstream
            raise ValueError("two tokens of this step would write the same KV slot (shared block not copied?)")

        decode_blocks = decode_mask = None
        decode_keys = 0
        if decode:
            lengths = [chunks[i].start + 1 for i in decode]
            decode_keys = max(lengths)
            nblocks = (decode_keys + bs - 1) // bs
            tables = [list(chunks[i].block_table[:(n + bs - 1) // bs]) for i, n in zip(decode, lengths)]
            decode_blocks = torch.tensor([t + [0] * (nblocks - len(t)) for t in tables], device=dev)
            if min(lengths) != decode_keys:     # a mask costs SDPA time; equal lengths need none
                keys = torch.arange(decode_keys, device=dev)
                decode_mask = (keys < torch.tensor(lengths, device=dev).unsqueeze(1)).view(len(decode), 1, 1, -1)

        prefills = []
        for i in prompt:
            ch = chunks[i]
            n, total = len(ch.tokens), ch.start + len(ch.tokens)
            blocks, keys = None, total
            if ch.start > 0:
                blocks = torch.tensor(list(ch.block_table[:(total + bs - 1) // bs]), device=dev)
                keys = blocks.numel() * bs       # slots past `total` are masked by causality
            causal = (torch.arange(keys, device=dev).unsqueeze(0)
                      <= (ch.start + torch.arange(n, device=dev)).unsqueeze(1))
            prefills.append(_Prefill(slice(first_row[i], first_row[i] + n), ch.start, blocks,
                                     causal.repeat(self.group, 1).view(1, 1, self.group * n, keys)))

        rows = []
        for i, ch in enumerate(chunks):
            n = len(ch.tokens)
            if ch.logits == "last":
                rows.append(first_row[i] + n - 1)
            elif ch.logits == "all":
                rows.extend(range(first_row[i], first_row[i] + n))
        return _Plan(tokens=torch.tensor(tokens, device=dev),
                     rope=self.rope_table[torch.tensor(positions, device=dev)],
                     slots=torch.tensor(slots, device=dev), n_decode=len(decode), decode_blocks=decode_blocks,
                     decode_keys=decode_keys, decode_mask=decode_mask, prefills=prefills,
                     logit_rows=torch.tensor(rows, dtype=torch.long, device=dev))

    # ------------------------------------------------------------------------------------------ reference

    @torch.inference_mode()
    def forward_contiguous(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits [n, vocab] for every position of one sequence, with no cache: the reference tests use."""
        c = self.config
        n, H, KVH, D = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
        angles = torch.outer(torch.arange(n, dtype=torch.float64) / c.rope_scale, self.inv_freq)
        cos, sin = angles.cos().float().to(self.device), angles.sin().float().to(self.device)

        def rope(t):                           # t [n, heads, D]; pairs (2i, 2i+1) rotate by angle i
            even, odd = t[..., 0::2], t[..., 1::2]
            c_, s_ = cos[:, None, :], sin[:, None, :]
            return torch.stack((even * c_ - odd * s_, even * s_ + odd * c_), dim=-1).flatten(-2)

        def rms(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w

        causal = torch.full((n, n), float("-inf"), device=self.device).triu(1)
        x = self.embed[torch.tensor(list(tokens), device=self.device)]
        for layer in self.layers:
            wq, wk, wv = layer.wqkv.w.split((H * D, KVH * D, KVH * D))
            h = rms(x, layer.attn_norm)
            q = rope((h @ wq.T).view(n, H, D)).transpose(0, 1)
            k = rope((h @ wk.T).view(n, KVH, D)).transpose(0, 1).repeat_interleave(self.group, dim=0)
            v = (h @ wv.T).view(n, KVH, D).transpose(0, 1).repeat_interleave(self.group, dim=0)
            scores = q @ k.transpose(1, 2) / math.sqrt(D) + causal
            out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, H * D)
            x = x + out @ layer.wo.w.T
            h = rms(x, layer.ffn_norm)
            wg, wu = layer.w_gate_up.w.chunk(2)
            x = x + (F.silu(h @ wg.T) * (h @ wu.T)) @ layer.w_down.w.T
        return rms(x, self.norm) @ self.output.w.T


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [T, heads, D] by rope [T, 1, D/2] (unit complex numbers)."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rope).flatten(-2)
